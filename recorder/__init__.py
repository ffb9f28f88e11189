"""Record binary activation patterns of a PyTorch model into versioned HDF5 shards.

The reader is importable without torch (``actpat.analysis`` depends on it); the torch-side
recorder is loaded on first access.
"""

from actpat.recorder.reader import Loss, Patterns, Run, ShardFormatError, ShardInfo, StopReason, open_run
from actpat.recorder.schema import FORMAT_VERSION

__all__ = [
    "ActivationRecorder", "FORMAT_VERSION", "Loss", "Patterns", "Prober", "RecorderError", "Run", "ShardFormatError",
    "ShardInfo", "StopReason", "open_run", "replay",
]


def __getattr__(name: str):
    # PEP 562: keep `import actpat.recorder.reader` free of torch.
    if name in ("ActivationRecorder", "RecorderError"):
        from actpat.recorder import recorder

        return getattr(recorder, name)
    if name == "Prober":
        from actpat.recorder import prober

        return prober.Prober
    if name == "replay":
        from actpat.recorder import checkpoint_replay

        return checkpoint_replay.replay
    raise AttributeError(f"module 'actpat.recorder' has no attribute {name!r}")

"""Record binary activation patterns of a PyTorch model into versioned HDF5 shards.

Names are loaded on first access (PEP 562): the reader needs h5py but not torch (``actpat.analysis``
depends on it), the recorder needs torch, and ``import actpat.recorder`` alone needs neither.
"""

import importlib

# Public name -> submodule that defines it.
_EXPORTS = {
    "ActivationRecorder": "recorder",
    "RecorderError": "recorder",
    "FORMAT_VERSION": "schema",
    "Loss": "reader",
    "Patterns": "reader",
    "Run": "reader",
    "ShardFormatError": "reader",
    "ShardInfo": "reader",
    "StopReason": "reader",
    "open_run": "reader",
    "Prober": "prober",
    "replay": "checkpoint_replay",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'actpat.recorder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""Lightning integration: record activation patterns during ``Trainer.fit`` with one callback.

The callback class is loaded on first access (PEP 562): importing ``actpat.callbacks`` does not import
Lightning or torch.
"""

__all__ = ["ActivationPatternCallback"]


def __getattr__(name: str):
    if name == "ActivationPatternCallback":
        from actpat.callbacks.patterns import ActivationPatternCallback

        return ActivationPatternCallback
    raise AttributeError(f"module 'actpat.callbacks' has no attribute {name!r}")

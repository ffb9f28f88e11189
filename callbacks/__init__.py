"""Lightning integration: record activation patterns during ``Trainer.fit`` with one callback."""

from actpat.callbacks.patterns import ActivationPatternCallback

__all__ = ["ActivationPatternCallback"]

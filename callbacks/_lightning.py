"""The Lightning types the callback uses, from every Lightning package that is installed.

Lightning ships as two packages with separate class hierarchies: ``lightning`` (``import lightning as
L``; ``lightning.pytorch``) and ``pytorch_lightning``. A ``lightning.pytorch.Trainer`` knows nothing of
``pytorch_lightning.Callback`` and the reverse: ``Trainer(callbacks=cb)`` wraps a single callback in a
list only if ``isinstance(cb, Callback)`` of its own package, and ``LightningCLI`` accepts a
``class_path`` only for a subclass of its own package's ``Callback``. So the callback class derives from
the ``Callback`` of *each* installed package (:data:`CALLBACK_BASES`), and every other Lightning name it
needs comes from here. Either package alone is enough.

Both packages' rank-zero helpers share one ``lightning_utilities`` rank flag, which every Trainer sets,
so one :func:`rank_zero_warn` serves both.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from actpat.recorder.lightning_probe import LIGHTNING_PACKAGES

log = logging.getLogger(__name__)


def _import(name: str):
    # find_spec on the top-level name does not import it; a broken install is skipped, not fatal.
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        log.debug("actpat: %s is installed but cannot be imported: %r", name, exc)
        return None


_MODULES = {name: module for name in LIGHTNING_PACKAGES if (module := _import(name)) is not None}
if not _MODULES:
    raise ImportError(
        "Expected a Lightning package for actpat.callbacks, but neither `lightning` nor `pytorch_lightning` "
        "can be imported. Install one: `pip install lightning` or `pip install pytorch-lightning`."
    )

#: Import names of the installed Lightning packages (``"lightning.pytorch"``, ``"pytorch_lightning"``).
PACKAGES: tuple[str, ...] = tuple(_MODULES)
#: ``Callback`` of every installed package: the callback's base classes.
CALLBACK_BASES: tuple[type, ...] = tuple(module.Callback for module in _MODULES.values())
#: ``TensorBoardLogger`` of every installed package (either gets the custom-scalars layout).
TENSORBOARD_LOGGERS: tuple[type, ...] = tuple(
    importlib.import_module(f"{name}.loggers").TensorBoardLogger for name in PACKAGES
)

_utilities = importlib.import_module(f"{PACKAGES[0]}.utilities")
rank_zero_warn = _utilities.rank_zero_warn
move_data_to_device = _utilities.move_data_to_device


__all__ = ["CALLBACK_BASES", "PACKAGES", "TENSORBOARD_LOGGERS", "move_data_to_device",
           "rank_zero_warn"]

"""What the callback asks the Trainer: epoch length, training batch size, compiled parts; and its loggers."""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

from actpat.callbacks._lightning import TENSORBOARD_LOGGERS
from actpat.recorder.probe_module import compiled_parts as _compiled_submodules

Trainer = Any  # either package's Trainer (see actpat.callbacks._lightning)


def steps_per_epoch(trainer: Trainer, probe_every: float | int) -> Optional[int]:
    """Optimizer steps per epoch, needed for a fractional ``probe_every`` (None for an int)."""
    if isinstance(probe_every, int):
        return None
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            f"Expected a training DataLoader of known length for `probe_every={probe_every!r}` (a fraction of an "
            "epoch), but the epoch length is unknown (an IterableDataset?). Pass an int `probe_every` (optimizer "
            "steps)."
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def training_batch_size(trainer: Trainer) -> int:
    """The batch size of the (first) training DataLoader, the default probe batch size."""
    loaders = trainer.train_dataloader
    while isinstance(loaders, (list, tuple, dict)) and loaders:
        loaders = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders[0]
    size = getattr(loaders, "batch_size", None) or getattr(getattr(loaders, "batch_sampler", None), "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            f"Expected the training DataLoader's batch size as the default `probe_batch_size`, but the training "
            f"loader ({type(loaders).__name__}) has none. Pass `probe_batch_size=`."
        )
    return size


def compiled_parts(module: nn.Module) -> list[str]:
    """Where a LightningModule is compiled, including a fit that was given a ``torch.compile``'d module."""
    parts = _compiled_submodules(module)
    if getattr(module, "_compiler_ctx", None) is not None:
        parts.insert(0, "the LightningModule (fit was given a torch.compile'd module)")
    return parts


def log_metrics(trainer: Trainer, stats: dict[str, dict[str, float]], step: int, layout_written: set[int]) -> None:
    """Send one probe's ``{site: {metric: value}}`` to every logger as ``actpat/<metric>/<site>`` at ``step``.

    A TensorBoard logger also gets the custom-scalars layout, once (``layout_written`` holds the ids of
    the loggers that have it). The loggers write them out when Lightning saves its own metrics (every
    ``log_every_n_steps``, and at the end of fit), not at each probe.
    """
    metrics = {f"actpat/{metric}/{site}": value for site, values in stats.items() for metric, value in values.items()}
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TENSORBOARD_LOGGERS) and id(logger) not in layout_written:
            logger.experiment.add_custom_scalars(custom_scalars_layout())
            layout_written.add(id(logger))


def custom_scalars_layout() -> dict:
    """One multiline chart per live metric, all sites (regex), for TensorBoard's Custom Scalars."""
    from actpat.analysis.live import LIVE_METRICS
    return {"actpat (live)": {metric: ["Multiline", [rf"actpat/{metric}/.*"]] for metric in LIVE_METRICS}}

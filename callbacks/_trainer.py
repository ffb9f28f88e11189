"""What the callback asks the Trainer: epoch length, training batch size, compiled parts; and its loggers."""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from torch import nn

from actpat.callbacks._lightning import TENSORBOARD_LOGGERS
from actpat.recorder.live_stats import LiveStatsError
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


class LiveLog:
    """Send each probe's live statistics to every logger of one fit's trainer as ``actpat/<metric>/<site>``.

    A TensorBoard logger also gets the custom-scalars layout, once. When a probe's statistics arrive, the
    loggers write out (``save``) if :attr:`SAVE_SECONDS` have passed since they last did for them, besides
    Lightning's own saves and the one at the end of fit: a probe every few steps need not rewrite a file
    each time, and a module that logs nothing itself still shows its statistics while it trains.

    Raises :class:`~actpat.recorder.live_stats.LiveStatsError` when a logger fails, so that the live
    statistics stop and the probes go on being recorded.
    """

    #: Seconds between the saves of the loggers for the live statistics.
    SAVE_SECONDS = 5.0

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self._layout_written: set[int] = set()  # id() of the TensorBoard loggers that have the layout
        self._last_save = -math.inf  # time.monotonic()

    def __call__(self, step: int, stats: dict[str, dict[str, float]]) -> None:
        """Log one probe's ``{site: {metric: value}}`` at ``step``."""
        metrics = {f"actpat/{metric}/{site}": value for site, values in stats.items() for metric, value in values.items()}
        if not metrics or not self._trainer.is_global_zero:
            return
        now = time.monotonic()
        save = now - self._last_save >= self.SAVE_SECONDS
        for logger in self._trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
                if isinstance(logger, TENSORBOARD_LOGGERS) and id(logger) not in self._layout_written:
                    logger.experiment.add_custom_scalars(custom_scalars_layout())
                    self._layout_written.add(id(logger))
                if save:
                    logger.save()
            except Exception as exc:
                raise LiveStatsError(
                    f"Logging the live statistics of the probe at step {step} to {type(logger).__name__} failed with "
                    f"{exc!r}."
                ) from exc
        if save:
            self._last_save = now


def custom_scalars_layout() -> dict:
    """One multiline chart per live metric, all sites (regex), for TensorBoard's Custom Scalars."""
    from actpat.analysis.live import LIVE_METRICS
    return {"actpat (live)": {metric: ["Multiline", [rf"actpat/{metric}/.*"]] for metric in LIVE_METRICS}}

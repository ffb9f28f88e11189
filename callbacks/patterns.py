"""ActivationPatternCallback: record activation patterns during ``Trainer.fit`` (SPEC section 6).

The callback is a thin adapter over :class:`~actpat.recorder.ActivationRecorder`: its Lightning hooks
only decide *when* to record; private helpers below the class do the work (the probe copy, RNG
isolation, the live statistics).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from actpat.recorder import open_run, schema
from actpat.recorder.recorder import ActivationRecorder
from actpat.recorder.shards import Record

log = logging.getLogger(__name__)

#: Split name of probe records and of recorded training batches.
PROBE_SPLIT = "probe"
TRAIN_SPLIT = "train"
#: Live metrics, logged as ``actpat/<metric>/<site>`` (bits where a metric has a unit).
LIVE_METRICS = (
    "entropy",
    "normalized_entropy",
    "distinct",
    "top_mass",
    "jaccard_init",
    "weighted_jaccard_init",
    "jaccard_last",
    "weighted_jaccard_last",
    "mutual_information",
)
_INPUT_KEYS = ("x", "input", "inputs", "image", "images")
_LABEL_KEYS = ("y", "label", "labels")
_STATE_VERSION = 1


class ActivationPatternCallback(Callback):
    """Record binary activation patterns of a LightningModule while it trains.

    Two protocols (SPEC section 6), usable together, into one run directory of shards:

    - **probe**: before the first optimizer step, every ``probe_every`` and at the end of fit, a fixed
      probe set is run under ``no_grad`` through a *copy* of the module (split ``"probe"``). The real
      module's weights, BatchNorm statistics, gradients and every RNG stream (torch CPU/CUDA, numpy,
      python) are untouched, so a run with the callback trains bit-identically to one without it.
    - **batch**: the training batches themselves every ``batch_every_n_steps`` optimizer steps, from the
      training forward (split ``"train"``, no extra forward pass).

    Steps are ``trainer.global_step`` (optimizer steps); the epoch is stored with each record.

    Parameters
    ----------
    out_dir : path, optional
        Run directory. Default: ``<trainer.log_dir>/activation_patterns``, next to the TensorBoard logs;
        a resumed fit keeps the directory stored in the checkpoint.
    batch_every_n_steps : int, default 0
        Record the training batches every this many optimizer steps; 0 turns batch mode off.
    probe : Dataset or DataLoader, optional
        The probe set, without augmentation. A Dataset is wrapped in a ``DataLoader`` with
        ``shuffle=False`` and ``probe_batch_size``; a DataLoader must not shuffle. None turns probing off.
    probe_every : float or int, default 0.2
        Float: fraction of an epoch of optimizer steps (0.2, five probes per epoch, as Hartmann et al.
        2021); a probe runs at the first step at or after each multiple of it. Int: optimizer steps.
    probe_mode : {"train", "eval"}, default "train"
        ``train``: BatchNorm normalizes with the probe batch's statistics (as the paper); ``eval``: with
        the running statistics. Dropout is off in both, so a probe is a deterministic function of the
        weights.
    sites, pattern, max_observations, compression
        As for :class:`~actpat.recorder.ActivationRecorder`.
    live_stats : bool, default True
        After each probe, log exact per-site statistics (:data:`LIVE_METRICS`) to the trainer's loggers
        as ``actpat/<metric>/<site>`` at the probe's step; a TensorBoard logger also gets a custom-scalars
        layout (one multiline chart per metric, all sites). Computed on a background thread, so training
        does not wait for the counting.
    labels_from : callable(batch) -> labels, optional
        Per-sample labels of a batch. Default: ``batch[1]`` of a tuple/list, ``batch["y" | "label" |
        "labels"]`` of a dict, else none.
    inputs_from : callable(batch) -> inputs, optional
        What the probe feeds to the module's ``forward``. Default: ``batch[0]`` of a tuple/list,
        ``batch["x" | "input" | "inputs" | "image" | "images"]`` of a dict, else the batch itself.
    probe_batch_size : int, default 256
        Batch size when ``probe`` is a Dataset. In ``train`` mode it changes the BatchNorm statistics,
        so keep it fixed across runs that are compared.
    probe_on_all_ranks : bool, default False
        Under DDP the probe runs on global rank 0 only; True runs it on every rank (each rank writes its
        own shards). Batch mode always records on every rank.
    on_error : {"warn", "raise"}, default "warn"
        ``warn``: an error while recording is reported once and recording stops; training continues.
        ``raise``: the error stops training.
    probe_values : None, "all" or int, default None
        Also store the probe's float16 pre-activations (all units, or this many per site), for the
        continuous mutual-information estimators of :mod:`actpat.analysis.mi`; see the recorder's
        ``store_values``. Batch records never store values.
    module_types : sequence of module classes, default ()
        Further classes to record as activation sites (e.g. ``nn.Tanh``: its sign pattern), as for the
        recorder.

    Notes
    -----
    Resuming from a checkpoint (``state_dict``) continues in the same run directory; steps already
    recorded there (also those a killed process wrote after the checkpoint) are not recorded again,
    and the ``init``/``last`` references of the live Jaccard indices are re-read from the shards
    rather than stored in the checkpoint, which stays a few bytes. With ``probe_on_all_ranks=True`` the
    re-read references merge all ranks' probe records.

    Batch mode needs the eager module: with ``torch.compile`` it raises at setup. The probe works with a
    compiled module, because it runs an eager copy.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
    training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> cb = ActivationPatternCallback(batch_every_n_steps=10, live_stats=False)
    >>> cb.state_key
    "ActivationPatternCallback{'out_dir': None, 'batch_every_n_steps': 10, 'probe_every': 0.2, 'probe_mode': 'train'}"
    """

    def __init__(
        self,
        out_dir: Optional[Union[str, Path]] = None,
        batch_every_n_steps: int = 0,
        probe: Optional[Union[Dataset, DataLoader]] = None,
        probe_every: Union[float, int] = 0.2,
        probe_mode: str = "train",
        sites: Union[None, str, Sequence[str], Callable[[str], bool]] = None,
        pattern: str = "channel",
        max_observations: Optional[int] = None,
        compression: Optional[str] = None,
        live_stats: bool = True,
        labels_from: Optional[Callable[[Any], Any]] = None,
        *,
        inputs_from: Optional[Callable[[Any], Any]] = None,
        probe_batch_size: int = 256,
        probe_on_all_ranks: bool = False,
        on_error: str = "warn",
        probe_values: Optional[Union[str, int]] = None,
        module_types: Sequence[type] = (),
    ) -> None:
        if isinstance(batch_every_n_steps, bool) or not isinstance(batch_every_n_steps, int) or batch_every_n_steps < 0:
            raise ValueError(f"Expected `batch_every_n_steps` to be an int >= 0, but got {batch_every_n_steps!r}.")
        if isinstance(probe_every, bool) or not isinstance(probe_every, (int, float)) or not probe_every > 0:
            raise ValueError(
                f"Expected `probe_every` to be a float > 0 (fraction of an epoch) or an int >= 1 (optimizer "
                f"steps), but got {probe_every!r}."
            )
        if probe_mode not in ("train", "eval"):
            raise ValueError(f"Expected `probe_mode` to be 'train' or 'eval', but got {probe_mode!r}.")
        if pattern not in schema.PATTERN_KINDS:
            raise ValueError(f"Expected `pattern` to be one of {schema.PATTERN_KINDS}, but got {pattern!r}.")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"Expected `on_error` to be 'warn' or 'raise', but got {on_error!r}.")
        if probe_batch_size < 1:
            raise ValueError(f"Expected `probe_batch_size` to be at least 1, but got {probe_batch_size}.")
        if probe is None and batch_every_n_steps == 0:
            raise ValueError(
                "Expected something to record, but got `probe=None` and `batch_every_n_steps=0`. Pass a probe "
                "set, or `batch_every_n_steps >= 1` to record the training batches."
            )
        self.out_dir = out_dir
        self.batch_every_n_steps = batch_every_n_steps
        self.probe_every = probe_every
        self.probe_mode = probe_mode
        self.sites = sites
        self.pattern = pattern
        self.max_observations = max_observations
        self.compression = compression
        self.live_stats = live_stats
        self.probe_on_all_ranks = probe_on_all_ranks
        self.on_error = on_error
        self.probe_values = probe_values
        self.module_types = tuple(module_types)
        self._probe_loader = _probe_loader(probe, probe_batch_size)
        self._labels_from = labels_from or _default_labels
        self._inputs_from = inputs_from or _default_inputs
        # Resumable state (state_dict).
        self._run_dir: Path | None = None
        self._last_probe_step = -1
        self._last_batch_step = -1
        self._init_step = -1
        self._resumed = False
        # Per-fit state.
        self._default_dir: Path | None = None
        self._batch_floor = -1
        self._interval: Fraction | None = None
        self._recorders: list[ActivationRecorder] = []
        self._batch_recorder: ActivationRecorder | None = None
        self._probe_recorder: ActivationRecorder | None = None
        self._probe_module: nn.Module | None = None
        self._capture: contextlib.ExitStack | None = None
        self._observed: list[Record] = []
        self._stats: _LiveStats | None = None
        self._layout_written: set[int] = set()  # id() of the TensorBoard loggers that have the layout
        self._failed = False
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            out_dir=None if self.out_dir is None else str(self.out_dir),
            batch_every_n_steps=self.batch_every_n_steps,
            probe_every=self.probe_every,
            probe_mode=self.probe_mode,
        )

    @property
    def run_dir(self) -> Path | None:
        """The run directory of the shards, known once training started."""
        return self._run_dir

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.batch_every_n_steps and _compiled_parts(pl_module):
            raise ValueError(
                "Expected an eager module for batch-mode recording (`batch_every_n_steps > 0`), but "
                f"{type(pl_module).__name__} is compiled with torch.compile ({', '.join(_compiled_parts(pl_module))}): "
                "hooks cannot see inside a compiled graph. Record with the probe only (it runs an eager copy), or "
                "train the eager module."
            )
        if self._probe_loader is not None and self.live_stats and not trainer.loggers:
            raise ValueError(
                "Expected a logger for `live_stats=True`, but the Trainer has none (logger=False). Pass a logger "
                "(TensorBoardLogger, CSVLogger, ...) or `live_stats=False`."
            )
        # trainer.log_dir broadcasts under DDP: every rank resolves it here, at the same point.
        self._default_dir = Path(self.out_dir) if self.out_dir is not None else Path(trainer.log_dir) / "activation_patterns"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._failed = False
        with self._guard("starting the recorders"):
            self._start(trainer, pl_module)
            if self._init_step < 0:  # "init", before the first optimizer step; a resumed fit keeps its schedule
                self._maybe_probe(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._batch_recorder is None or self._failed or step % self.batch_every_n_steps or step <= self._batch_floor:
            return
        with self._guard("recording a training batch"):
            stack = contextlib.ExitStack()
            stack.enter_context(
                self._batch_recorder.capture(
                    step, labels=self._labels_from(batch), split=TRAIN_SPLIT, epoch=trainer.current_epoch
                )
            )
            self._capture = stack
            self._last_batch_step = step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # The forward is over: backward, the optimizer and logging run outside the capture.
        self._end_capture()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_capture()  # when no backward ran (manual optimization, a skipped step)
        self._log_stats(trainer, wait=False)
        if self._interval is not None and _due(trainer.global_step, self._interval):
            self._maybe_probe(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_capture()
        self._maybe_probe(trainer, pl_module)  # the end of fit
        self._log_stats(trainer, wait=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_capture()
        self._shutdown(wait_for_stats=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._end_capture()
        self._log_stats(trainer, wait=True)
        self._shutdown(wait_for_stats=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "run_dir": None if self._run_dir is None else str(self._run_dir),
            "last_probe_step": self._last_probe_step,
            "last_batch_step": self._last_batch_step,
            "init_step": self._init_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        run_dir = state_dict.get("run_dir")
        self._run_dir = None if run_dir is None else Path(run_dir)
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._last_batch_step = int(state_dict.get("last_batch_step", -1))
        self._init_step = int(state_dict.get("init_step", -1))
        self._resumed = True

    # ------------------------------------------------------------------ helpers
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is not None or self._run_dir is None:
            self._run_dir = self._default_dir
        run_dir = self._run_dir
        if self._resumed:
            on_disk = _recorded_steps(run_dir)
            self._last_probe_step = max(self._last_probe_step, on_disk.get(PROBE_SPLIT, -1))
            self._last_batch_step = max(self._last_batch_step, on_disk.get(TRAIN_SPLIT, -1))
            short = _short_probe(run_dir, self._last_probe_step, self._probe_loader)
            if short:
                self._warn_once("short", f"actpat: {short}; it is kept as it is (records are never rewritten).")
        elif _has_shards(run_dir, trainer.global_rank):
            self._warn_once(
                "existing",
                f"actpat: {run_dir} already holds shards of rank {trainer.global_rank}; new records are added "
                "beside them (same steps may appear twice). Pass another `out_dir` to keep runs apart.",
            )
        self._batch_floor = self._last_batch_step
        options = dict(
            sites=self.sites, pattern=self.pattern, max_observations=self.max_observations,
            compression=self.compression, rank=trainer.global_rank, module_types=self.module_types,
        )
        writer = None
        if self.batch_every_n_steps:
            self._batch_recorder = ActivationRecorder(pl_module, run_dir, **options)
            self._recorders.append(self._batch_recorder)
            writer = self._batch_recorder.writer
        if self._probe_loader is not None and (trainer.is_global_zero or self.probe_on_all_ranks):
            self._probe_module = _probe_copy(pl_module, self.probe_mode)
            observe = self._observed.append if self.live_stats and trainer.is_global_zero else None
            self._probe_recorder = ActivationRecorder(
                self._probe_module, run_dir, **options, writer=writer, on_record=observe,
                store_values=self.probe_values,
            )
            self._recorders.append(self._probe_recorder)
            self._interval = _probe_interval(self.probe_every, trainer)
            if observe is not None:
                self._stats = _LiveStats(
                    references=_references_from_disk(run_dir, self._init_step, self._last_probe_step)
                    if self._resumed else {}
                )
        for recorder in self._recorders:
            recorder.open()

    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._probe_recorder is None or self._failed or step <= self._last_probe_step:
            return
        with self._guard(f"the probe at step {step}"):
            self._observed.clear()
            _run_probe(
                self._probe_module, pl_module, self._probe_recorder, self._probe_loader, trainer,
                inputs_from=self._inputs_from, labels_from=self._labels_from,
            )
            self._last_probe_step = step
            if self._init_step < 0:
                self._init_step = step
            if self._stats is not None:
                self._stats.submit(step, list(self._observed))
            self._observed.clear()

    def _end_capture(self) -> None:
        stack, self._capture = self._capture, None
        if stack is not None:
            with self._guard("recording a training batch"):
                stack.close()

    def _log_stats(self, trainer: pl.Trainer, wait: bool) -> None:
        if self._stats is None:
            return
        with self._guard("computing live statistics"):
            for step, metrics in self._stats.results(wait=wait):
                _log_metrics(trainer, metrics, step, self._layout_written)

    def _shutdown(self, wait_for_stats: bool) -> None:
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            with self._guard("finalizing the shards"):
                recorder.close()
        if self._stats is not None:
            self._stats.close(wait=wait_for_stats)
            self._stats = None
        self._batch_recorder = self._probe_recorder = self._probe_module = None
        self._interval = None

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Report a recording error once and stop recording (``on_error="warn"``), or re-raise."""
        try:
            yield
        except Exception as exc:
            if self.on_error == "raise":
                raise
            self._failed = True
            self._warn_once(
                "error",
                f"actpat: {what} failed with {exc!r}; activation recording stops for the rest of this fit and "
                "training continues. Records written before stay readable. Pass `on_error='raise'` to stop "
                "training instead.",
            )
            log.debug("actpat: recording error", exc_info=True)
            stack, self._capture = self._capture, None
            if stack is not None:
                with contextlib.suppress(Exception):
                    stack.close()
            recorders, self._recorders = self._recorders, []
            for recorder in recorders:
                with contextlib.suppress(Exception):
                    recorder.close()
            self._batch_recorder = self._probe_recorder = None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


# ---------------------------------------------------------------------- batch access
def _default_labels(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
    return None


def _default_inputs(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"Expected a probe batch dict with one of the keys {_INPUT_KEYS}, but got keys {sorted(batch)}. "
            "Pass `inputs_from=` to say what the module's forward takes."
        )
    return batch


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, (tuple, list)) and inputs:
        return _batch_size(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _batch_size(next(iter(inputs.values())))
    raise ValueError(f"Expected probe inputs with a batch dimension, but got {type(inputs).__name__}.")


# ---------------------------------------------------------------------- probe
def _probe_loader(probe: Any, batch_size: int) -> DataLoader | None:
    if probe is None:
        return None
    if isinstance(probe, DataLoader):
        if isinstance(probe.sampler, RandomSampler):
            raise ValueError(
                "Expected a probe DataLoader that iterates in a fixed order, but it shuffles (RandomSampler). "
                "Pass the Dataset, or a DataLoader with shuffle=False."
            )
        return probe
    if isinstance(probe, Dataset) or hasattr(probe, "__getitem__"):
        return DataLoader(probe, batch_size=batch_size, shuffle=False)
    raise ValueError(f"Expected `probe` to be a Dataset, a DataLoader or None, but got {type(probe).__name__}.")


def _probe_interval(probe_every: float | int, trainer: pl.Trainer) -> Fraction:
    """Optimizer steps between probes, exact (a fraction of an epoch need not be a whole number)."""
    if isinstance(probe_every, int):
        return Fraction(probe_every)
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "Expected a sized training DataLoader for a fractional `probe_every`, but the epoch length is "
            "unknown (an IterableDataset?). Pass an int `probe_every` (optimizer steps)."
        )
    steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    return max(Fraction(1), Fraction(probe_every).limit_denominator(10**6) * steps_per_epoch)


def _due(step: int, interval: Fraction) -> bool:
    """True at the first step at or after each multiple of ``interval``."""
    return step > 0 and math.floor(step / interval) > math.floor((step - 1) / interval)


def _compiled_parts(module: nn.Module) -> list[str]:
    parts = [f"{name or 'the module'}" for name, m in module.named_modules() if type(m).__name__ == "OptimizedModule"]
    if getattr(module, "_compiler_ctx", None) is not None:
        parts.insert(0, "the LightningModule (fit was given a torch.compile'd module)")
    return parts


def _probe_copy(pl_module: pl.LightningModule, mode: str) -> nn.Module:
    """An eager, gradient-free copy of ``pl_module`` for probing (made once per fit)."""
    module = copy.deepcopy(pl_module)  # LightningModule.__getstate__ drops the trainer reference
    if getattr(module, "_compiler_ctx", None) is not None:
        # Lightning's from_compiled() put compiled bound methods on the instance: back to the class's.
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            module.__dict__.pop(name, None)
        module._compiler_ctx = None
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "OptimizedModule":
                setattr(parent, name, child._orig_mod)
    module.requires_grad_(False)
    module.train(mode == "train")
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.eval()  # a probe is a deterministic function of the weights
    return module


def _sync_weights(target: nn.Module, source: nn.Module) -> None:
    state = {key.replace("_orig_mod.", ""): value for key, value in source.state_dict().items()}
    target.load_state_dict(state)


@contextlib.contextmanager
def _isolated_rng(device: torch.device):
    """Restore torch (CPU and ``device``), numpy and python RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _run_probe(
    probe_module: nn.Module,
    pl_module: pl.LightningModule,
    recorder: ActivationRecorder,
    loader: DataLoader,
    trainer: pl.Trainer,
    *,
    inputs_from: Callable[[Any], Any],
    labels_from: Callable[[Any], Any],
) -> None:
    """Run the probe set through the synced copy inside a capture; sample ids are probe-set indices."""
    step, epoch = trainer.global_step, trainer.current_epoch
    device = pl_module.device
    with _isolated_rng(device), torch.no_grad():
        _sync_weights(probe_module, pl_module)
        offset = 0
        for batch in loader:  # iterating draws a base seed from the global RNG: inside the fork
            inputs = move_data_to_device(inputs_from(batch), device)
            n = _batch_size(inputs)
            ids = torch.arange(offset, offset + n)
            with recorder.capture(step, labels=labels_from(batch), sample_ids=ids, split=PROBE_SPLIT, epoch=epoch):
                with trainer.precision_plugin.forward_context():
                    probe_module(inputs)
            offset += n


# ---------------------------------------------------------------------- resume
def _has_shards(run_dir: Path, rank: int) -> bool:
    if not run_dir.is_dir():
        return False
    return any((p := schema.parse_shard_name(name)) is not None and p[0] == rank for name in os.listdir(run_dir))


def _recorded_steps(run_dir: Path) -> dict[str, int]:
    """Last recorded step per split in ``run_dir`` (all ranks), for resuming without duplicates."""
    if not run_dir.is_dir():
        return {}
    run = open_run(run_dir)
    last: dict[str, int] = {}
    for split in run.splits:
        for site in run.sites:
            steps = run.steps(site, split)
            if len(steps):
                last[split] = max(last.get(split, -1), int(steps[-1]))
    return last


def _short_probe(run_dir: Path, step: int, loader: DataLoader | None) -> str | None:
    """Describe the probe record at ``step`` if a crash cut it short (fewer samples than the probe set)."""
    try:
        expected = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    if step < 0 or not run_dir.is_dir():
        return None
    run = open_run(run_dir)
    for site in run.sites:
        if step in run.steps(site, PROBE_SPLIT):
            try:
                got = len(np.unique(run.read(site, step, PROBE_SPLIT).sample_ids))
            except OSError as exc:  # the unflushed tail of a shard left by a killed process
                return f"the probe at step {step} cannot be read ({exc}; cut short by a crash)"
            if got < expected:
                return f"the probe at step {step} holds {got} of {expected} samples at site {site!r} (cut short by a crash)"
    return None


def _references_from_disk(run_dir: Path, init_step: int, last_step: int) -> dict[str, dict]:
    """``init`` and ``last`` pattern counts per site, re-read from the shards after a resume."""
    from actpat.analysis.counts import pattern_counts

    references: dict[str, dict] = {}
    if not run_dir.is_dir():
        return references
    run = open_run(run_dir)
    for name, step in (("init", init_step), ("last", last_step)):
        references[name] = {}
        for site in run.sites:
            if step >= 0 and step in run.steps(site, PROBE_SPLIT):
                try:
                    p = run.read(site, step, PROBE_SPLIT)
                except OSError:  # unreadable tail of a crashed shard: no reference, no such metric
                    log.warning("actpat: the %s probe (step %d) of site %r cannot be read back.", name, step, site)
                    continue
                references[name][site] = pattern_counts(p.bits, p.n_units)
    return references


# ---------------------------------------------------------------------- live statistics
class _LiveStats:
    """Counts each probe's patterns on one background thread; results are logged from the main thread."""

    def __init__(self, references: dict[str, dict]) -> None:
        import actpat.analysis.measures, actpat.analysis.similarity  # noqa: F401, E401 - import here, not on the worker

        self._references = references  # {"init" | "last": {site: PatternCounts}}, touched by the worker only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actpat-live-stats")
        self._pending: list[tuple[int, Future]] = []

    def submit(self, step: int, records: list[Record]) -> None:
        self._pending.append((step, self._executor.submit(self._compute, records)))

    def results(self, wait: bool):
        """Yield ``(step, metrics)`` of finished probes in step order (all of them if ``wait``)."""
        while self._pending and (wait or self._pending[0][1].done()):
            step, future = self._pending.pop(0)
            yield step, future.result()

    def close(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
        self._pending.clear()

    def _compute(self, records: list[Record]) -> dict[str, float]:
        from actpat.analysis.similarity import jaccard, weighted_jaccard

        metrics: dict[str, float] = {}
        # The first probe of a fresh fit is `init`; a resumed fit re-read it (or lacks it) already.
        first = "init" not in self._references
        init, last = self._references.setdefault("init", {}), self._references.get("last", {})
        current = {}
        for site, (bits, labels, n_units) in _site_rows(records).items():
            counts, stats = _site_stats(bits, labels, n_units)
            if first:
                init[site] = counts
            current[site] = counts
            for name, reference in (("init", init.get(site)), ("last", last.get(site))):
                if reference is not None:
                    stats[f"jaccard_{name}"] = jaccard(counts, reference)
                    stats[f"weighted_jaccard_{name}"] = weighted_jaccard(counts, reference)
            metrics.update({f"actpat/{metric}/{site}": value for metric, value in stats.items()})
        self._references["last"] = current
        return metrics


def _site_rows(records: list[Record]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per site: packed rows of all records, each row's label (-1 unknown), and ``n_units``."""
    parts: dict[str, tuple[list, list, int]] = {}
    for record in records:
        if record.ready is not None:
            record.ready.synchronize()
        bits = np.asarray(record.bits)
        rows = np.arange(len(bits)) if record.obs_index is None else np.asarray(record.obs_index)
        if record.labels is None:
            labels = np.full(len(bits), -1, dtype=np.int64)
        else:
            labels = np.asarray(record.labels, dtype=np.int64)[rows // record.n_positions]
        site_bits, site_labels, _ = parts.setdefault(record.meta.site, ([], [], record.meta.n_units))
        site_bits.append(bits)
        site_labels.append(labels)
    return {site: (np.concatenate(b), np.concatenate(l), n) for site, (b, l, n) in parts.items()}


def _site_stats(bits: np.ndarray, labels: np.ndarray, n_units: int) -> tuple[object, dict[str, float]]:
    """Exact counts and the live measures of one site at one probe (entropies and information in bits)."""
    from actpat.analysis.measures import pattern_measures

    counts, measures = pattern_measures(bits, n_units, labels, validate_args=False)
    return counts, {metric: float(measures[metric]) for metric in LIVE_METRICS if metric in measures}


def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int, layout_written: set[int]) -> None:
    """Send metrics to every logger at ``step``; a TensorBoard logger gets the layout once."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger) and id(logger) not in layout_written:
            logger.experiment.add_custom_scalars(_custom_scalars_layout())
            layout_written.add(id(logger))
        logger.save()


def _custom_scalars_layout() -> dict:
    """One multiline chart per live metric, all sites (regex), for TensorBoard's Custom Scalars."""
    return {"actpat (live)": {metric: ["Multiline", [rf"actpat/{metric}/.*"]] for metric in LIVE_METRICS}}


__all__ = ["ActivationPatternCallback", "LIVE_METRICS"]

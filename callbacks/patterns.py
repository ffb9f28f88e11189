"""ActivationPatternCallback: record activation patterns during ``Trainer.fit`` (SPEC section 6).

The callback is a thin adapter over :class:`~actpat.recorder.ActivationRecorder`: its Lightning hooks
only decide *when* to record. The probe execution (copy, weight sync, RNG isolation, the probe forward
rule, running the probe set) lives in :mod:`actpat.callbacks._probe`, batch access (inputs, labels) in
:mod:`actpat.callbacks._batches`, and the Lightning names of either package in
:mod:`actpat.callbacks._lightning`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from actpat.analysis.metrics import metric_names
from actpat.callbacks import _probe
from actpat.callbacks._batches import BatchReader
from actpat.callbacks._lightning import CALLBACK_BASES, TENSORBOARD_LOGGERS, rank_zero_warn
from actpat.callbacks._probe import PROBE_SPLIT
from actpat.callbacks._sites import SiteSelection
from actpat.recorder import open_run, schema
from actpat.recorder.hooks import SiteHooks
from actpat.recorder.recorder import ActivationRecorder
from actpat.recorder.shards import Record, ShardWriter

# Either package's Trainer and LightningModule (see actpat.callbacks._lightning).
Trainer = LightningModule = Any

log = logging.getLogger(__name__)

#: Split name of recorded training batches (probe records use :data:`PROBE_SPLIT`).
TRAIN_SPLIT = "train"
#: Live metrics, logged as ``actpat/<metric>/<site>`` (bits where a metric has a unit).
LIVE_METRICS = tuple(metric_names(live=True))
_STATE_VERSION = 1


class ActivationPatternCallback(*CALLBACK_BASES):
    """Record binary activation patterns of a LightningModule while it trains.

    Two protocols (SPEC section 6), usable together, into one run directory of shards:

    - **probe**: before the first optimizer step, every ``probe_every`` and at the end of fit, a fixed
      probe set is run under ``no_grad`` through a *copy* of the module (split ``"probe"``). The real
      module's weights, BatchNorm statistics, gradients and every RNG stream (torch CPU/CUDA, numpy,
      python) are untouched, so a run with the callback trains bit-identically to one without it.
    - **batch**: the training batches themselves every ``batch_every_n_steps`` optimizer steps, from the
      training forward (split ``"train"``, no extra forward pass). With gradient accumulation every
      micro-batch of a recorded step is recorded; in manual optimization, the forwards before the first
      ``manual_backward``.

    Steps are ``trainer.global_step`` (optimizer steps); the epoch is stored with each record. Only
    calls made inside some module's ``forward`` are sites: a functional ``F.relu`` in a loss computed in
    ``training_step`` is not recorded.

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
        2021); a probe runs at the first step at or after each multiple of it. Needs a training loader
        of known length: with an ``IterableDataset`` pass an int. Int: optimizer steps.
    probe_mode : {"train", "eval"}, default "train"
        ``train``: BatchNorm normalizes with the probe batch's statistics (as the paper); ``eval``: with
        the running statistics. Dropout is off in both, so a probe is a deterministic function of the
        weights.
    sites : None, str, sequence of str, or callable, default None
        Which sites to record: all, names or glob patterns, or a predicate on the site name. A filter
        that selects nothing, or a name that is not a site, is an error listing the sites that exist.
    pattern, max_observations
        As for :class:`~actpat.recorder.ActivationRecorder`.
    compression : str or None, default None
        HDF5 filter of the shards, as for the recorder; uncompressed by default, so that the writer
        thread does not compete with training for the CPU. A codec the writer cannot write is an error
        here, not at the first record.
    live_stats : bool, default True
        After each probe, log exact per-site statistics (:data:`LIVE_METRICS`) to the trainer's loggers
        as ``actpat/<metric>/<site>`` at the probe's step; a TensorBoard logger also gets a custom-scalars
        layout (one multiline chart per metric, all sites). Computed on a background thread, so training
        does not wait for the counting.
    labels_from : callable(batch) -> labels, optional
        Per-sample class labels of a batch (probe and training batches). Default: ``batch[1]`` of a
        tuple/list, ``batch[key]`` of a dict for the first key among ``y, label, labels, target,
        targets``, else none. Labels must be integers of shape ``(N,)`` or one-hot ``(N, K)`` (recorded
        as the argmax, said once); float labels or another shape are an error naming the shape.
    inputs_from : callable(batch) -> inputs, optional
        What the default probe forward feeds to ``module(inputs)``, and whose length is the batch size.
        Default: ``batch[0]`` of a tuple/list, ``batch[key]`` of a dict for the first key among ``x,
        input, inputs, image, images`` (another dict is an error naming this option), else the batch.
    probe_forward : callable(module, batch), optional
        How a probe batch runs through the probe copy ``module`` (the batch already on its device, under
        ``no_grad`` and the trainer's precision context); the return value is ignored. Default:
        ``module(inputs)`` when the LightningModule's class overrides ``forward``; otherwise
        ``module.training_step(batch, 0)``, so the module's own batch handling is used. On the probe
        copy, ``self.log``/``self.log_dict`` do nothing, ``self.trainer`` is a read-only view of the
        trainer (``logger`` None), ``self.optimizers()``/``self.lr_schedulers()`` return stand-ins whose
        ``step``/``zero_grad`` change nothing (a closure given to ``step`` is run once), and
        ``manual_backward``, ``toggle_optimizer``, ``untoggle_optimizer`` and ``clip_gradients`` do
        nothing, so manual optimization works too. Collective calls (``self.all_gather``) in
        ``training_step`` are not supported: pass ``probe_forward``.
    probe_batch_size : int, optional
        Batch size when ``probe`` is a Dataset. Default: the training DataLoader's batch size (in
        ``train`` mode the BatchNorm statistics depend on it; the paper probes with the training batch
        size). Not allowed with a DataLoader probe, which keeps its own.
    probe_on_all_ranks : bool, default False
        Under DDP the probe runs on global rank 0 only; True runs it on every rank (each rank writes its
        own shards). Batch mode always records on every rank.
    on_error : {"warn", "raise"}, default "warn"
        What a recording failure does *after recording has worked once* in this fit (a full disk at hour
        ten). ``warn``: one warning, recording stops, training continues, and the warning is repeated at
        the end of fit. ``raise``: the error stops training. A failure before that (the first probe, the
        first recorded training batch) always raises: it is a setup mistake, and training on would
        record nothing.
    probe_values : None, "all" or int, default None
        Also store the probe's float16 pre-activations (all units, or this many per site), for the
        continuous mutual-information estimators of :mod:`actpat.analysis.mi`; see the recorder's
        ``store_values``. Needs ``probe``. Batch records never store values.
    module_types : sequence of module classes, default ()
        Further classes to record as activation sites (e.g. ``nn.Tanh``: its sign pattern), as for the
        recorder.

    Notes
    -----
    Fail fast: every argument is checked here. What needs the trainer or the module is checked when
    training starts (``on_train_start``: Lightning has loaded the training data, no optimizer step has
    run): the probe schedule, the probe batch size, then the first probe itself, and in batch mode the
    first recorded training batch, before its backward. A failure there raises with the cause and the
    option that fixes it. A resumed fit, whose first probe ran before the checkpoint, runs its first
    probe batch once without recording to check the same things.

    Works with both Lightning packages, ``lightning`` (``lightning.pytorch``) and ``pytorch_lightning``,
    whichever are installed: the class derives from the ``Callback`` of each, so either package's
    ``Trainer`` and ``LightningCLI`` (``class_path: actpat.callbacks.ActivationPatternCallback``) accept
    it, and either package's ``TensorBoardLogger`` gets the custom-scalars layout.

    Resuming from a checkpoint (``state_dict``, under :attr:`state_key`) continues in the same run
    directory; steps already recorded there (also those a killed process wrote after the checkpoint)
    are not recorded again, and the ``init``/``last`` references of the live Jaccard indices are re-read
    from the shards rather than stored in the checkpoint, which stays a few bytes. With
    ``probe_on_all_ranks=True`` the re-read references merge all ranks' probe records.

    The probe moves each probe batch to the module's device with Lightning's ``move_data_to_device``;
    the module's batch-transfer hooks are not called.

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
        probe_forward: Optional[Callable[[Any, Any], Any]] = None,
        probe_batch_size: Optional[int] = None,
        probe_on_all_ranks: bool = False,
        on_error: str = "warn",
        probe_values: Optional[Union[str, int]] = None,
        module_types: Sequence[type] = (),
    ) -> None:
        _check_arguments(locals())
        self.out_dir = out_dir
        self.batch_every_n_steps = batch_every_n_steps
        self.probe_every = probe_every
        self.probe_mode = probe_mode
        self.sites = sites
        self.pattern = pattern
        self.max_observations = max_observations
        self.compression = compression
        self.live_stats = live_stats
        self.probe_batch_size = probe_batch_size
        self.probe_on_all_ranks = probe_on_all_ranks
        self.on_error = on_error
        self.probe_values = probe_values
        self.module_types = tuple(module_types)
        self._probe_set = probe
        self._probe_forward_fn = probe_forward
        self._reader = BatchReader(inputs_from, labels_from, self._warn_once)
        self._selection = SiteSelection(sites)
        # Resumable state (state_dict).
        self._run_dir: Path | None = None
        self._last_probe_step = -1
        self._last_batch_step = -1
        self._init_step = -1
        self._resumed = False
        # Per-fit state.
        self._default_dir: Path | None = None
        self._rank = 0
        self._batch_floor = -1
        self._interval: Fraction | None = None
        self._probe_loader: DataLoader | None = None
        self._recorders: list[ActivationRecorder] = []
        self._batch_recorder: ActivationRecorder | None = None
        self._probe_recorder: ActivationRecorder | None = None
        self._probe_module: nn.Module | None = None
        self._probe_forward: _probe.ProbeForward | None = None
        self._capture: contextlib.ExitStack | None = None
        self._capture_step = -1
        self._observed: list[Record] = []
        self._stats: _LiveStats | None = None
        self._layout_written: set[int] = set()  # id() of the TensorBoard loggers that have the layout
        self._verified: dict[str, bool] = {}  # protocol -> recorded successfully once in this fit
        self._failed = False
        self._stop_reason: str | None = None
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
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.batch_every_n_steps and _compiled_parts(pl_module):
            raise ValueError(
                "Expected an eager module for batch-mode recording (`batch_every_n_steps > 0`), but "
                f"{type(pl_module).__name__} is compiled with torch.compile ({', '.join(_compiled_parts(pl_module))}): "
                "hooks cannot see inside a compiled graph. Record with the probe only (it runs an eager copy), or "
                "train the eager module."
            )
        if self._probe_set is not None and self.live_stats and not trainer.loggers:
            raise ValueError(
                "Expected a logger for `live_stats=True`, but the Trainer has none (logger=False). Pass a logger "
                "(TensorBoardLogger, CSVLogger, ...) or `live_stats=False`."
            )
        # trainer.log_dir broadcasts under DDP: every rank resolves it here, at the same point.
        self._default_dir = Path(self.out_dir) if self.out_dir is not None else Path(trainer.log_dir) / "activation_patterns"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._failed, self._stop_reason, self._verified, self._warned = False, None, {}, set()
        self._start(trainer, pl_module)
        if self._init_step < 0:  # "init", before the first optimizer step; a resumed fit keeps its schedule
            self._maybe_probe(trainer, pl_module)
        else:
            self._check_probe(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._batch_recorder is None or self._failed or step % self.batch_every_n_steps or step <= self._batch_floor:
            return
        with self._guard(f"recording the training batch at step {step}", "batch"):
            labels = self._reader.labels(batch, self._reader.size(batch))
            stack = contextlib.ExitStack()
            stack.enter_context(
                self._batch_recorder.capture(step, labels=labels, split=TRAIN_SPLIT, epoch=trainer.current_epoch)
            )
            self._capture, self._capture_step = stack, step
            self._last_batch_step = step

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # The forward is over: backward, the optimizer and logging run outside the capture.
        self._end_capture()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_capture()  # when no backward ran (manual optimization without one, a skipped step)
        self._log_stats(trainer, wait=False)
        if self._interval is not None and _due(trainer.global_step, self._interval):
            self._maybe_probe(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_capture()
        self._maybe_probe(trainer, pl_module)  # the end of fit
        self._log_stats(trainer, wait=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._abandon()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._end_capture()
        self._log_stats(trainer, wait=True)
        self._shutdown()
        if self._stop_reason is not None:
            self._warn_once(
                "summary",
                f"actpat: activation recording stopped early in this fit: {self._stop_reason}. The records made "
                f"before are in {self._run_dir}.",
            )

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
    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check what needs the trainer and start the recorders; every failure here raises."""
        probing = self._probe_set is not None and (trainer.is_global_zero or self.probe_on_all_ranks)
        if self._probe_set is not None:  # on every rank, so that a mistake stops every rank
            self._interval = _probe_interval(self.probe_every, trainer)
        if probing:
            batch_size = self.probe_batch_size
            if batch_size is None and not isinstance(self._probe_set, DataLoader):
                batch_size = _training_batch_size(trainer)
            self._probe_loader = _probe.probe_loader(self._probe_set, batch_size)
        if self.out_dir is not None or self._run_dir is None:
            self._run_dir = self._default_dir
        run_dir = self._run_dir
        self._rank = trainer.global_rank
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
            sites=self._selection, pattern=self.pattern, max_observations=self.max_observations,
            compression=self.compression, rank=trainer.global_rank, module_types=self.module_types,
        )
        writer = None
        if self.batch_every_n_steps:
            self._batch_recorder = ActivationRecorder(pl_module, run_dir, **options)
            self._recorders.append(self._batch_recorder)
            writer = self._batch_recorder.writer
        if probing:
            self._probe_module = _probe.probe_copy(pl_module, self.probe_mode, trainer)
            self._probe_forward = _probe.ProbeForward(self._probe_module, self._probe_forward_fn, self._reader)
            observe = self._observed.append if self.live_stats and trainer.is_global_zero else None
            self._probe_recorder = ActivationRecorder(
                self._probe_module, run_dir, **options, writer=writer, on_record=observe,
                store_values=self.probe_values,
            )
            self._recorders.append(self._probe_recorder)
            if observe is not None:
                self._stats = _LiveStats(
                    references=_references_from_disk(run_dir, self._init_step, self._last_probe_step)
                    if self._resumed else {}
                )
        for recorder in self._recorders:
            recorder.open()

    def _maybe_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if self._probe_recorder is None or self._failed or step <= self._last_probe_step:
            return
        first = not self._verified.get("probe")
        with self._guard(f"the {'first ' if first else ''}probe at step {step}", "probe"):
            self._observed.clear()
            _probe.run_probe(
                self._probe_module, pl_module, self._probe_recorder, self._probe_loader, self._reader,
                self._probe_forward, trainer.precision_plugin.forward_context,
                step=step, epoch=trainer.current_epoch,
            )
            if first:
                self._selection.check("the first probe")
                self._verified["probe"] = True
            self._last_probe_step = step
            if self._init_step < 0:
                self._init_step = step
            if self._stats is not None:
                self._stats.submit(step, list(self._observed))
            self._observed.clear()

    def _check_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resumed fit's first probe ran before the checkpoint: run its first batch once, recording nothing."""
        if self._probe_recorder is None:
            return
        with self._guard("the check of the probe on its first batch", "probe"):
            hooks = SiteHooks(
                self._probe_module, lambda site, module_type, z: None, sites=self._selection,
                module_types=self.module_types,
            )
            _probe.dry_run(
                self._probe_module, pl_module, hooks, self._probe_loader, self._reader, self._probe_forward,
                trainer.precision_plugin.forward_context,
            )
            self._selection.check("the first probe batch")
            self._verified["probe"] = True

    def _end_capture(self) -> None:
        stack, self._capture = self._capture, None
        if stack is None:
            return
        first = not self._verified.get("batch")
        with self._guard(f"recording the {'first ' if first else ''}training batch at step {self._capture_step}", "batch"):
            stack.close()
            if first:
                self._selection.check("the first recorded training batch")
                self._verified["batch"] = True

    def _log_stats(self, trainer: Trainer, wait: bool) -> None:
        if self._stats is None:
            return
        with self._guard("computing live statistics", "probe"):
            for step, metrics in self._stats.results(wait=wait):
                _log_metrics(trainer, metrics, step, self._layout_written)

    def _shutdown(self) -> None:
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            with self._guard("finalizing the shards", None):
                recorder.close()
        if self._stats is not None:
            self._stats.close(wait=True)
            self._stats = None
        self._clear()

    def _abandon(self) -> None:
        """Fit is failing anyway: end the capture and close the recorders quietly (shards are finalized)."""
        stack, self._capture = self._capture, None
        recorders, self._recorders = self._recorders, []
        for closer in ([stack.close] if stack is not None else []) + [r.close for r in recorders]:
            try:
                closer()
            except Exception:  # noqa: BLE001 - the fit's own exception is the one to report
                log.debug("actpat: error while closing after an exception", exc_info=True)
        if self._stats is not None:
            self._stats.close(wait=False)
            self._stats = None
        self._clear()

    def _clear(self) -> None:
        self._batch_recorder = self._probe_recorder = self._probe_module = self._probe_forward = None
        self._interval = self._probe_loader = None

    @contextlib.contextmanager
    def _guard(self, what: str, protocol: Optional[str]):
        """Raise a failure of a protocol that has not recorded once in this fit; after that, obey ``on_error``."""
        try:
            yield
        except Exception as exc:
            if protocol is not None and not self._verified.get(protocol):
                raise self._setup_error(what, exc) from exc
            if self.on_error == "raise":
                raise
            log.debug("actpat: recording error", exc_info=True)
            self._stop_recording(f"{what} failed with {exc!r}")

    def _setup_error(self, what: str, exc: Exception) -> Exception:
        """The error to raise for a failure before recording worked: the clearest one about its cause."""
        if isinstance(exc, _probe.ProbeForwardError):
            return exc
        if self._selection.seen:  # sites ran: a `sites` filter that selects none explains the failure best
            try:
                self._selection.check(what)
            except ValueError as sites_error:
                return sites_error
        if isinstance(exc, ValueError):
            return exc  # the library's own checks name the cause and the option that fixes it
        return RuntimeError(
            f"actpat: {what} failed with {exc!r}, before recording worked once in this fit, so fit stops here "
            "instead of training without records. Fix that cause (for an error of the shard writer: `out_dir`, "
            "its free space and permissions)."
        )

    def _stop_recording(self, reason: str) -> None:
        """Stop recording for the rest of this fit (``on_error="warn"``); the one place that knows why.

        The reason is warned about now and repeated at the end of fit (:meth:`teardown`).
        """
        self._failed = True
        self._stop_reason = reason
        # The writers are still open below: the place to store `reason` in the shards as well.
        self._warn_once(
            "error",
            f"actpat: {reason}; activation recording stops for the rest of this fit and training continues. "
            "Records written before stay readable. Pass `on_error='raise'` to stop training instead.",
        )
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
        if key in self._warned:
            return
        self._warned.add(key)
        if self._rank == 0:
            rank_zero_warn(message)
        else:  # a rank's own failure: rank_zero_warn would hide it
            log.warning("rank %d: %s", self._rank, message)


# ---------------------------------------------------------------------- arguments
def _check_arguments(args: dict[str, Any]) -> None:
    """Validate every argument of the callback (``args`` = its ``__init__``'s locals)."""
    for name in ("batch_every_n_steps",):
        _expect_int(name, args[name], 0)
    every = args["probe_every"]
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every > 0 or not math.isfinite(every):
        raise ValueError(
            "Expected `probe_every` to be a float > 0 (fraction of an epoch) or an int >= 1 (optimizer steps), "
            f"but got {every!r}."
        )
    for name, allowed in (("probe_mode", ("train", "eval")), ("pattern", schema.PATTERN_KINDS), ("on_error", ("warn", "raise"))):
        if args[name] not in allowed:
            raise ValueError(f"Expected `{name}` to be one of {tuple(allowed)}, but got {args[name]!r}.")
    if args["out_dir"] is not None and not isinstance(args["out_dir"], (str, os.PathLike)):
        raise ValueError(f"Expected `out_dir` to be None or a path, but got {type(args['out_dir']).__name__}.")
    for name in ("max_observations", "probe_batch_size"):
        if args[name] is not None:
            _expect_int(name, args[name], 1)
    for name in ("live_stats", "probe_on_all_ranks"):
        if not isinstance(args[name], bool):
            raise ValueError(f"Expected `{name}` to be True or False, but got {args[name]!r}.")
    for name in ("labels_from", "inputs_from", "probe_forward"):
        if args[name] is not None and not callable(args[name]):
            raise ValueError(f"Expected `{name}` to be None or a callable, but got {type(args[name]).__name__}.")
    values = args["probe_values"]
    if not (values is None or values == "all" or (isinstance(values, int) and not isinstance(values, bool) and values >= 1)):
        raise ValueError(f"Expected `probe_values` to be None, 'all' or an int >= 1, but got {values!r}.")
    types = args["module_types"]
    if isinstance(types, type) or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"Expected `module_types` to be a sequence of nn.Module subclasses, but got {types!r}.")
    ShardWriter(os.curdir, compression=args["compression"])  # the writer names the codecs it can write
    probe = args["probe"]
    _probe.check_probe_set(probe)
    if probe is None and args["batch_every_n_steps"] == 0:
        raise ValueError(
            "Expected something to record, but got `probe=None` and `batch_every_n_steps=0`. Pass a probe "
            "set, or `batch_every_n_steps >= 1` to record the training batches."
        )
    if probe is None and values is not None:
        raise ValueError(f"Expected a `probe` set for `probe_values={values!r}`, but got `probe=None`.")
    if isinstance(probe, DataLoader) and args["probe_batch_size"] is not None:
        raise ValueError(
            f"Expected `probe_batch_size=None` with a DataLoader probe (it keeps its own batch size "
            f"{probe.batch_size}), but got {args['probe_batch_size']}. Pass the Dataset to choose the batch size."
        )


def _expect_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")


# ---------------------------------------------------------------------- schedule
def _probe_interval(probe_every: float | int, trainer: Trainer) -> Fraction:
    """Optimizer steps between probes, exact (a fraction of an epoch need not be a whole number)."""
    if isinstance(probe_every, int):
        return Fraction(probe_every)
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            f"Expected a training DataLoader of known length for `probe_every={probe_every!r}` (a fraction of an "
            "epoch), but the epoch length is unknown (an IterableDataset?). Pass an int `probe_every` (optimizer "
            "steps)."
        )
    steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    return max(Fraction(1), Fraction(probe_every).limit_denominator(10**6) * steps_per_epoch)


def _due(step: int, interval: Fraction) -> bool:
    """True at the first step at or after each multiple of ``interval``."""
    return step > 0 and math.floor(step / interval) > math.floor((step - 1) / interval)


def _training_batch_size(trainer: Trainer) -> int:
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


def _compiled_parts(module: nn.Module) -> list[str]:
    parts = [f"{name or 'the module'}" for name, m in module.named_modules() if type(m).__name__ == "OptimizedModule"]
    if getattr(module, "_compiler_ctx", None) is not None:
        parts.insert(0, "the LightningModule (fit was given a torch.compile'd module)")
    return parts


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


def _log_metrics(trainer: Trainer, metrics: dict[str, float], step: int, layout_written: set[int]) -> None:
    """Send metrics to every logger at ``step``; a TensorBoard logger gets the layout once."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TENSORBOARD_LOGGERS) and id(logger) not in layout_written:
            logger.experiment.add_custom_scalars(_custom_scalars_layout())
            layout_written.add(id(logger))
        logger.save()


def _custom_scalars_layout() -> dict:
    """One multiline chart per live metric, all sites (regex), for TensorBoard's Custom Scalars."""
    return {"actpat (live)": {metric: ["Multiline", [rf"actpat/{metric}/.*"]] for metric in LIVE_METRICS}}


__all__ = ["ActivationPatternCallback", "LIVE_METRICS"]

"""ActivationPatternCallback: record activation patterns during ``Trainer.fit`` (SPEC section 6).

A thin adapter: its Lightning hooks decide *when*. The probe protocol runs in
:class:`~actpat.recorder.prober.Prober` (the same one a plain loop or a replay uses), batch mode in
:class:`~actpat.recorder.ActivationRecorder`, the live statistics in
:func:`actpat.analysis.live.live_measures`. Lightning's own parts are in :mod:`actpat.recorder.lightning_probe`
(the probe forward rule of a LightningModule, shared with replay), :mod:`actpat.callbacks._trainer` (what is asked of the
Trainer, and its loggers) and :mod:`actpat.callbacks._lightning` (the names of either package).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from actpat.callbacks import _trainer
from actpat.callbacks._arguments import check_arguments
from actpat.callbacks._lightning import CALLBACK_BASES, move_data_to_device, rank_zero_warn
from actpat.recorder import lightning_probe
from actpat.recorder.batches import BatchReader
from actpat.recorder.hooks import SiteHooks
from actpat.recorder.live_stats import LiveStatsError
from actpat.recorder.probe_set import DEFAULT_CACHE_BYTES
from actpat.recorder.prober import (
    PROBE_SPLIT, ProbeForwardError, Prober, existing_run, recorded_steps, resume_point, unwritten_note,
)
from actpat.recorder.recorder import ActivationRecorder
from actpat.recorder.selection import SiteSelection, SiteSelectionError
from actpat.recorder.shards import ShardWriter, scan_existing, shard_ranks

# Either package's Trainer and LightningModule (see actpat.callbacks._lightning).
Trainer = LightningModule = Any

log = logging.getLogger(__name__)

#: Split name of recorded training batches (probe records use :data:`PROBE_SPLIT`).
TRAIN_SPLIT = "train"
_STATE_VERSION = 1


class ActivationPatternCallback(*CALLBACK_BASES):
    """Record binary activation patterns of a LightningModule while it trains.

    Two protocols (SPEC section 6), usable together, into one run directory of shards:

    - **probe**: before the first optimizer step, every ``probe_every`` and at the end of fit, a fixed
      probe set is run under ``no_grad`` through the module's weights of that step (split ``"probe"``),
      by :class:`~actpat.recorder.prober.Prober`. The real module's weights, BatchNorm statistics,
      gradients, train/eval flags and every RNG stream (torch CPU/CUDA, numpy, python) are left as they
      were, so a run with the callback trains bit-identically to one without it.
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
        Run directory. Default: ``<trainer.log_dir>/activation_patterns``, next to the TensorBoard logs (under
        ``trainer.default_root_dir`` where the logger has no directory, as under ``fast_dev_run``);
        a resumed fit keeps the directory stored in the checkpoint.
    batch_every_n_steps : int, default 0
        Record the training batches every this many optimizer steps; 0 turns batch mode off.
    probe : Dataset or DataLoader, optional
        The probe set, without augmentation. A Dataset is wrapped in a ``DataLoader`` with
        ``shuffle=False`` and ``probe_batch_size``; a DataLoader must not shuffle. None turns probing off.
    probe_every : float or int, default 0.2
        Float: fraction of an epoch of optimizer steps (0.2, five probes per epoch, as Hartmann et al.
        2021); a probe runs at the first step at or after each multiple of it. Needs a training loader
        of known length: with an ``IterableDataset`` pass an int. An epoch is taken as the training
        batches / ``accumulate_grad_batches`` optimizer steps; an epoch that makes another number (manual
        optimization stepping two optimizers per batch, skipped steps) is warned of. Int: optimizer steps.
    probe_mode : {"train", "eval"}, default "train"
        ``train``: BatchNorm normalizes with the probe batch's statistics (as the paper); ``eval``: with
        the running statistics. Every other module runs in eval mode in both, so dropout of every kind
        (``nn.Dropout``, ``F.dropout(x, p, self.training)``, DropPath) is off and a probe is a function of
        the weights; a forward that draws random numbers all the same is warned of once.
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
        After each probe, log exact per-site statistics (:data:`actpat.analysis.live.LIVE_METRICS`) to the trainer's loggers
        as ``actpat/<metric>/<site>`` at the probe's step, with a TensorBoard custom-scalars layout. They
        are counted on a bounded background worker that training never waits for, a child process
        that shares no interpreter lock with training (:mod:`actpat.recorder.live_stats`).
    n_classes : int, "probe" or None, default None
        The dataset's class count for the live statistics' ``conditional_entropy_nominal`` and
        ``mutual_information_nominal`` (the reference implementation's convention); ``"probe"`` takes
        the number of classes present in the probe set. None: those two are not logged.
    labels_from, inputs_from : callable(batch), optional
        Per-sample integer class labels of a batch (probe and training batches; one-hot is recorded as
        the argmax), and what the default probe forward feeds to ``module(inputs)``; see
        :mod:`actpat.recorder.batches` for the default rules (``batch[1]``/``batch[0]`` of a tuple,
        known keys of a dict). Float labels or another shape are an error naming the shape.
    mask_from : callable(batch), optional
        The observations of a batch to record (probe and training batches): a bool ``(N, *positions)``, True
        to keep, such as the real tokens of padded sequences (``lambda batch: ~batch["padding_mask"]``), so that
        padding counts in no measure; sites whose positions have another shape are recorded whole (see the
        ``mask`` of :meth:`actpat.recorder.ActivationRecorder.capture`). Default: every observation.
    probe_forward : callable(module, batch), optional
        How a probe batch runs through the probed ``module`` (the batch already on its device, under
        ``no_grad`` and the trainer's precision context). Default: ``module(inputs)`` when the
        LightningModule's class overrides ``forward``; otherwise ``module.training_step(batch, 0)`` on
        a module made inert (:func:`actpat.recorder.lightning_probe.inert`: logging, optimizers, schedulers and
        ``manual_backward`` do nothing, ``self.trainer`` is a read-only view), so manual optimization
        works too. Collective calls (``self.all_gather``) are not supported: pass ``probe_forward``.
    probe_batch_size : int, optional
        Batch size when ``probe`` is a Dataset. Default: the training DataLoader's batch size (in
        ``train`` mode the BatchNorm statistics depend on it; the paper probes with the training batch
        size). Not allowed with a DataLoader probe, which keeps its own.
    probe_on_all_ranks : bool, default False
        Under DDP the probe runs on global rank 0 only; True runs it on every rank (each rank writes its
        own shards, which the reader pools): for a probe DataLoader whose sampler gives each rank its own
        part. With a probe Dataset it is an error: every rank would probe the whole set, counted once per
        rank. Batch mode always records on every rank.
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
    probe_copy : bool, default True
        True: probe an eager copy of the module, synced in place before each probe (a second set of
        weights in memory; works with ``torch.compile``). False: probe the module itself with its
        buffers, train/eval flags and RNG streams saved and restored (no second copy; an eager module
        only). See :class:`~actpat.recorder.prober.Prober`.
    probe_cache_bytes : int, default 256 MiB
        Keep the probe set on the module's device after the first probe if it fits in this many bytes;
        0 reads it from its loader at every probe.

    Notes
    -----
    Fail fast: every argument is checked here. What needs the trainer or the module is checked when
    training starts (``on_train_start``: Lightning has loaded the training data, no optimizer step has
    run): the probe schedule, the probe batch size, then the first probe itself, and in batch mode the
    first recorded training batch, before its backward. A failure there raises with the cause and the
    option that fixes it. A resumed fit, whose first probe ran before the checkpoint, runs its first
    probe batch once without recording to check the same things.

    Works with both Lightning packages, ``lightning`` (``lightning.pytorch``) and ``pytorch_lightning``:
    the class derives from the ``Callback`` of each installed one (see :mod:`actpat.callbacks._lightning`).

    Resuming from a checkpoint (``state_dict``, under :attr:`state_key`) continues in the same run
    directory without recording a step twice; the live statistics' references are re-read from the
    shards (merging all ranks' with ``probe_on_all_ranks=True``), so the checkpoint stays a few bytes.

    Probe batches move to the module's device with Lightning's ``move_data_to_device`` (the module's
    batch-transfer hooks are not called). Batch mode records ``torch.compile``'d modules (compiled
    children, or a compiled LightningModule given to fit) with the eager model's site names and bits;
    ``probe_copy=False`` needs the eager module and raises at setup otherwise.

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
        pattern: Optional[str] = None,
        max_observations: Optional[int] = None,
        compression: Optional[str] = None,
        live_stats: bool = True,
        labels_from: Optional[Callable[[Any], Any]] = None,
        *,
        n_classes: Optional[Union[int, str]] = None,
        inputs_from: Optional[Callable[[Any], Any]] = None,
        mask_from: Optional[Callable[[Any], Any]] = None,
        probe_forward: Optional[Callable[[Any, Any], Any]] = None,
        probe_batch_size: Optional[int] = None,
        probe_on_all_ranks: bool = False,
        on_error: str = "warn",
        probe_values: Optional[Union[str, int]] = None,
        module_types: Sequence[type] = (),
        probe_copy: bool = True,
        probe_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        check_arguments(locals())
        self.out_dir = out_dir
        self.batch_every_n_steps = batch_every_n_steps
        self.probe_every = probe_every
        self.probe_mode = probe_mode
        self.sites = sites
        self.pattern = pattern
        self.max_observations = max_observations
        self.compression = compression
        self.live_stats = live_stats
        self.n_classes = n_classes
        self.probe_batch_size = probe_batch_size
        self.probe_on_all_ranks = probe_on_all_ranks
        self.on_error = on_error
        self.probe_values = probe_values
        self.module_types = tuple(module_types)
        self.probe_copy = probe_copy
        self.probe_cache_bytes = probe_cache_bytes
        self._probe_set = probe
        self._probe_forward = probe_forward
        self._inputs_from, self._labels_from, self._mask_from = inputs_from, labels_from, mask_from
        self._reader = BatchReader(inputs_from, labels_from, self._warn_once, mask_from)
        self._selection = SiteSelection(sites)  # of batch mode; the prober checks its own
        self._state_key: tuple[tuple, str] | None = None
        # Resumable state (state_dict).
        self._run_dir: Path | None = None
        self._last_batch_step = -1
        self._probe_state: dict[str, int] = {"last_probe_step": -1, "init_step": -1}  # the prober's, between fits
        self._resumed = False
        self._continuing = False
        self._other_module = False  # this Trainer fitted another module before: this fit is a new one
        self._module: weakref.ref | None = None
        self._trainer: weakref.ref | None = None  # of the last fit: the same Trainer fitting again continues
        # Per-fit state.
        self._default_dir: Path | None = None
        self._rank = 0
        self._batch_floor = -1
        self._batch_recorder: ActivationRecorder | None = None
        self._prober: Prober | None = None
        self._capture: contextlib.ExitStack | None = None
        # Probe mode alone: the hooks that see which sites the first training step calls (see _compare_sites).
        self._site_check: SiteHooks | None = None
        self._sites_compared = False
        # The writer holding this fit's records until its first training batch is done (see ShardWriter.hold).
        self._holding: Optional[ShardWriter] = None
        self._batch_skipped = False  # while a capture of a batch the module skipped ends
        self._capture_step = -1
        self._capture_records = True  # whether the open capture records (False: it only checks)
        # (step, epoch) of the recorded training step that an optimizer step has yet to end (accumulation)
        self._open_step: tuple[int, int] | None = None
        self._batch_checked = False  # a training batch of this fit has passed the setup checks
        self._batch_verified = False  # a training batch of this fit has been recorded
        self._failed = False
        self._stop_reason: str | None = None
        self._warned: set[str] = set()
        # Whether this fit reached training (Lightning skips on_train_start when it has no batch to train on), or
        # raised.
        self._trained = self._raised = False
        # A fractional probe_every's optimizer steps per epoch, as assumed; the epoch's first step and batches so far.
        self._steps_per_epoch: int | None = None
        self._epoch_start, self._epoch_batches = 0, 0

    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call of every step (its profiler's action name): made once per
        # setting, not formatted each time (about 1% of a small model's step).
        # probe_every's type too: 1 == 1.0, but an int counts optimizer steps and a float epochs.
        settings = (self.out_dir, self.batch_every_n_steps, self.probe_every, type(self.probe_every), self.probe_mode)
        if self._state_key is None or self._state_key[0] != settings:
            self._state_key = settings, self._generate_state_key(
                out_dir=None if self.out_dir is None else str(self.out_dir),
                batch_every_n_steps=self.batch_every_n_steps,
                probe_every=self.probe_every,
                probe_mode=self.probe_mode,
            )
        return self._state_key[1]

    @property
    def run_dir(self) -> Path | None:
        """The run directory of the shards, known once training started."""
        return self._run_dir

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._trainer is not None and self._trainer() is not trainer:
            # Another Trainer (a seed sweep, a re-run notebook cell) is a new run: its own directory and
            # schedule. A checkpoint it resumes from restores this state after setup.
            self._run_dir, self._last_batch_step = None, -1
            self._probe_state = {"last_probe_step": -1, "init_step": -1}
        # The same Trainer fitting the same module again (for more epochs) goes on from this state, unless it
        # resumes from a checkpoint (whose state, if it holds one, is loaded after setup).
        self._continuing = self._run_dir is not None and self._module is not None and self._module() is pl_module
        self._other_module = self._run_dir is not None and self._module is not None and not self._continuing
        self._resumed = self._trained = self._raised = False
        self._warned = set()  # (on_train_start, which resets it too, never runs in a fit without training)
        self._trainer, self._module = weakref.ref(trainer), weakref.ref(pl_module)
        compiled = _trainer.compiled_parts(pl_module)
        if self._probe_set is not None and not self.probe_copy and compiled:
            raise ValueError(
                f"Expected an eager module for `probe_copy=False`, but {type(pl_module).__name__} is compiled with "
                f"torch.compile ({', '.join(compiled)}): the probe would run the compiled graph, whose saved and "
                "restored state the probe cannot vouch for. Pass `probe_copy=True` (the probe then runs an eager "
                "copy), or train the eager module."
            )
        if self._probe_set is not None and self.live_stats and not trainer.loggers:
            raise ValueError(
                "Expected a logger for `live_stats=True`, but the Trainer has none (logger=False). Pass a logger "
                "(TensorBoardLogger, CSVLogger, ...) or `live_stats=False`."
            )
        # trainer.log_dir broadcasts under DDP: every rank resolves it here, at the same point. It is None where
        # the logger has no directory (fast_dev_run's stand-in logger): the Trainer's root directory instead.
        if self.out_dir is not None:
            self._default_dir = Path(self.out_dir)
        else:
            self._default_dir = Path(trainer.log_dir or trainer.default_root_dir) / "activation_patterns"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._failed, self._stop_reason, self._warned, self._open_step = False, None, set(), None
        self._batch_checked = self._batch_verified = self._sites_compared = False
        self._selection.seen.clear()  # the sites of this fit's module alone
        self._trained = True
        self._start(trainer, pl_module)
        self._probe(trainer)  # "init" before the first optimizer step; a resumed fit checks its probe and goes on

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if (self._batch_recorder is None and self._prober is not None and not self._sites_compared and not self._failed
                and self._site_check is None):  # (still attached: the module skipped the batch it watched)
            if not _trainer.compiled_parts(pl_module):  # (hooks would stay in a compiled graph)
                self._site_check = SiteHooks(pl_module, lambda *call: None, sites=self._selection,
                                             module_types=self.module_types)
                self._site_check.attach()
        if self._batch_recorder is None or self._failed:
            return
        due = self._on_batch_schedule(step) and step > self._batch_floor
        if not due and self._batch_checked:
            return
        # A first batch that is not recorded (a resumed fit) is still checked, recording nothing, so that
        # a setup mistake stops fit before its first optimizer step here too.
        # One batch per optimizer step: its capture is the whole step. Otherwise (gradient accumulation,
        # manual optimization) the step ends once the optimizer has stepped (on_train_batch_end).
        whole = trainer.accumulate_grad_batches == 1 and pl_module.automatic_optimization
        with self._guard(f"recording the training batch at step {step}", "batch"):
            labels = self._reader.labels(batch, self._reader.size(batch))
            stack = contextlib.ExitStack()
            stack.enter_context(
                self._batch_recorder.capture(
                    step, labels=labels, split=TRAIN_SPLIT, epoch=trainer.current_epoch,
                    check=None if self._batch_checked else self._check_first_batch, record=due, ends_step=whole,
                    mask=self._reader.mask(batch) if due or not self._batch_checked else None,
                )
            )
            self._capture, self._capture_step, self._capture_records = stack, step, due
            if due:
                self._last_batch_step = step
                self._open_step = None if whole else (step, trainer.current_epoch)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        # The forward is over: backward, the optimizer and logging run outside the capture.
        self._end_capture()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_capture()  # when no backward ran (manual optimization without one, a skipped step)
        self._compare_sites()
        if self._holding is not None:
            holding, self._holding = self._holding, None
            with self._guard("writing the records made before the first training batch was done", None):
                holding.release()
        if self._open_step is not None and trainer.global_step > self._open_step[0]:
            self._end_step()
        self._epoch_batches += 1
        self._probe(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start, self._epoch_batches = trainer.global_step, 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A capture still open: its batch was skipped (the module's `on_train_batch_start` returned -1, which ends
        # the epoch), after the callback's own hook opened it.
        self._end_capture(skipped=True)
        assumed, made = self._steps_per_epoch, trainer.global_step - self._epoch_start
        if self._prober is None or assumed is None or self._epoch_batches != trainer.num_training_batches:
            return  # an int probe_every, or an epoch not run whole (resumed in its middle, stopped)
        if made == assumed:
            return
        batches = _trainer.steps_per_epoch(trainer, self.probe_every)  # what this epoch's batches make
        why = (f"its batches / accumulate_grad_batches make {batches}: manual optimization stepping other than one "
               "optimizer per batch, or skipped steps" if made != batches else "the epoch length changed")
        self._warn_once(
            "steps-per-epoch",
            f"actpat: `probe_every={self.probe_every!r}` is a fraction of an epoch, taken as {assumed} optimizer steps "
            f"(the first epoch's training batches / accumulate_grad_batches), but epoch {trainer.current_epoch} made "
            f"{made} ({why}): probes are {float(self._prober.interval):g} steps apart. Pass an int `probe_every` "
            "(optimizer steps).",
            run_wide=True,
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_capture()
        self._end_step()  # the fit ended normally: a step it left open is whole
        self._probe(trainer, final=True)  # the end of fit

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._raised = True
        self._close(abandon=True, error=exception)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._end_capture()
        self._close(abandon=False)
        if not self._trained and not self._raised:
            self._warn_once(
                "no training",
                "actpat: this fit ran no training (max_steps=0 or max_epochs=0, limit_train_batches=0, an empty "
                "train dataloader, or a fit resumed from a checkpoint at its end), so it recorded no activation "
                "pattern, not even the init probe. Records of earlier fits, if any, are in "
                f"{self._run_dir or self._default_dir}.",
                run_wide=True,
            )
        if self._stop_reason is not None:
            self._warn_once(
                "summary",
                f"actpat: activation recording stopped early in this fit: {self._stop_reason}. The records made "
                f"before are in {self._run_dir}.",
            )

    def state_dict(self) -> dict[str, Any]:
        probe_state = self._prober.state_dict() if self._prober is not None else self._probe_state
        return {
            "version": _STATE_VERSION,
            "run_dir": None if self._run_dir is None else str(self._run_dir),
            "last_batch_step": self._last_batch_step,
            "last_probe_step": probe_state["last_probe_step"],
            "init_step": probe_state["init_step"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        run_dir = state_dict.get("run_dir")
        self._run_dir = None if run_dir is None else Path(run_dir)
        self._last_batch_step = int(state_dict.get("last_batch_step", -1))
        self._probe_state = {key: int(state_dict.get(key, -1)) for key in ("last_probe_step", "init_step")}
        self._resumed = True

    # ------------------------------------------------------------------ helpers
    def _unwritten_batch_steps(self, recorded: list[int]) -> list[int]:
        """The scheduled batch steps after the last one on disk, up to the last the checkpoint says was recorded:
        what a kill loses is the tail of the records (gaps before it are data-dependent sites, not losses)."""
        last = self._last_batch_step
        on_disk = max((step for step in recorded if step <= last), default=-1)
        return [step for step in range(on_disk + 1, last + 1) if self._on_batch_schedule(step)]

    def _on_batch_schedule(self, step: int) -> bool:
        """Whether batch mode records the training batches of optimizer step ``step``."""
        return step % self.batch_every_n_steps == 0

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check what needs the trainer and start recording; every failure here raises."""
        probing = self._probe_set is not None and (trainer.is_global_zero or self.probe_on_all_ranks)
        if probing and self.probe_on_all_ranks and trainer.world_size > 1 and not isinstance(self._probe_set, DataLoader):
            raise ValueError(
                "Expected `probe_on_all_ranks=True` with a probe DataLoader whose sampler gives each rank its own part, "
                f"but got a Dataset: each of the {trainer.world_size} ranks would probe it whole and write its records, "
                f"which the reader pools, counting every probe observation {trainer.world_size} times. Drop "
                "`probe_on_all_ranks` (rank 0 probes the whole set), or pass such a DataLoader."
            )
        per_epoch = None
        if self._probe_set is not None:  # on every rank, so that a mistake stops every rank
            per_epoch = _trainer.steps_per_epoch(trainer, self.probe_every)
        self._steps_per_epoch = per_epoch
        if self.out_dir is not None or self._run_dir is None:
            self._run_dir = self._default_dir
        run_dir = self._run_dir
        self._rank = trainer.global_rank
        if self._continuing and not self._resumed and not getattr(trainer, "ckpt_path", None):
            self._resumed = True  # this state is the one a checkpoint of the last fit would hold
        if not self._resumed and getattr(trainer, "ckpt_path", None):
            self._warn_once(
                "no-state",
                f"actpat: this fit resumes from {trainer.ckpt_path}, which holds no state of this callback under its "
                f"key {self.state_key!r} (Lightning finds a callback's state by its class and arguments): it records "
                "as a new fit. To go on with the recording of the fit that saved the checkpoint, create the callback "
                "with that fit's arguments.",
            )
        existing = None  # the run this fit continues, opened once for the training side and the prober
        if self._resumed:
            existing = existing_run(run_dir, warn=trainer.is_global_zero)  # one rank warns of the run's losses
            recorded = recorded_steps(existing, TRAIN_SPLIT)
            if self.batch_every_n_steps:
                note = unwritten_note(run_dir, TRAIN_SPLIT, self._unwritten_batch_steps(recorded), recorded)
                if note:
                    self._warn_once("unwritten-train", note, run_wide=True)
            self._last_batch_step, note = resume_point(
                run_dir, TRAIN_SPLIT, self._last_batch_step, recorded, resume_step=trainer.global_step
            )
            if note:
                self._warn_once("ahead-train", note, run_wide=True)
        elif trainer.global_rank in shard_ranks(run_dir):
            self._refuse_pooling(run_dir, trainer, probing)
            self._warn_once(
                "existing",
                f"actpat: {run_dir} already holds shards of rank {trainer.global_rank} (of another run?); this fit's "
                "records, in other splits or later steps, are added beside them. Pass another `out_dir` to keep runs "
                "apart.",
            )
        self._batch_floor = self._last_batch_step
        options = dict(pattern=self.pattern, max_observations=self.max_observations, compression=self.compression,
                       rank=trainer.global_rank, module_types=self.module_types)
        writer = None
        if self.batch_every_n_steps:
            self._batch_recorder = ActivationRecorder(pl_module, run_dir, sites=self._selection, **options)
            self._batch_recorder.open()
            writer = self._batch_recorder.writer
        if probing and writer is None:
            writer = ShardWriter(run_dir, rank=trainer.global_rank, compression=self.compression)
        if writer is not None:
            # A fit that fails before its first training batch is done (a setup mistake: inputs that do not fit the
            # model, a probe batch of one sample under BatchNorm) leaves `out_dir` to the corrected run (see _close).
            writer.hold()
            self._holding = writer
        if probing:
            batch_size = self.probe_batch_size
            if batch_size is None and not isinstance(self._probe_set, DataLoader):
                batch_size = _trainer.training_batch_size(trainer)
            live = self.live_stats and trainer.is_global_zero
            if live:
                from actpat.analysis.live import live_measures  # the analysis package is heavy: import when used

                live_measures = functools.partial(live_measures, n_classes=self.n_classes)
            self._prober = Prober(
                pl_module, self._probe_set, run_dir, self.probe_every, steps_per_epoch=per_epoch,
                mode=self.probe_mode, copy=self.probe_copy, batch_size=batch_size, sites=self.sites,
                store_values=self.probe_values, inputs_from=self._inputs_from, labels_from=self._labels_from,
                mask_from=self._mask_from,
                forward=lightning_probe.lightning_forward(pl_module, self._probe_forward, self._reader,
                                                          trainer.precision_plugin.forward_context),
                context=lambda module: lightning_probe.inert(module, trainer),
                to_device=functools.partial(_to_device, trainer.precision_plugin),
                cache_bytes=self.probe_cache_bytes, stats=live_measures if live else None,
                on_stats=_trainer.LiveLog(trainer) if live else None,
                writer=writer, notify=self._warn_once, **options,
            )
            if self._resumed or self._probe_state["init_step"] >= 0:  # a resumed fit, or another fit of this callback
                self._prober.load_state_dict(self._probe_state, step=trainer.global_step, run=existing)

    def _probe(self, trainer: Trainer, final: bool = False) -> None:
        """Let the prober probe if due (always at the end of fit) and log the statistics it finished."""
        prober = self._prober
        if prober is None or self._failed:
            return
        step = trainer.global_step
        first = "first " if not prober.verified else ""
        with self._guard(f"the {first}probe at step {step}", "probe"):
            try:
                if final:
                    prober.probe(step, trainer.current_epoch)
                    prober.poll(wait=True)
                else:
                    prober.maybe(step, trainer.current_epoch)
            except LiveStatsError as exc:
                if self.on_error == "raise":
                    raise
                prober.stop_stats()  # the probes themselves are recorded: keep recording them
                self._warn_once(
                    "live-stats",
                    f"actpat: {exc}\nLive statistics stop for the rest of this fit; the probes go on being recorded "
                    "(`actpat analyze` computes every measure from the shards).",
                )

    def _end_capture(self, skipped: bool = False) -> None:
        """End the open capture; ``skipped``: its batch was skipped by the module (no forward ran, nothing checked)."""
        stack, self._capture = self._capture, None
        if stack is None:
            return
        first = "" if self._batch_verified else "first "
        what = "recording" if self._capture_records else "checking"
        with self._guard(f"{what} the {first}training batch at step {self._capture_step}", "batch"):
            self._batch_skipped = skipped
            try:
                stack.close()
            finally:
                self._batch_skipped = False
            if skipped:
                return
            self._batch_checked = True
            # Only a recorded batch shows that recording works: until then a failure stops fit.
            if self._capture_records:
                self._batch_verified = True

    def _refuse_pooling(self, run_dir: Path, trainer: Trainer, probing: bool) -> None:
        """A fit without this callback's state into a directory whose records it would be pooled with fails
        here, before training, naming the likely cause: by the writer's own rule, which would refuse its
        first record (this rank's last step per split, read from the records tables alone)."""
        recorded_before = scan_existing(run_dir, trainer.global_rank)[0]
        for split in [PROBE_SPLIT] * probing + [TRAIN_SPLIT] * bool(self.batch_every_n_steps):
            last = recorded_before.get(split, -1)
            if last >= trainer.global_step:
                cause = (
                    f"the checkpoint it resumes from ({trainer.ckpt_path}) holds no state of this callback, which "
                    "Lightning finds by the callback's class and arguments: were they changed?"
                    if getattr(trainer, "ckpt_path", None)
                    else "this Trainer fitted another module before, so this is a new fit" if self._other_module
                    else "this is a new fit"
                )
                raise ValueError(
                    f"Expected {run_dir} to hold no {split} records at or after step {trainer.global_step}, where "
                    f"this fit starts, but it holds them up to step {last}, and this callback has no state to go on "
                    f"from them: {cause}. Pass another `out_dir`, or create the callback with the arguments of the "
                    "fit that wrote it and resume from that fit's checkpoint."
                )

    def _compare_sites(self) -> None:
        """After the first training step: warn of sites it called that the probe forward does not (a head applied in
        `training_step`), which the probe would silently never record."""
        hooks, self._site_check = self._site_check, None
        if hooks is not None:
            hooks.remove()
        if self._sites_compared or self._prober is None or self._failed:
            return
        self._sites_compared = True
        missing = self._prober.unprobed([name for name, selected in self._selection.seen.items() if selected])
        if missing:
            self._warn_once(
                "unprobed",
                f"actpat: site(s) {missing} ran in the first training step but not in the probe forward "
                f"({self._prober.forward_rule}), so no probe records them: a head applied in `training_step` (to probe "
                "it, pass a probe forward that runs it too, `probe_forward=`: say, `lambda module, batch: "
                "module.head(module(batch[0]))`), or a branch that runs only when `self.training` (auxiliary logits: the "
                "probe runs in eval mode and never reaches it; leave it out with `sites=`). "
                + ("Batch mode records them from the training batches." if self._batch_recorder is not None else
                   "Batch mode (`batch_every_n_steps=`) would record them from the training batches."),
                run_wide=True,
            )

    def _end_step(self) -> None:
        open_step, self._open_step = self._open_step, None
        if open_step is None or self._batch_recorder is None or self._failed:
            return
        step, epoch = open_step
        with self._guard(f"recording the end of training step {step}", "batch"):
            self._batch_recorder.end_step(step, split=TRAIN_SPLIT, epoch=epoch)

    def _check_first_batch(self) -> None:
        # Run by the recorder before the batch's records are written: a `sites` mistake writes no shard.
        if not self._batch_skipped:
            self._selection.check("the first training batch", functools.partial(self._warn_once, run_wide=True))

    def _close(self, abandon: bool, error: Optional[BaseException] = None) -> None:
        """Finalize the shards. When fit is failing anyway (``abandon``), quietly and without waiting for stats;
        ``error``: fit's exception."""
        stack, self._capture = self._capture, None
        prober, self._prober = self._prober, None
        if self._site_check is not None:
            self._site_check.remove()
            self._site_check = None
        closers = []
        if stack is not None:
            # A capture open when fit fails ends with fit's exception, so that the batch whose forward raised is
            # recorded as cut short: its step never ended, and none of a first batch's records is written.
            closers.append(
                (lambda: stack.__exit__(type(error), error, error.__traceback__)) if error is not None else stack.close
            )
        holding, self._holding = self._holding, None
        if holding is not None and error is not None:
            closers.append(holding.discard_held)  # fit failed before its first batch was done: none of its records
        closers += [lambda: prober.close(wait=not abandon)] if prober is not None else []
        closers += [self._batch_recorder.close] if self._batch_recorder is not None else []
        self._batch_recorder = None
        if prober is not None:
            self._probe_state = prober.state_dict()
        for closer in closers:
            if abandon:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - the fit's own exception is the one to report
                    log.debug("actpat: error while closing after an exception", exc_info=True)
            else:
                with self._guard("finalizing the shards", None):
                    closer()

    @contextlib.contextmanager
    def _guard(self, what: str, protocol: Optional[str]):
        """Raise a failure of a protocol that has not recorded once in this fit; after that, obey ``on_error``."""
        try:
            yield
        except Exception as exc:
            if protocol is not None and not self._verified(protocol):
                error = self._setup_error(what, exc)
                if error is exc:
                    raise
                raise error from exc
            if self.on_error == "raise":
                raise
            log.debug("actpat: recording error", exc_info=True)
            self._stop_recording(f"{what} failed with {exc!r}")

    def _verified(self, protocol: str) -> bool:
        if protocol == "probe":
            return self._prober is not None and self._prober.verified
        return self._batch_verified

    def _setup_error(self, what: str, exc: Exception) -> Exception:
        """The error to raise for a failure before recording worked: the clearest one about its cause."""
        if isinstance(exc, (ProbeForwardError, SiteSelectionError)):
            return exc
        if self._selection.seen:  # batch-mode sites ran: a `sites` filter that selects none explains it best
            problem = self._selection.problem(what)
            if problem is not None:
                return problem
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
        writers = [self._batch_recorder.writer if self._batch_recorder else None, self._prober.writer if self._prober else None]
        for writer in {id(w): w for w in writers if w is not None}.values():
            writer.record_stop(reason)  # `actpat info` shows it; never raises
        self._warn_once(
            "error",
            f"actpat: {reason}; activation recording stops for the rest of this fit and training continues. "
            "Shards finalized before stay readable; of the open one, what verifies (`actpat info` says what was "
            "lost). Pass `on_error='raise'` to stop training instead.",
        )
        self._close(abandon=True)

    def _warn_once(self, key: str, message: str, run_wide: bool = False) -> None:
        """Warn once per callback; of the run as a whole (every rank reads the same) on rank 0 alone."""
        if key in self._warned:
            return
        self._warned.add(key)
        if self._rank == 0 or run_wide:
            rank_zero_warn(message)
        else:  # a rank's own failure: rank_zero_warn would hide it
            log.warning("rank %d: %s", self._rank, message)


def _to_device(precision: Any, batch: Any, device: torch.device) -> Any:
    """A probe batch on the device, its float tensors converted by the precision as Lightning converts a training
    batch (``64-true``, ``bf16-true``: weights of that dtype refuse float32 inputs)."""
    return precision.convert_input(move_data_to_device(batch, device))


__all__ = ["ActivationPatternCallback", "PROBE_SPLIT", "TRAIN_SPLIT"]

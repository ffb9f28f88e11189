"""Prober: the probe protocol of SPEC section 6 in any training loop.

One implementation serves three entry points: a plain PyTorch or Fabric loop calls
:meth:`Prober.maybe` after each optimizer step; the Lightning callback calls it from its hooks;
:func:`~actpat.recorder.checkpoint_replay.replay` calls :meth:`Prober.probe` once per saved checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from actpat.recorder import arguments, batches, schema
from actpat.recorder.batches import INPUT_KEYS, BatchReader, describe, tensors
from actpat.recorder.hooks import SiteHooks
from actpat.recorder.live_stats import LiveStats, StatsFunction
from actpat.recorder.probe_module import MODES, ProbeModule, rng_states, same_rng_states
from actpat.recorder.probe_set import DEFAULT_CACHE_BYTES, ProbeBatches, check_probe_set, probe_loader
from actpat.recorder.reader import Run, open_run
from actpat.recorder.recorder import ActivationRecorder
from actpat.recorder.selection import SiteSelection, SiteSelectionError
from actpat.recorder.shards import Record, ShardWriter, shard_ranks

log = logging.getLogger(__name__)

#: Split name of probe records.
PROBE_SPLIT = "probe"
_STATE_VERSION = 1


class ProbeForwardError(RuntimeError):
    """The probe forward raised; the message says which rule ran and which option changes it."""


class Prober:
    """Run a fixed probe set through a model on a schedule and record its activation patterns.

    The probe protocol of Hartmann et al. 2021 (SPEC section 6): before the first optimizer step and
    then every ``every``, the whole probe set runs under ``no_grad`` through the model's weights of that
    step, and the binary patterns of every activation site go to shards (split ``"probe"``) with each
    observation's sample id (its index in the probe set) and label. The model being trained is left
    untouched: its weights, BatchNorm statistics, gradients, train/eval flags and every RNG stream
    (torch CPU and accelerator, numpy, python), so training with probes is bit-identical to training
    without.

    Parameters
    ----------
    model : nn.Module
        The model being trained (for Fabric, the module given to ``fabric.setup``, not its wrapper).
    probe : Dataset or DataLoader
        The probe set, without augmentation. A Dataset is batched in order by ``batch_size``; a
        DataLoader must not shuffle.
    out_dir : path
        Run directory of the shards (created if missing).
    every : float or int, default 0.2
        Float: fraction of an epoch (needs ``steps_per_epoch``); 0.2 is five probes per epoch, as
        Hartmann et al. 2021. Int: optimizer steps. A probe runs at the first step at or after each
        multiple of it.
    steps_per_epoch : int, optional
        Optimizer steps per epoch (``len(train_loader)``, divided by the gradient-accumulation factor).
    mode : {"train", "eval"}, default "train"
        ``train``: BatchNorm normalizes with each probe batch's statistics (as the paper; use the
        training batch size); ``eval``: with the running statistics. Every other module is in eval mode
        in both: dropout (modules, ``F.dropout(x, p, self.training)``, DropPath) is off. A forward that
        still draws from the global RNGs (noise regardless of ``self.training``) is warned of once.
    copy : bool, default True
        True: probe an eager copy of the model whose weights are overwritten in place before each
        probe; it costs a second set of weights in memory and never touches the model. False: probe
        the model itself, saving and restoring its buffers and train/eval flags around each probe; it
        costs only a copy of the buffers. See Notes.
    batch_size : int, optional
        Probe batch size for a Dataset probe (required then; not allowed with a DataLoader).
    sites, pattern, max_observations, compression, module_types
        As for :class:`~actpat.recorder.ActivationRecorder`; ``compression`` defaults to None here.
    store_values : None, "all" or int, default None
        Also store float16 pre-activations of the probe (all units, or this many per site).
    inputs_from, labels_from : callable(batch), optional
        What ``module(inputs)`` gets, and the batch's integer class labels. Default: ``batch[0]`` and
        ``batch[1]`` of a tuple/list; of a dict the first key among ``x, input, inputs, image, images``
        and ``y, label, labels, target, targets``.
    mask_from : callable(batch), optional
        The observations of a batch to record: a bool ``(N, *positions)`` (True: keep), such as the real tokens
        of padded sequences (``lambda batch: ~batch["padding_mask"]``); see the ``mask`` of
        :meth:`ActivationRecorder.capture`. Default: every observation.
    forward : callable(module, batch) or ProbeForward, optional
        How one probe batch (already on the device) runs through ``module``; the return value is
        ignored. Default: ``module(inputs_from(batch))``.
    context : callable(module) -> context manager, optional
        Entered around each probe with the module it runs on (the copy, or the model with
        ``copy=False``); e.g. autocast.
    to_device : callable(batch, device), optional
        Moves a probe batch to the model's device. Default: every tensor, recursively.
    cache_bytes : int, default 256 MiB
        Keep the whole probe set on the model's device after the first probe if it fits in this many
        bytes, so later probes skip the loader; 0 reads it from the loader at every probe.
    stats : callable(patterns, references) -> (summary, metrics), optional
        Live statistics of each probe, per site, computed on a background worker, e.g.
        :func:`actpat.analysis.live.live_measures`. See :mod:`actpat.recorder.live_stats`: a picklable
        function runs in a child process whose numpy (BLAS, OpenMP) uses one thread.
    on_stats : callable(step, {site: metrics}), optional
        Receives each probe's statistics, in step order, on the thread that calls :meth:`maybe`,
        :meth:`probe`, :meth:`poll` or :meth:`close`.
    rank : int, optional
        Process rank for shard names (default: torch.distributed's, else ``$RANK``, else 0).
    writer : ShardWriter, optional
        Share another recorder's writer (one set of shards for batch and probe records); like a
        recorder's, :meth:`close` closes it.
    notify : callable(key, message), optional
        Reports each fact once per key; default: ``logging`` warnings.

    Notes
    -----
    **copy or not.** The copy is the simple and safe default: nothing of the model is touched, and it
    also probes a ``torch.compile``'d model (the copy is eager). Its price is one more set of weights
    on the model's device. ``copy=False`` fits when that memory is not there (a large model on a
    GPU): the probe then runs on the model itself; every buffer is cloned before and restored after
    (BatchNorm statistics, counters; usually far smaller than the weights), parameters are only read
    (an in-place change is detected and raised), and state a forward keeps in plain attributes is not
    restored. It refuses compiled models.

    **Resuming.** :meth:`state_dict` is a small flat dict; after :meth:`load_state_dict` the prober
    continues the schedule, skips steps already recorded in ``out_dir`` (also by a killed process),
    re-reads the ``init``/``last`` references of the live statistics from the shards, and checks its
    first probe batch (recording nothing) at :meth:`open`, so that a setup mistake still raises
    before training goes on.

    **Fail fast.** The first probe (and the check of a resumed prober) raises with the cause and the
    option that fixes it: a probe forward that fails (:class:`ProbeForwardError`), labels of the
    wrong kind, a ``sites`` filter that selects nothing or names no site of the model (the error
    lists the sites that exist; checked on the first batch, before its records are written), a model
    without any activation site.

    References
    ----------
    Hartmann, Franzen & Brodehl (2021). Studying the evolution of neural activation patterns during
    training of feed-forward ReLU networks. Frontiers in Artificial Intelligence 4.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch.utils.data import TensorDataset
    >>> from actpat.recorder import open_run
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> probe_set = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with Prober(model, probe_set, d, every=2, batch_size=8) as prober:
    ...         for step in range(5):  # after `step` optimizer steps
    ...             _ = prober.maybe(step)
    ...     open_run(d).steps("1", "probe").tolist()
    [0, 2, 4]
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Union[Dataset, DataLoader],
        out_dir: Union[str, os.PathLike],
        every: Union[float, int] = 0.2,
        *,
        steps_per_epoch: Optional[int] = None,
        mode: str = "train",
        copy: bool = True,
        batch_size: Optional[int] = None,
        sites: Union[None, str, Sequence[str], Callable[[str], bool]] = None,
        pattern: Optional[str] = None,
        max_observations: Optional[int] = None,
        compression: Optional[str] = None,
        store_values: Optional[Union[str, int]] = None,
        module_types: Sequence[type] = (),
        inputs_from: Optional[Callable[[Any], Any]] = None,
        labels_from: Optional[Callable[[Any], Any]] = None,
        mask_from: Optional[Callable[[Any], Any]] = None,
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        context: Optional[Callable[[nn.Module], ContextManager]] = None,
        to_device: Optional[Callable[[Any, Any], Any]] = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        stats: Optional[StatsFunction] = None,
        on_stats: Optional[Callable[[int, dict[str, dict[str, float]]], None]] = None,
        rank: Optional[int] = None,
        writer: Optional[ShardWriter] = None,
        notify: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        if probe is None:
            raise ValueError("Expected a probe set (a Dataset or a non-shuffling DataLoader), but got `probe=None`.")
        check_probe_set(probe)
        arguments.expect_every("every", every)
        if isinstance(every, float):
            if steps_per_epoch is None:
                raise ValueError(
                    f"Expected `steps_per_epoch` for `every={every!r}` (a fraction of an epoch), but got None. Pass "
                    "the optimizer steps per epoch (`len(train_loader)`), or an int `every` (optimizer steps)."
                )
            arguments.expect_int("steps_per_epoch", steps_per_epoch, 1)
        arguments.expect_choice("mode", mode, MODES)
        arguments.expect_bool("copy", copy)
        arguments.expect_optional_int("batch_size", batch_size, 1)
        if isinstance(probe, DataLoader) and batch_size is not None:
            raise ValueError(
                f"Expected `batch_size=None` with a DataLoader probe (it keeps its own batch size {probe.batch_size}), "
                f"but got {batch_size}. Pass the Dataset to choose the batch size."
            )
        arguments.expect_int("cache_bytes", cache_bytes, 0)
        arguments.expect_values("store_values", store_values)
        arguments.expect_module_types("module_types", module_types)
        for name, value in (("inputs_from", inputs_from), ("labels_from", labels_from), ("mask_from", mask_from),
                            ("forward", forward),
                            ("context", context), ("to_device", to_device), ("stats", stats), ("on_stats", on_stats)):
            arguments.expect_callable(name, value)
        if (stats is None) != (on_stats is None):
            raise ValueError(
                "Expected `stats` and `on_stats` together (what to compute after each probe, and where it goes), but "
                f"got {'only `stats`' if on_stats is None else 'only `on_stats`'}. For example "
                "`stats=actpat.analysis.live.live_measures, on_stats=lambda step, metrics: print(step, metrics)`."
            )
        if writer is None:
            schema.check_codec(compression)
        self.out_dir = Path(out_dir)
        self.every = every
        self._interval = Fraction(every) if isinstance(every, int) else max(
            Fraction(1), Fraction(every).limit_denominator(10**6) * steps_per_epoch
        )
        self._notify = notify or _log_once()
        self._module = ProbeModule(model, mode, copy)
        self._reader = BatchReader(inputs_from, labels_from, self._notify, mask_from)
        self._batches = ProbeBatches(probe_loader(probe, batch_size), self._reader, to_device or batches.to_device, cache_bytes)
        self._selection = SiteSelection(sites)  # validates `sites`
        self._forward = forward if isinstance(forward, ProbeForward) else ProbeForward.default(forward, self._reader)
        self._context = context
        self._recorder_options = dict(
            sites=self._selection, pattern=pattern, max_observations=max_observations, compression=compression,
            rank=rank, module_types=tuple(module_types), store_values=store_values,
        )
        self._writer = writer
        self._stats_fn, self._on_stats = stats, on_stats
        self._recorder: Optional[ActivationRecorder] = None
        self._observed: list[Record] = []
        self._stats: Optional[LiveStats] = None
        self._opened = False
        self._attempted = -1  # the step of the last probe maybe() tried
        # Resumable state (state_dict).
        self._last_probe_step = -1
        self._init_step = -1
        self._resumed = False
        self._resume_step: Optional[int] = None
        self._existing: Optional[Run] = None  # the run in out_dir, opened by the caller (load_state_dict)
        #: Whether a probe (or the check of a resumed prober) has worked since this prober was made.
        self.verified = False

    # ------------------------------------------------------------------ schedule
    @property
    def interval(self) -> Fraction:
        """Optimizer steps between probes, exact (a fraction of an epoch need not be a whole number)."""
        return self._interval

    @property
    def writer(self) -> Optional[ShardWriter]:
        """The shard writer of the probe records (None before the first probe unless one was given)."""
        return self._writer

    @property
    def last_step(self) -> int:
        """Step of the last probe recorded (-1 before the first)."""
        return self._last_probe_step

    @property
    def cached(self) -> bool:
        """Whether the probe set is held on the model's device (see ``cache_bytes``)."""
        return self._batches.cached

    @property
    def forward_rule(self) -> str:
        """How a probe batch runs through the module, in words."""
        return self._forward.rule

    def unprobed(self, sites: Iterable[str]) -> list[str]:
        """Those of ``sites`` (site names a training step called, the ``sites`` filter applied) that this prober's
        probes never called: the probe forward runs less of the model than training does (a head applied in
        ``training_step``, a branch run only in training mode); none before a probe ran."""
        seen = self._selection.seen
        return [name for name in sites if name not in seen] if seen else []

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe` probes at ``step``: the first probe of a run, then the first step at or after each
        multiple of the interval since the last probe or attempt (steps may grow by more than one: a module
        stepping two optimizers per batch; a probe that raised is tried again at the next multiple, not the next
        step)."""
        if step <= self._last_probe_step:
            return False
        since, interval = max(self._last_probe_step, self._attempted), self._interval
        return self._init_step < 0 or math.floor(step / interval) > math.floor(since / interval)

    # ------------------------------------------------------------------ probing
    def maybe(self, step: int, epoch: int = -1) -> bool:
        """Probe if :meth:`due` at ``step`` (optimizer steps done so far); hand finished statistics on.

        Returns whether a probe ran. Call it before training with ``step=0`` (the ``init`` probe) and
        after each optimizer step.
        """
        self.open()
        probed = False
        if self.due(step):
            self._attempted = step
            probed = self.probe(step, epoch)
        self.poll()
        return probed

    def probe(self, step: int, epoch: int = -1) -> bool:
        """Probe now, off schedule (the end of training, a checkpoint), unless ``step`` is recorded already."""
        self.open()
        if step <= self._last_probe_step:
            return False
        first = not self.verified
        self._observed.clear()
        try:
            with self._session() as module:
                recorder = self._recorder_for(module)
                # The sites are checked after the first batch of the first probe, before its records are
                # written: a `sites` mistake leaves `out_dir` as it was, so the corrected run can use it.
                when = "the first batch of the first probe (a `probe_forward` must run the model on it)"
                check = functools.partial(self._selection.check, when, self._notify) if first else None
                for (batch, ids, labels), last in _mark_last(self._batches(self._module.device)):
                    with recorder.capture(step, labels=labels, sample_ids=ids, split=PROBE_SPLIT, epoch=epoch,
                                          check=check, ends_step=last, mask=self._reader.mask(batch)):
                        before = rng_states(self._module.device)
                        self._forward(module, batch, first=first)
                        if not same_rng_states(before, rng_states(self._module.device)):
                            self._notify("random", _DRAWS_RANDOM)
                    check = None
        except Exception as exc:
            self._observed.clear()
            if first and self._selection.seen and not isinstance(exc, (ProbeForwardError, SiteSelectionError)):
                problem = self._selection.problem("the first probe")
                if problem is not None:
                    raise problem from exc  # a `sites` mistake explains the failure best
            raise
        self.verified = True
        self._last_probe_step = step
        if self._init_step < 0:
            self._init_step = step
        if self._stats is not None:
            self._stats.submit(step, epoch, PROBE_SPLIT, list(self._observed))
        self._observed.clear()
        return True

    def check(self) -> None:
        """Run the first probe batch with the hooks attached, recording nothing, and check the sites."""
        with self._session() as module:
            hooks = SiteHooks(
                module, lambda site, module_type, z: None, sites=self._selection,
                module_types=self._recorder_options["module_types"],
            )
            for batch, _, _ in self._batches(self._module.device, limit=1):
                hooks.attach()
                try:
                    self._forward(module, batch)
                finally:
                    hooks.detach()
        self._selection.check("the check of the probe on its first batch", self._notify)
        self.verified = True

    def poll(self, wait: bool = False) -> None:
        """Hand the statistics of finished probes to ``on_stats`` (of all probes if ``wait``)."""
        if self._stats is None:
            return
        for step, metrics in self._stats.results(wait=wait):
            self._on_stats(step, metrics)

    def stop_stats(self) -> None:
        """Stop the live statistics (after a :class:`~actpat.recorder.live_stats.LiveStatsError`, say); probes go
        on being recorded. Statistics not handed on yet are dropped."""
        if self._stats is not None:
            self._stats.close(wait=False)
            self._stats = None

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Prepare for the first probe (idempotent; :meth:`probe` calls it): read what ``out_dir`` holds."""
        if self._opened:
            return
        self._opened = True
        run, self._existing = self._existing, None
        if self._resumed:
            # Once (each open indexes every shard and warns of every loss), or as the caller opened it.
            run = existing_run(self.out_dir) if run is None else run
            recorded = recorded_steps(run, PROBE_SPLIT)
            # A kill loses the tail of the records: only the probes after the last one on disk can be missing. The init
            # and the last probe are certain; the steps of those between depend on the steps the loop reached.
            first, last = self._init_step, self._last_probe_step
            on_disk = max((s for s in recorded if s <= last), default=-1)
            note = unwritten_note(self.out_dir, PROBE_SPLIT, [s for s in (first, last) if s > on_disk], recorded,
                                  between=(max(on_disk, first), last))
            if note:
                live = " Live statistics against them are left out." if self._stats_fn is not None else ""
                self._notify("unwritten", note + live)
            self._last_probe_step, note = resume_point(
                self.out_dir, PROBE_SPLIT, self._last_probe_step, recorded, self._resume_step
            )
            if note:
                self._notify("ahead", note)
            short = _short_probe(run, self._last_probe_step, self._batches.loader)
            if short:
                self._notify("short", f"actpat: {short}; it is kept as it is (records are never rewritten).")
        if self._stats_fn is not None:
            references = self._references_from(run) if self._resumed else None
            self._stats = LiveStats(self._stats_fn, references, self._notify)
        if self._resumed and self._init_step >= 0:
            self.check()

    def close(self, wait: bool = True) -> None:
        """Finalize the shards; hand pending statistics on first (``wait=False`` drops them)."""
        try:
            if self._stats is not None:
                if wait:
                    self.poll(wait=True)
                self._stats.close(wait=wait)
                self._stats = None
        finally:
            if self._recorder is not None:
                self._recorder.close()
                self._recorder = None
            elif self._writer is not None:
                self._writer.close()

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(wait=exc_type is None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The state to resume from: the last probe's step and the ``init`` probe's step."""
        return {"version": _STATE_VERSION, "last_probe_step": self._last_probe_step, "init_step": self._init_step}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, step: Optional[int] = None, run: Optional[Run] = None
    ) -> None:
        """Continue from :meth:`state_dict` (before the first probe; missing keys keep their defaults).

        Parameters
        ----------
        state_dict : mapping
            What :meth:`state_dict` returned.
        step : int, optional
            The training step the fit resumes at, where known: probe records in ``out_dir`` after it (and
            after the state's last probe) are named in a warning as another fit's when the prober opens.
        run : Run, optional
            The run in ``out_dir`` as the caller opened it (:func:`existing_run`), so that it is not
            indexed, and its losses warned of, a second time; read when the prober opens if None.
        """
        if self._opened:
            raise RuntimeError("Expected `load_state_dict` before the first probe, but this prober has started already.")
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._init_step = int(state_dict.get("init_step", -1))
        self._resume_step = step
        self._resumed = True
        self._existing = run

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _session(self) -> Iterator[nn.Module]:
        with self._module.session() as module:
            with self._context(module) if self._context is not None else contextlib.nullcontext():
                yield module

    def _recorder_for(self, module: nn.Module) -> ActivationRecorder:
        """The recorder of the module the probe runs on (a new one if the copy was made anew)."""
        if self._recorder is None or self._recorder.model is not module:
            writer = self._writer if self._recorder is None else self._recorder.writer
            observe = self._observed.append if self._stats is not None else None
            self._recorder = ActivationRecorder(
                module, self.out_dir, **self._recorder_options, writer=writer, on_record=observe
            )
            self._writer = self._recorder.writer
        return self._recorder

    def _references_from(self, run: Optional[Run]) -> dict[str, dict[str, Any]]:
        """``init`` and ``last`` summaries per site, re-read from the shards after a resume."""
        references: dict[str, dict[str, Any]] = {}
        if run is None:
            return references
        for name, step in (("init", self._init_step), ("last", self._last_probe_step)):
            references[name] = {}
            for site in run.sites:
                if step < 0 or step not in run.steps(site, PROBE_SPLIT):
                    continue
                try:
                    patterns = run.read(site, step, PROBE_SPLIT)
                except OSError:  # the unreadable tail of a crashed shard
                    patterns = None
                if patterns is None or patterns.lost_records:  # no reference, no metric against it
                    log.warning("actpat: the %s probe (step %d) of site %r cannot be read back whole; live "
                                "statistics against it are left out.", name, step, site)
                    continue
                references[name][site] = self._stats_fn(patterns, {})[0]
        return references


class ProbeForward:
    """How one probe batch runs through the module; an error names the rule and the option that changes it.

    Parameters
    ----------
    run : callable(module, batch)
        Runs the batch (the return value is ignored).
    rule, hint : str
        What ``run`` does and how to change it, for the message of a :class:`ProbeForwardError`.
    context : callable() -> context manager, optional
        Entered around each call (e.g. a trainer's precision context).
    """

    def __init__(
        self, run: Callable[[nn.Module, Any], Any], rule: str, hint: str, context: Optional[Callable[[], Any]] = None
    ) -> None:
        self._run, self.rule, self._hint, self._context = run, rule, hint, context or contextlib.nullcontext

    @classmethod
    def default(
        cls,
        forward: Optional[Callable[[nn.Module, Any], Any]],
        reader: BatchReader,
        *,
        option: str = "forward",
        because: str = "",
        context: Optional[Callable[[], Any]] = None,
    ) -> "ProbeForward":
        """``forward(module, batch)`` if given, else ``module(inputs)``; ``option`` is the caller's name for ``forward``."""
        if forward is not None:
            hint = f"Fix `{option}`: it gets the module to probe and a probe batch on its device."
            return cls(forward, f"your `{option}(module, batch)`", hint, context)
        inputs = "`inputs_from(batch)`" if reader.custom_inputs else f"batch[0], or batch[key] for a key in {INPUT_KEYS}"
        hint = (
            "If the probe batches are not `(inputs, labels, ...)` or dicts with an input key, pass `inputs_from=` "
            f"(and `labels_from=`); to run the module another way, pass `{option}=`."
        )
        return cls(lambda module, batch: module(reader.inputs(batch)), f"`module(inputs)` with inputs = {inputs}{because}",
                   hint, context)

    def __call__(self, module: nn.Module, batch: Any, first: bool = True) -> Any:
        """Run ``batch`` through ``module``; ``first``: the first probe, whose failure may come of probe data that do
        not fit the model (said in the error)."""
        try:
            with self._context():
                return self._run(module, batch)
        except ProbeForwardError:
            raise
        except Exception as exc:
            raise ProbeForwardError(
                f"The probe forward, {self.rule}, failed on a probe batch {describe(batch)} with {exc!r}. "
                f"{_dtype_hint(module, batch)}"
                + ("Check that the probe data fit the model as its training batches do (shapes, dtypes, keys). The "
                   "probe runs the module in eval mode (its normalization layers aside), so outputs that depend on "
                   "`self.training` (auxiliary logits, losses a model returns in training mode) take their eval path "
                   "there. " if first else "") + self._hint
            ) from exc


def _dtype_hint(module: nn.Module, batch: Any) -> str:
    """Where the batch's float tensors are of a dtype none of the module's weights has (a model trained at ``64-true``
    or ``bf16-true`` precision, probed with float32 data), what may be the cause; else "". Never raises: it runs
    while another error is being raised."""
    try:
        weights = {p.dtype for p in module.parameters() if p.is_floating_point()}
        data = sorted({str(t.dtype) for t in tensors(batch) if t.is_floating_point() and t.dtype not in weights})
    except Exception:  # noqa: BLE001 - a batch that cannot be walked: no hint
        return ""
    if not weights or not data:
        return ""
    kinds = ", ".join(sorted(map(str, weights)))
    return (f"The batch holds {', '.join(data)} tensors and the module's weights are {kinds}: if that is the cause (a "
            f"model trained at a '-true' precision), convert the inputs in the probe forward. ")


def _mark_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` for each item, reading one item ahead."""
    iterator = iter(items)
    try:
        item = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield item, False
        item = following
    yield item, True


_DRAWS_RANDOM = (
    "actpat: the probe forward draws random numbers (torch, numpy or python RNG), though every module but the "
    "normalization layers runs in eval mode: noise drawn regardless of `self.training` (torch.randn in a forward, a "
    "random augmentation inside the model) makes the probe's patterns differ between probes of the same weights, and "
    "the similarity measures (Jaccard, Hamming, stability) count that noise as change. Draw such noise only when "
    "`self.training`, or probe through a forward that skips it (the callback's `probe_forward=`, the Prober's "
    "`forward=`)."
)


def _log_once() -> Callable[[str, str], None]:
    warned: set[str] = set()

    def notify(key: str, message: str) -> None:
        if key not in warned:
            warned.add(key)
            log.warning(message)

    return notify


def resume_point(
    run_dir: Union[str, os.PathLike],
    split: str,
    checkpoint_step: int,
    recorded: Optional[list[int]] = None,
    resume_step: Optional[int] = None,
) -> tuple[int, Optional[str]]:
    """Where a resumed fit goes on recording ``split``, and a note when ``run_dir`` is ahead of its checkpoint.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory.
    split : str
        The split (``"probe"``, ``"train"``).
    checkpoint_step : int
        The last step the checkpoint's fit recorded in ``split`` (-1 if none).
    recorded : list of int, optional
        The steps recorded in ``run_dir`` (:func:`recorded_steps`, read when not given).
    resume_step : int, optional
        The training step the fit resumes at (default ``checkpoint_step``).

    Returns
    -------
    last : int
        The last step recorded, by the checkpoint's fit or in ``run_dir``: the resumed fit records after
        it, since records are never rewritten.
    note : str or None
        Names the records after the resumed step (and ``checkpoint_step``): written by the fit that went
        on from there, another trajectory unless this fit retraces it exactly. None if there are none.
    """
    recorded = recorded_steps(run_dir, split) if recorded is None else recorded
    start = checkpoint_step if resume_step is None else max(checkpoint_step, resume_step)
    ahead = [step for step in recorded if step > start]
    last = max([checkpoint_step, *recorded])
    if not ahead:
        return last, None
    n = len(ahead)
    if n <= 4:
        which = ", ".join(map(str, ahead))
    elif ahead[-1] - ahead[0] == n - 1:
        which = f"{ahead[0]} to {ahead[-1]}"
    else:
        which = f"{ahead[0]}, {ahead[1]}, ..., {ahead[-1]}"  # not a range: not every step between
    note = (
        f"actpat: {run_dir} holds {split} records at {n} step{'s' * (n > 1)} after step {start}, where this fit "
        f"resumes: step{'s' * (n > 1)} {which}, written by the fit that went on from there (killed, or resumed here from an "
        f"older checkpoint). They are kept (records are never rewritten) and this fit records after step {last}; where "
        "it does not retrace that fit exactly (nondeterministic kernels, other settings), the run holds two "
        "trajectories. To record this fit alone, pass another `out_dir`."
    )
    return last, note


def unwritten_note(
    run_dir: Union[str, os.PathLike], split: str, checkpointed: Sequence[int], recorded: Sequence[int],
    between: Optional[tuple[int, int]] = None,
) -> Optional[str]:
    """Names the steps a resumed fit's checkpoint says were recorded in ``split`` (``checkpointed``; -1:
    none) that ``run_dir`` does not hold (``recorded``), and any it recorded strictly ``between`` two steps;
    None if it holds them all."""
    missing = sorted({step for step in checkpointed if step >= 0} - set(recorded))
    if not missing:
        return None
    listed = ", ".join(map(str, missing[:12])) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    steps = f"step{'s' * (len(missing) > 1)} {listed}"
    also = f" and any between steps {between[0]} and {between[1]}" if between and between[1] - between[0] > 1 else ""
    return (
        f"actpat: the fit this one resumes recorded {split} records at {steps}{also} (its checkpoint says so), but "
        f"{run_dir} holds none there: they never reached the disk (the process was killed within a second or so "
        f"of them) or were removed. The run has no {split} records at {steps}."
    )


def recorded_steps(run: Union[str, os.PathLike, Run, None], split: str) -> list[int]:
    """The steps recorded in ``split`` by any rank, sorted: of ``run`` (an opened run, or None: none), or of the
    run in a directory (none if it holds no shard)."""
    if run is not None and not isinstance(run, Run):
        run = existing_run(run)
    if run is None or split not in run.splits:
        return []
    return sorted({int(step) for site in run.sites for step in run.steps(site, split)})


def existing_run(run_dir: Union[str, os.PathLike], warn: bool = True) -> Optional[Run]:
    """The run in ``run_dir`` (:func:`~actpat.recorder.reader.open_run`: every shard indexed, every loss
    warned of if ``warn``); None where it holds no shard (or does not exist)."""
    return open_run(run_dir, warn=warn) if shard_ranks(Path(run_dir)) else None


def _short_probe(run: Optional[Run], step: int, loader: DataLoader) -> Optional[str]:
    """Describe the probe record at ``step`` if a crash cut it short (fewer samples than the probe set)."""
    try:
        expected = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    if step < 0 or run is None or PROBE_SPLIT not in run.splits:
        return None
    for site in run.sites:
        if step in run.steps(site, PROBE_SPLIT):
            try:
                got = len(np.unique(run.read(site, step, PROBE_SPLIT).sample_ids))
            except OSError as exc:  # the unflushed tail of a shard left by a killed process
                return (f"the probe at step {step} cannot be read ({exc}; cut short: the process was killed, or "
                        "recording stopped early)")
            if got < expected:
                return (f"the probe at step {step} holds {got} of {expected} samples at site {site!r} (cut short: the "
                        "process was killed, or recording stopped early)")
    return None


__all__ = ["PROBE_SPLIT", "ProbeForward", "ProbeForwardError", "Prober", "existing_run", "recorded_steps",
           "resume_point", "unwritten_note"]

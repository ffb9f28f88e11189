"""ActivationRecorder: record the binary activation patterns of a model's forwards into shards."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from actpat.recorder import arguments, schema
from actpat.recorder.hooks import SiteFilter, SiteHooks, is_compiled
from actpat.recorder.packing import (
    device_nan_count, load_kernels, observation_view, pack_and_count_nans, pack_patterns,
)
from actpat.recorder.shards import Record, RecorderError, ShardWriter, SiteMeta

log = logging.getLogger(__name__)


class ActivationRecorder:
    """Record on/off patterns of every ReLU-family activation site of ``model`` into HDF5 shards.

    Only forwards inside :meth:`capture` are recorded. Bits are packed on the tensor's device; the
    records of a capture are handed to a background writer when it ends. The hook never synchronizes a
    CUDA device and never does I/O.

    On an eager model no hook is installed outside :meth:`capture`. A ``torch.compile``'d model
    (``torch.compile(model)``, ``model.compile()``, compiled submodules or forward) keeps an inactive
    hook on each module from construction to :meth:`close`, and dynamo traces the hooks and the packing
    into its graphs: one with and one without an active capture. Pass the compiled module itself;
    graphs traced before the recorder existed are traced again at their next call.

    Parameters
    ----------
    model : nn.Module
        The model to instrument, eager or compiled. Site names are those of the eager model.
    out_dir : path
        Run directory for the shards (see the README for the format).
    sites : None, str, sequence of str, or callable, default None
        Which sites to record: all (None), names or glob patterns (``"layer1.*"``), or a predicate on
        the site name.
    pattern : {"channel", "flat", "channel_last"}, optional
        How a pre-activation ``(N, C, *rest)`` is cut into patterns (SPEC section 1): ``"channel"`` (the
        default) takes dimension 1 as the units, ``"flat"`` makes one pattern per sample, ``"channel_last"``
        takes the last dimension as the units (a ``Linear`` on ``(N, L, C)`` sequences: transformers,
        MLP-Mixers). Left at the default, a site with 3-d pre-activations is warned of once, since
        ``(N, C, L)`` (a ``Conv1d``) and ``(N, L, C)`` cannot be told apart, and so is one of 4 or more
        dimensions whose last is as wide as a ``Linear`` beside it (a ConvNeXt block's ``(N, H, W, C)``); pass
        the pattern to say which. A 1-d site is one unbatched sample, warned of once.
    max_observations : int, optional
        Keep at most this many observations per site per call, chosen uniformly without replacement by
        the recorder's own generator (seeded by ``seed``, the step and the site), so torch's global RNG
        is never touched and the choice is reproducible.
    compression : None or str, default None
        Codec of the shards (see :class:`~actpat.recorder.shards.ShardWriter`): None, ``"lzf"``,
        ``"gzip"``, or with the ``codecs`` extra ``"lz4"``, ``"zstd"``, ``"blosc-lz4"``, ``"blosc-zstd"``.
        Compression runs on the writer thread, on the cores that train; uncompressed shards keep
        training within a few percent of the ``z > 0`` floor (``bench/overhead.py``) and are read by
        plain h5py.
    max_queue_bytes : int, default 256 MiB
        Bound on packed bytes waiting for the writer.
    on_backpressure : {"block", "drop"}, default "block"
        ``block``: training waits while the queue is full (memory stays bounded, training slows to the
        writer's speed). ``drop``: whole records are discarded, counted in the shards and warned about
        once, so training never waits.
    module_types : sequence of module classes, default ()
        Extra module classes to treat as activation sites.
    functional : bool, default True
        Also record functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``, ...).
    rank : int, optional
        Process rank for shard names; default: ``torch.distributed``'s rank if initialized, else
        ``$RANK``, else 0.
    seed : int, default 0
        Seed of the subsampling generator.
    max_shard_bytes : int, default 1 GiB
        Roll over to a new shard after this many bytes.
    max_shard_seconds : float, default 60
        ... or once a shard has been open this long, so that a crash (SIGKILL, power loss) can only
        lose what the open shard holds: finalized shards are always readable.
    store_values : None, "all" or int, default None
        Also store the float16 pre-activations of the recorded observations (for continuous
        mutual-information estimators): of every unit (``"all"``) or of ``k`` units per site chosen once
        by the recorder's generator (listed in the site's ``value_units`` attribute). Costs 2 bytes per
        stored value: use it for a probe set, not for every training batch.
    writer : ShardWriter, optional
        Share another recorder's writer (``other.writer``) instead of starting one: both recorders then
        write into the same shards, which is how one process records two models (a model and its copy)
        into one run without two writers claiming the same shard names. ``rank``, ``compression``,
        ``max_queue_bytes``, ``on_backpressure`` and ``max_shard_bytes`` are the shared writer's.
    on_record : callable(Record), optional
        Observer called with every record just before it is queued, when its capture ends (also when
        it is then dropped under backpressure). It must be cheap and must not do I/O: keep a reference
        and work on it later. On CUDA the record's arrays are numpy views of pinned host memory still being
        filled (see :func:`to_host` for the few that are torch tensors); wait on ``record.ready`` (a CUDA event)
        before reading them.

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder import open_run
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with ActivationRecorder(model, d) as rec:
    ...         with rec.capture(step=0, labels=torch.tensor([0, 1])):
    ...             _ = model(torch.randn(2, 4))
    ...     open_run(d).read("1", 0).bits.shape
    (2, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike,
        sites: SiteFilter = None,
        pattern: str | None = None,
        max_observations: int | None = None,
        compression: str | None = None,
        max_queue_bytes: int = 256 << 20,
        on_backpressure: str = "block",
        *,
        module_types: Iterable[type[nn.Module]] = (),
        functional: bool = True,
        rank: int | None = None,
        seed: int = 0,
        max_shard_bytes: int = 1 << 30,
        max_shard_seconds: float = 60.0,
        writer: ShardWriter | None = None,
        on_record: Callable[[Record], None] | None = None,
        store_values: str | int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        module_types = module_types if isinstance(module_types, type) else tuple(module_types)
        arguments.expect_module_types("module_types", module_types)
        if pattern is not None and pattern not in schema.PATTERN_KINDS:
            raise ValueError(f"Expected `pattern` to be None or one of {schema.PATTERN_KINDS}, but got {pattern!r}.")
        if not (store_values is None or store_values == "all" or (isinstance(store_values, int) and store_values >= 1)):
            raise ValueError(f"Expected `store_values` to be None, 'all' or a positive int, but got {store_values!r}.")
        if max_observations is not None and int(max_observations) < 1:
            raise ValueError(f"Expected `max_observations` to be None or at least 1, but got {max_observations}.")
        if is_compiled(model) and _torch_release() < MIN_COMPILED_TORCH:
            raise ValueError(
                f"Expected torch {'.'.join(map(str, MIN_COMPILED_TORCH))} or later to record a torch.compile'd model, "
                f"but this is torch {torch.__version__}, whose dynamo traces the recorder's hooks wrongly (torch "
                "2.5 drops functional sites, 2.4 returns tensors the writer cannot read). Upgrade torch, or record "
                "the eager module (`model._orig_mod` of a compiled wrapper; the callback's probes, whose copy is "
                "eager, work on any torch)."
            )
        if store_values is not None and is_compiled(model):
            raise ValueError(
                f"Expected `store_values=None` for a torch.compile'd model, but got {store_values!r}: stored "
                "values are copied inside the forward, which the compiled graph does not do. Record values "
                "with the eager model (the callback's probe runs an eager copy)."
            )
        self.model = model
        self.out_dir = out_dir
        self.pattern = pattern or "channel"
        self._pattern_given = pattern is not None
        self.max_observations = None if max_observations is None else int(max_observations)
        self.seed = int(seed)
        self.store_values = store_values
        self.writer = writer or ShardWriter(
            out_dir,
            rank=_default_rank() if rank is None else rank,
            compression=compression,
            max_queue_bytes=max_queue_bytes,
            on_backpressure=on_backpressure,
            max_shard_bytes=max_shard_bytes,
            max_shard_seconds=max_shard_seconds,
        )
        self.on_record = on_record
        self._site_meta: dict[str, SiteMeta] = {}
        # What the hooks gathered during the current forward: Records (eager) or the outputs of a
        # compiled graph (see _on_site_traced), moved to _gathered after each forward. One list for the
        # recorder's lifetime, empty whenever a forward starts: dynamo guards on it.
        self._pending: list = []
        self._gathered: list = []
        # Held while an eager site call reads the capture and queues its record, and while a capture ends: a
        # forward on another thread is either in the capture's records or not recorded, never left behind.
        self._lock = threading.Lock()
        self._site_called = False
        load_kernels()  # a first compile happens here, not in the first recorded forward
        self._hooks = SiteHooks(
            model, self._on_site, sites=sites, module_types=module_types, functional=functional,
            on_forward_end=self._on_forward_end, signs_only=store_values is None,  # stored values: the inputs
        )
        self._context: _Capture | None = None
        self._parts: dict[str, tuple[tuple[str, int], int]] = {}  # site -> ((split, step), its next part)
        self._ended: tuple[str, int] | None = None  # (split, step) of the last step a capture or end_step() ended
        self._latest: dict[str, int] = {}  # split -> the latest step whose records were handed to the writer

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ActivationRecorder":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        """Start the writer thread (idempotent)."""
        self.writer.start()

    def close(self) -> None:
        """Remove the hooks, write what is queued and finalize the open shard.

        Raises :class:`RecorderError` on write failure.
        """
        self._hooks.remove()
        self.writer.close()

    @property
    def sites(self) -> list[str]:
        """Site names recorded so far, in first-forward order."""
        return list(self._site_meta)

    @property
    def dropped_records(self) -> int:
        """Records discarded under ``on_backpressure="drop"``."""
        return self.writer.dropped_records

    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def capture(
        self,
        step: int,
        *,
        labels: Any = None,
        sample_ids: Any = None,
        split: str = "train",
        epoch: int = -1,
        check: Callable[[], None] | None = None,
        record: bool = True,
        ends_step: bool = True,
        mask: Any = None,
    ) -> Iterator["ActivationRecorder"]:
        """Record every site call of the forwards run inside this block as time point ``step``.

        Parameters
        ----------
        step : int
            Time point of the records (e.g. the optimizer step).
        labels, sample_ids : tensor or array of shape (N,), optional
            Per-sample label and identity, integers; ``-1`` is stored where absent (a label of ``-1``:
            no label). Floats, bools and labels below ``-1`` are an error (on a GPU only the dtype is
            checked here, the analysis checks the values).
        split : str, default "train"
            Free-form name of what was recorded (``"train"``, ``"probe"``, ...), at most 32 bytes.
        epoch : int, default -1
        check : callable(), optional
            Called when the block ends without an error, before its records are queued: an exception
            from it is raised with none of the capture's records written (a setup check, such as the
            ``sites`` selection of a first capture, then leaves ``out_dir`` as it was). A block given a
            ``check`` that raises writes none of its records either (a first forward that fails is most
            likely a setup mistake: inputs that do not fit the model).
        record : bool, default True
            False: run the hooks and the checks of a capture (``check``, a model without sites) but
            record nothing, for a check on a forward that is not recorded (``step`` is then not checked).
        ends_step : bool, default True
            False when more captures of the same ``step`` and ``split`` follow (the batches of a probe):
            each site's records of a step are numbered and the last capture's mark the step's end, so
            that a reader reports a step whose end never reached the disk (a process killed in the
            middle of a probe) as lost instead of reading it as complete. A capture whose block raised
            never ends its step.
        mask : bool tensor or array of shape (N, *positions), optional
            The observations to keep (True), e.g. the real tokens of padded sequences (``~padding_mask``):
            at every site whose positions per sample have this shape (a token site of ``channel_last``
            patterns, ``(N, L)``), only those are recorded, as the rows of a subsampled record (``obs_index``),
            so that padding counts in no measure; sites of another shape are recorded whole. Read on the host
            once per capture. ``max_observations`` then draws among the kept observations.

        Raises
        ------
        ValueError
            ``out_dir`` already held records of this rank and split up to a step >= ``step`` when the
            recorder started (a second run into the same directory would pool its records with the first's);
            or this recorder recorded a later step of ``split`` (a reader pools every record of a step: steps
            that restart, such as a batch index each epoch, would be merged).
        """
        self.writer.raise_if_failed()
        step, epoch = _whole(step, "step"), _whole(epoch, "epoch")
        if self._context is not None:
            raise RuntimeError("Expected no capture to be active, but `capture()` was entered twice; nest none.")
        schema.check_split(split)
        self.open()
        before = self.writer.recorded_before.get(split, -1)
        if record and step <= before:
            raise ValueError(
                f"Expected a step after {before} in split {split!r}: rank {self.writer.rank} had recorded up to "
                f"step {before} in {self.writer.out_dir} before this recorder started, and records of step "
                f"{step} would be pooled with that run's. Record into a new `out_dir`, or continue from step "
                f"{before + 1}."
            )
        if record:
            self._check_order(step, split)
            if self._ended == (split, step):
                self._warn_once(
                    f"ended:{split}",
                    f"actpat: step {step} of split {split!r} is captured again after a capture that ended it (`ends_step=True`, "
                    "the default): a reader then cannot tell whether this capture's records reached the disk. Pass "
                    "ends_step=False to every capture of a step but its last (or end it with `end_step()`).",
                )
        labels, sample_ids = _per_sample(labels, "labels", lowest=-1), _per_sample(sample_ids, "sample_ids")
        mask = _observation_mask(mask)
        empty = np.flatnonzero(~mask.reshape(len(mask), -1).any(axis=1)) if mask is not None and record else ()
        if len(empty):
            self._warn_once(
                "mask:empty",
                f"actpat: the mask of step {step} keeps no observation of some samples (first: sample {int(empty[0])}), "
                "which are then not recorded. True must mark what to keep: the real tokens (`~src_key_padding_mask`), "
                "not the padding itself.",
            )
        self._context = _Capture(step, epoch, split, labels, sample_ids, check, record, ends_step, mask)
        self._pending.clear()
        self._gathered.clear()
        self._site_called = False
        self._hooks.attach()
        try:
            yield self
        except BaseException:
            self._end_capture(failing=True)
            raise
        self._end_capture(failing=False)

    def _check_order(self, step: int, split: str) -> None:
        latest = self._latest.get(split, -1)
        if step < latest:
            raise ValueError(
                f"Expected steps of split {split!r} in time order, but `capture({step})` comes after this recorder "
                f"recorded step {latest}: a reader pools every record of a step, so these would be merged with the "
                f"records of step {step} made earlier, if any, and a lost record's step could not be bounded. Pass a "
                "step that grows over the whole run (an optimizer step count, not the batch index of an epoch)."
            )

    def _end_capture(self, failing: bool) -> None:
        """Remove the hooks and queue the capture's records; ``failing``: the block raised, keep its error."""
        self._hooks.detach()
        with self._lock:
            context, self._context = self._context, None
            self._on_forward_end()  # a forward that raised never ended
            # A setup check's capture that raised most likely ran a misconfigured model: none of its records are
            # written, so that the corrected run can use the same `out_dir`.
            keep = context.record and not (failing and context.check is not None)
            pending, self._gathered = (self._gathered if keep else []), []
        for note in context.notes:
            self.writer.record_stop(note)
        if not failing and context.error is None:
            self._check_sites_found()
            if context.check is not None:
                context.check()
        try:
            ends_step = context.record and context.ends_step and not failing and context.error is None
            self._hand_over(context, pending, ends_step=ends_step)
        except Exception:
            if not failing:
                raise
            log.exception("actpat: the records of step %d could not be queued", context.step)
            return
        if failing:
            return
        if context.error is not None:
            raise RecorderError(
                f"Recording step {context.step} failed inside the forward, which itself completed: "
                f"{context.error!r}. Records of this capture may be incomplete; earlier shards are readable."
            ) from context.error

    def _check_sites_found(self) -> None:
        hooks = self._hooks
        if hooks.compiled_elsewhere is not None:
            part = f"its submodule {hooks.compiled_elsewhere!r}" if hooks.compiled_elsewhere else "it"
            raise ValueError(
                f"Expected {type(self.model).__name__} to run as given to the recorder, but a torch.compile wrapper "
                f"of {part} ran inside `capture()`: it was compiled after the recorder was created, and the "
                "recorder's eager hooks either go unseen by the compiled graph or break it at every site. Create "
                "the recorder with the compiled module (it records compiled models)."
            )
        if hooks.forward_seen and not self._site_meta and not self._site_called:
            stale = (
                " For a compiled model this also happens when dynamo reuses a graph traced before the recorder "
                "existed: create the recorder before the compiled model's first call, or call "
                "torch.compiler.reset() after creating it."
                if hooks.compiled else ""
            )
            raise ValueError(
                f"Expected {type(self.model).__name__} to contain at least one activation site, but a forward "
                f"ran inside `capture()` and none was found. Searched {hooks.describe_search()}"
                " with the given `sites` filter. Name other activation classes with `module_types=`, or "
                f"widen `sites=`. The model's module sites: {hooks.module_sites or 'none'}." + stale
            )

    def _on_forward_end(self) -> None:
        n = len(self._pending)  # a forward on another thread may append meanwhile: only these n move
        self._gathered.extend(self._pending[:n])
        del self._pending[:n]

    def _hand_over(self, context: "_Capture", pending: list, ends_step: bool) -> None:
        """Queue the records of a capture (those made before an error too): one hand-off per capture
        instead of one per site call."""
        records = []
        for item in pending:
            record = item if isinstance(item, Record) else self._make_record(context, *item)
            if record is not None:
                records.append(record)
        if context.mask_shape is not None and records and not context.mask_fitted:
            shapes = ", ".join(dict.fromkeys(
                f"{r.meta.site} ({', '.join(['N', *map(str, _position_shape(r.meta.shape, self.pattern))])})"
                for r in records))
            raise ValueError(
                f"Expected the `mask` of shape {context.mask_shape} to fit the positions per sample of a site, but none "
                f"of the sites recorded at step {context.step} has them: {shapes}; its padding would be counted. Pass a "
                "mask of (N, L) for (N, L, C) tokens with pattern='channel_last' (batch first), or no mask."
            )
        closing = self._number_parts(context, records, ends_step)
        to_host(records)
        if self.on_record is not None:
            for record in records:
                self.on_record(record)
        if records or closing:
            self.writer.put_many(records + closing)
            self._latest[context.split] = context.step

    def _number_parts(self, context: "_Capture", records: list[Record], ends_step: bool) -> list[Record]:
        """Number each site's records within its step and split; if ``ends_step``, mark each site's last.

        Returns the empty records that end the step of sites recorded earlier in it but not in this
        capture (a reader would otherwise take their step for one cut short).
        """
        key = (context.split, context.step)
        last: dict[str, Record] = {}
        for record in records:
            site = record.meta.site
            seen, part = self._parts.get(site, (key, 0))
            record.part = part if seen == key else 0
            self._parts[site] = (key, record.part + 1)
            last[site] = record
        if not ends_step:
            return []
        for record in last.values():
            record.ends_step = True
        closing = self._closing_records(key, context.epoch, skip=last)
        if last or closing:  # (a capture of a step that recorded nothing in it, such as a skipped batch, ends nothing)
            self._ended = key
        return closing

    def _closing_records(self, key: tuple[str, int], epoch: int, skip: Iterable[str] = ()) -> list[Record]:
        """Empty records that end step ``key`` (split, step) of each site recorded in it, but those in ``skip``."""
        closing = [Record.empty(self._site_meta[site], key[1], epoch, key[0], part, ends_step=True)
                   for site, (seen, part) in self._parts.items() if seen == key and site not in skip]
        for record in closing:
            self._parts[record.meta.site] = (key, record.part + 1)
        return closing

    def end_step(self, step: int, *, split: str = "train", epoch: int = -1) -> None:
        """End ``step`` of ``split``, captured with ``ends_step=False`` by captures none of which knew it was the
        step's last (gradient accumulation: the optimizer step comes after the last micro-batch's forward).

        Queues one empty record per site recorded in the step, marking its end; nothing if none was.
        """
        self.writer.raise_if_failed()
        key = (split, _whole(step, "step"))
        closing = self._closing_records(key, _whole(epoch, "epoch"))
        if closing:
            self._ended = key
            self.writer.put_many(closing)

    def _on_site(self, name: str, module_type: str, z: torch.Tensor) -> None:
        self._site_called = True
        if self._hooks.compiled:
            self._on_site_traced(name, module_type, z)
            return
        with self._lock:
            context = self._context
            if context is None or context.error is not None or not context.record:
                return  # None: a forward on another thread that outlasted the capture
            try:
                record = self._record(context, name, module_type, z)
            except Exception as exc:  # noqa: BLE001 - raised when the capture ends, never inside the forward
                context.error = exc
                return
            if record is not None:
                self._pending.append(record)

    def _on_site_traced(self, name: str, module_type: str, z: torch.Tensor) -> None:
        # Traced into a compiled graph: tensor ops and a list append only; the records are made when
        # the capture ends, from the graph's outputs.
        n = z.shape[0] if z.dim() > 1 else 1
        if n == 0:
            return
        bits, n_positions, n_units = pack_patterns(z, self.pattern)
        nan_count = device_nan_count(z)
        self._pending.append((name, module_type, tuple(z.shape[1:]), n, bits, n_positions, n_units, nan_count))

    def _record(self, context: "_Capture", name: str, module_type: str, z: torch.Tensor) -> Record | None:
        n = z.shape[0] if z.dim() > 1 else 1
        if n == 0:
            return None  # an empty batch has no observation to record
        if z.numel() == 0:
            self._warn_once(
                f"empty:{name}",
                f"actpat: site {name!r} was called on a pre-activation of shape {tuple(z.shape)}, which has "
                "no unit or no position; such calls are not recorded.",
            )
            return None
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            raise RecorderError(
                f"Site {name!r} was called inside a torch.func transform (vmap, grad, jacrev, ...), whose "
                "tensors have no storage to record. Run the transformed computation outside "
                "`capture()`, or record the plain forward."
            )
        z = z.detach()  # the recorder's reductions need no autograd node
        bits, n_positions, n_units, nan_count = pack_and_count_nans(z, self.pattern)
        return self._make_record(
            context, name, module_type, tuple(z.shape[1:]), n, bits, n_positions, n_units, nan_count, z
        )

    def _make_record(
        self,
        context: "_Capture",
        name: str,
        module_type: str,
        shape: tuple[int, ...],
        n: int,
        bits: torch.Tensor,
        n_positions: int,
        n_units: int,
        nan_count: Any,
        z: torch.Tensor | None = None,
    ) -> Record | None:
        meta = self._site_meta.get(name)
        if meta is None:
            meta = self._site_meta[name] = SiteMeta(
                site=name,
                site_index=len(self._site_meta),
                module_type=module_type,
                shape=shape,
                n_units=n_units,
                pattern=self.pattern,
                value_units=self._value_units(len(self._site_meta), n_units),
            )
            self._warn_of_layout(name, shape, n_units)
        elif meta.n_units != n_units:
            change = f"site {name!r} changed width from {meta.n_units} to {n_units} units at step {context.step} " \
                     f"({context.split!r})"
            hint = (" Sequences of another length at the default pattern? Pass pattern='channel_last' for (N, L, C) "
                    "tokens." if self._ambiguous(shape) else "")
            if self._warn_once(f"units:{context.split}:{name}", f"actpat: {change}; its calls of another width than "
                               f"{meta.n_units} are not recorded (a site keeps one width in a run).{hint}"):
                # In the run too, when the capture ends (no I/O in a hook): `info` and `stop_reasons` say why the
                # site's later steps may be missing.
                context.notes.append(f"{change}: its calls of another width are not recorded")
            return None
        obs_index = index = None
        if context.mask_shape is not None and context.mask_shape == (n, *_position_shape(shape, self.pattern)):
            context.mask_fitted = True
            obs_index = context.kept  # the padding of this capture's sequences left out (None: it has none)
        available = bits.shape[0] if obs_index is None else len(obs_index)
        if self.max_observations is not None and available > self.max_observations:
            rng = np.random.default_rng([self.seed, context.step & 0x7FFFFFFF, meta.site_index])
            chosen = np.sort(rng.choice(available, self.max_observations, replace=False))
            obs_index = chosen if obs_index is None else obs_index[chosen]
        if obs_index is not None:
            index = torch.from_numpy(obs_index)
            if bits.is_cuda:
                index = index.pin_memory()  # a copy from pageable memory would wait for the device
            index = index.to(bits.device, non_blocking=True)
            bits = bits.index_select(0, index)
        values = None
        if meta.value_units is not None and z is not None:
            units = meta.value_units
            kept = observation_view(z, self.pattern)[0]
            if index is not None:
                kept = kept.index_select(0, index)
            kept = kept if len(units) == meta.n_units else kept[:, list(units)]
            values = kept.to(torch.float16, copy=True)  # a copy: an in-place activation may overwrite z
        labels, sample_ids = context.labels, context.sample_ids
        wrong = [f"{what} {len(array)}" for what, array in (("labels", labels), ("sample_ids", sample_ids))
                 if array is not None and len(array) != n]
        if wrong:
            self._warn_once(
                f"batch:{name}",
                f"actpat: site {name!r} has batch size {n} but got {' and '.join(wrong)}; those are not stored for "
                "this site.",
            )
            labels = None if labels is not None and len(labels) != n else labels
            sample_ids = None if sample_ids is not None and len(sample_ids) != n else sample_ids
        return Record(
            meta=meta, step=context.step, epoch=context.epoch, split=context.split, bits=bits,
            n_positions=n_positions, n_samples=n, nan_count=nan_count,
            sample_ids=sample_ids, labels=labels, obs_index=obs_index, values=values,
            stream=_stream(bits),
        )

    def _warn_of_layout(self, name: str, shape: tuple[int, ...], n_units: int) -> None:
        """At a site's first call, warn once where the default pattern may cut its pre-activations ``(N, *shape)``
        into the wrong units (3-d, channels-last beside a Linear) or it has no batch dimension (1-d)."""
        if self._ambiguous(shape):
            self._warn_once(
                f"rank3:{name}",
                f"actpat: site {name!r} has 3-d pre-activations (N, {shape[0]}, {shape[1]}): its patterns take "
                f"dimension 1 as the units ({shape[0]} units, {shape[1]} positions per sample), right for a "
                f"Conv1d's (N, C, L). If the last dimension holds the units (a Linear on (N, L, C) sequences: "
                f"transformers, MLP-Mixers), pass pattern='channel_last'; pass pattern='channel' to confirm "
                f"dimension 1 and silence this warning.",
            )
        elif not shape:
            self._warn_once(
                f"1d:{name}",
                f"actpat: site {name!r} has 1-d pre-activations ({n_units},), recorded as one observation of "
                f"{n_units} units (the forward of one unbatched sample). If dimension 0 is the batch (a score per "
                f"sample, such as `F.relu(fc(x).squeeze(1))`), keep the unit dimension, (N, 1), to record one "
                f"pattern per sample with its label.",
            )
        elif self._features_last(name, shape):
            self._warn_once(
                f"last:{name}",
                f"actpat: site {name!r} has pre-activations (N, {', '.join(map(str, shape))}) whose last dimension "
                f"is the width of an nn.Linear beside it ({shape[-1]} features): a channels-last tensor (ConvNeXt, "
                f"Swin) holds its units there, but the default pattern takes dimension 1 as the units ({shape[0]} "
                f"units). Pass pattern='channel_last' ({shape[-1]}-unit patterns, one per position), or "
                f"pattern='channel' to confirm dimension 1 and silence this warning.",
            )

    def _ambiguous(self, shape: tuple[int, ...]) -> bool:
        """Whether a site of pre-activations ``(N, *shape)`` is 3-d and its pattern the default: ``(N, C, L)`` and
        ``(N, L, C)`` then look alike."""
        return len(shape) == 2 and not self._pattern_given

    def _features_last(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a site of pre-activations ``(N, *shape)`` of 4 or more dimensions, at the default pattern, has an
        nn.Linear beside it (a child of the module around its call) as wide as its last dimension, and no convolution
        or norm over channels in that module as wide as its dimension 1: the features of a channels-last tensor (a
        Linear acts on the last dimension), which the default reads as positions."""
        if len(shape) < 3 or self._pattern_given:
            return False
        enclosing = self._hooks.enclosing(name)
        if any(_channels(m) == shape[0] for m in enclosing.modules()):
            return False
        return any(isinstance(m, nn.Linear) and m.out_features == shape[-1] for m in enclosing.children())

    def _value_units(self, site_index: int, n_units: int) -> tuple[int, ...] | None:
        if self.store_values is None:
            return None
        if self.store_values == "all" or self.store_values >= n_units:
            return tuple(range(n_units))
        rng = np.random.default_rng([self.seed, site_index, 1])
        return tuple(int(u) for u in np.sort(rng.choice(n_units, self.store_values, replace=False)))

    def _warn_once(self, key: str, message: str) -> bool:
        """Log ``message`` the first time ``key`` comes in this run (see ``ShardWriter.warned``); whether it did now."""
        if key in self.writer.warned:
            return False
        self.writer.warned.add(key)
        log.warning(message)
        return True


class _Capture:
    """Per-capture context: the time point and the per-sample arrays (see :func:`_per_sample`)."""

    def __init__(
        self, step: int, epoch: int, split: str, labels: Any, sample_ids: Any, check: Callable[[], None] | None,
        record: bool, ends_step: bool, mask: np.ndarray | None = None,
    ) -> None:
        self.step, self.epoch, self.split, self.check, self.record = step, epoch, split, check, record
        self.ends_step = ends_step
        self.labels, self.sample_ids = labels, sample_ids
        #: The observation mask's shape, and the flat indices of the observations it keeps (None: it keeps all).
        self.mask_shape = None if mask is None else mask.shape
        self.kept = None if mask is None or mask.all() else np.flatnonzero(mask)
        self.mask_fitted = False  # whether the mask applied to a site of this capture
        #: Why some of this capture's calls were not recorded, stored in the run when it ends.
        self.notes: list[str] = []
        self.error: Exception | None = None


def _whole(value: Any, name: str) -> int:
    """``value`` (an int, a whole float, a 0-d tensor) as an int; a fraction would be cut to the step below
    it and pooled with that step's records, silently: an error instead."""
    try:
        whole = int(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"Expected `{name}` to be an integer, but got {value!r}.") from exc
    if whole != value:
        raise ValueError(
            f"Expected `{name}` to be a whole number, but got {value!r}: its records would be stored as {name} "
            f"{whole} and pooled with that {name}'s. Pass an integer count (an optimizer step, not a fraction of "
            "an epoch)."
        )
    return whole


def _per_sample(values: Any, name: str, lowest: int | None = None) -> Any:
    """Per-sample values checked and made int64 once: a host array (a copy: the caller may reuse its own), or,
    where a CUDA device holds them, an int64 tensor there, for :func:`to_host` to copy with the records.

    Refuses values that are no integers (a float would be cut to one, 0.7 to class 0 and -1.7 to "no label",
    silently) and, on the host, values below ``lowest`` (on a GPU that would wait for the device: the analysis
    checks them)."""
    if values is None:
        return None
    shape = tuple(getattr(values, "shape", None) or np.shape(values))
    if len(shape) > 1 and math.prod(shape[1:]) != 1:
        raise ValueError(
            f"Expected `{name}` of shape (N,), one per sample, but got shape {shape}: per-token or per-position "
            f"{name} are not stored (each observation takes its sample's). Pass one per sample (for a sequence: its "
            "class, its index in the dataset)."
        )
    if isinstance(values, torch.Tensor):
        if values.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no reductions in torch; uint64 > int64
            raise ValueError(
                f"Expected `{name}` of a signed integer dtype (or uint8), but got {values.dtype}, whose values torch "
                f"cannot check and int64 may not hold. Pass `{name}.long()` (values below 2**63)."
            )
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            _refuse_non_integers(values.dtype, name)
        values = values.detach().reshape(-1)
        if values.is_cuda:
            return values.to(torch.int64)
        values = values.cpu().numpy()
    else:
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.integer):
            _refuse_non_integers(values.dtype, name)
        if values.dtype == np.uint64 and values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise ValueError(
                f"Expected `{name}` that int64 holds, but got uint64 values up to {int(values.max())}: they would wrap "
                "to negative numbers (2**64 - 1 to -1, 'no label'), silently. Pass values below 2**63 as int64."
            )
    host = np.array(values, dtype=np.int64).reshape(-1)
    if lowest is not None and host.size and int(host.min()) < lowest:
        raise ValueError(
            f"Expected `{name}` of at least {lowest} (-1: no label), but got {int(host.min())}. Pass class "
            "indices 0..K-1, and -1 for a sample without a label."
        )
    return host


def _channels(module: nn.Module) -> int | None:
    """The channels (dimension 1) of what a convolution or a norm over channels outputs; None for other modules."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        return module.num_features
    return module.num_channels if isinstance(module, nn.GroupNorm) else None


def _position_shape(shape: tuple[int, ...], pattern: str) -> tuple[int, ...]:
    """The positions of a sample of a site whose pre-activations have ``shape`` (without the batch)."""
    if pattern == "flat" or len(shape) < 2:
        return ()
    return shape[:-1] if pattern == "channel_last" else shape[1:]


def _observation_mask(mask: Any) -> np.ndarray | None:
    """``mask`` as a host bool array of shape ``(N, *positions)``, checked (one read of a device tensor)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(
            f"Expected `mask` to be a bool tensor or array (True: an observation to keep), but got dtype {mask.dtype}. "
            "Pass `~padding_mask` of a padding mask (True at padding), or `lengths[:, None] > torch.arange(L)`."
        )
    if mask.ndim < 2:
        raise ValueError(f"Expected `mask` of shape (N, *positions), but got shape {mask.shape}.")
    return mask


def _refuse_non_integers(dtype: Any, name: str) -> None:
    raise ValueError(
        f"Expected `{name}` to be integers, but got dtype {dtype}: floats would be cut to integers (0.7 to 0, "
        f"-1.7 to -1) and bools read as 0/1, silently. Pass integer {name} (`.long()` of 0./1. targets)"
        + (", -1 for a sample without a label." if name == "labels" else ".")
    )


_DEVICE_FIELDS = ("nan_count", "values", "bits", "labels", "sample_ids")
_PER_SAMPLE = ("labels", "sample_ids")
_NUMPY_TYPES = {
    torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
    torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_,
}


def to_host(records: list[Record]) -> None:
    """Move the device tensors of ``records`` to host memory, one copy per stream that computed them.

    On CUDA, per stream: one concatenation on the device (none for a single tensor), one pinned host
    buffer, one non-blocking copy and one event in each record's ``ready`` (waited on by the writer
    thread), instead of a buffer, a copy and an event per tensor, each microseconds of launch time at every
    site; a copy of :data:`_SIDE_COPY_BYTES` or more runs on a side stream of the device, after the stream
    that computed it. The capture's labels and sample ids, one tensor shared by its records, travel once in
    that copy, and so does the one buffer that holds a site's bits and NaN count where the packing made
    both in it (the Triton kernel). Another accelerator (``stream`` is then its device) is copied
    synchronously. Each field becomes a numpy view of the host buffer (a numpy slice costs a fraction of a
    torch view's microseconds), wider element types first so that every view is aligned for its type; a
    torch view for a type numpy lacks (bfloat16), and labels or sample ids on another device than their
    records' are copied on their own, as torch tensors.
    """
    by_stream: dict[Any, list[Record]] = {}
    for record in records:
        if record.stream is not None:
            by_stream.setdefault(record.stream, []).append(record)
        else:  # the model ran on the CPU, its batch's labels were on a GPU: rare, copied at once
            for name in _PER_SAMPLE:
                if isinstance(getattr(record, name), torch.Tensor):
                    setattr(record, name, getattr(record, name).cpu())
    for stream, group in by_stream.items():
        cuda = isinstance(stream, tuple)
        device = torch.device("cuda", stream[1]) if cuda else stream
        # id(source) -> (source, its alignment in bytes); id(field tensor) -> (id(source), byte offset in it)
        sources: dict[int, tuple[torch.Tensor, int]] = {}
        places: dict[int, tuple[int, int]] = {}
        for record in group:
            _place_packed(record, sources, places)
            for name in _DEVICE_FIELDS:
                tensor = getattr(record, name)
                if not isinstance(tensor, torch.Tensor) or id(tensor) in places:
                    continue
                if name in _PER_SAMPLE and tensor.device != device:  # the batch on another GPU than the model
                    setattr(record, name, tensor.cpu())
                else:
                    sources[id(tensor)] = (tensor, tensor.element_size())
                    places[id(tensor)] = (id(tensor), 0)
        ordered = sorted(sources.items(), key=lambda item: -item[1][1])
        ready = host = None
        with _on_stream(stream) if cuda else contextlib.nullcontext():
            if not ordered:
                ready = _recorded_event() if cuda else None
            else:
                pieces = [_as_bytes(tensor) for _, (tensor, _) in ordered]
                flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
                host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=cuda)
                with _copy_stream(flat) if cuda else contextlib.nullcontext():
                    host.copy_(flat, non_blocking=cuda)
                    ready = _recorded_event() if cuda else None
        starts, offset = {}, 0
        for key, (tensor, _) in ordered:
            starts[key] = offset
            offset += tensor.numel() * tensor.element_size()
        host_bytes = None if host is None else host.numpy()
        views: dict[int, Any] = {}  # one view per tensor: records that shared a tensor share its view
        for record in group:
            for name in _DEVICE_FIELDS:
                tensor = getattr(record, name)
                place = places.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
                if place is not None:
                    view = views.get(id(tensor))
                    if view is None:
                        view = views[id(tensor)] = _host_view(host, host_bytes, starts[place[0]] + place[1], tensor)
                    setattr(record, name, view)
            record.ready, record.stream = ready, None


def _recorded_event() -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record()  # on the current stream
    return event


# A copy of at least this many bytes runs on a side stream of its device, so that the training's next kernels need
# not wait for it on their stream (37 MB per step of a ResNet-18 at 224x224, about a millisecond of the host link);
# a smaller one stays on the stream that computed it, where it costs less than the side stream's two events.
_SIDE_COPY_BYTES = 1 << 20
_side_streams: dict[int, torch.cuda.Stream] = {}


@contextlib.contextmanager
def _copy_stream(flat: torch.Tensor) -> Iterator[None]:
    """The stream for the host copy of ``flat`` (on the current CUDA stream, which computed it): the current one,
    or for a large copy a side stream that waits for the current one's work so far; ``flat`` is then kept from
    reuse by the caching allocator until the copy is done."""
    if flat.numel() < _SIDE_COPY_BYTES:
        yield
        return
    device = flat.get_device()
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device)
    side.wait_event(_recorded_event())
    with torch.cuda.stream(side):
        yield
    flat.record_stream(side)


def _place_packed(record: Record, sources: dict, places: dict) -> None:
    """Where ``record``'s bits and NaN count lie in one contiguous byte buffer (the Triton packing's, its size a
    multiple of 8 and the count 8-aligned in it; the bits a view of it), copy that buffer whole, once."""
    bits, count = record.bits, record.nan_count
    base = getattr(bits, "_base", None)
    if base is None or not isinstance(count, torch.Tensor) or count.dim() or id(bits) in places:
        return
    start = base.data_ptr()
    count_at = count.data_ptr() - start  # inside the buffer's bytes: the same allocation
    if not (base.dtype == torch.uint8 and base.dim() == 1 and base.is_contiguous() and bits.is_contiguous()
            and base.numel() % 8 == 0 and 0 <= count_at < base.numel() and count_at % 8 == 0
            and count.device == base.device):
        return
    sources[id(base)] = (base, 8)
    places[id(bits)] = (id(base), bits.data_ptr() - start)
    places[id(count)] = (id(base), count_at)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s elements as a flat uint8 tensor: itself where it is one already (no launch)."""
    if tensor.dtype == torch.uint8 and tensor.dim() == 1 and tensor.is_contiguous():
        return tensor
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _host_view(host: torch.Tensor, host_bytes: np.ndarray, offset: int, tensor: torch.Tensor) -> Any:
    """The part of the host buffer at byte ``offset`` that holds ``tensor``: a numpy array of its shape and
    type (a torch tensor for a type numpy lacks, such as bfloat16)."""
    end = offset + tensor.numel() * tensor.element_size()
    numpy_type = _NUMPY_TYPES.get(tensor.dtype)
    if numpy_type is None:
        return host[offset:end].view(tensor.dtype).reshape(tensor.shape)
    return host_bytes[offset:end].view(numpy_type).reshape(tensor.shape)


@contextlib.contextmanager
def _on_stream(key: tuple) -> Iterator[None]:
    """Make the CUDA stream ``key`` (a :func:`_stream` tuple) and its device current, so that an event recorded
    without a stream is recorded on it: a switch only where another stream or device is current (each switch,
    and each ``torch.cuda.Stream`` object, costs microseconds of launch-side time; a model on a device that is
    not the current one, such as ``cuda:1`` without ``torch.cuda.set_device``, needs it)."""
    if torch._C._cuda_getDevice() == key[1] and torch._C._cuda_getCurrentStream(key[1]) == key:
        yield
    else:
        with torch.cuda.stream(torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])):
            yield


#: The oldest torch whose dynamo records compiled models exactly (tested: 2.6, 2.7, 2.11, 2.13; 2.4 and 2.5 fail).
MIN_COMPILED_TORCH = (2, 6)


def _torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch, from its version string (``2.6.0+cu124`` -> (2, 6))."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _stream(tensor: torch.Tensor) -> Any:
    """What computes ``tensor``, for :func:`to_host`: None on the CPU, another device, or a CUDA stream as
    torch's raw ``(stream_id, device_index, device_type)`` tuple (a ``torch.cuda.Stream`` object costs
    microseconds to make at every site)."""
    if tensor.is_cuda:
        return torch._C._cuda_getCurrentStream(tensor.get_device())
    return None if tensor.is_cpu else tensor.device


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


__all__ = ["ActivationRecorder", "RecorderError"]

"""Probe execution (SPEC section 6): the probe copy of a module, its weight sync, RNG isolation, the
probe forward rule, and one pass of the probe set through a recorder.

Nothing here decides *when* to probe; the callback does. Nothing here needs a ``Trainer`` except the
read-only trainer view given to the copy, so that a ``training_step`` run as the probe forward can read
``self.trainer``, ``self.current_epoch`` and ``self.global_step`` without changing anything.
"""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from actpat.callbacks._batches import INPUT_KEYS, BatchReader
from actpat.callbacks._lightning import is_lightning_class, move_data_to_device
from actpat.recorder.hooks import SiteHooks
from actpat.recorder.recorder import ActivationRecorder

#: Split name of probe records.
PROBE_SPLIT = "probe"


class ProbeForwardError(RuntimeError):
    """The probe forward raised; the message says which rule ran and which option changes it."""


# ---------------------------------------------------------------------- the probe set
def check_probe_set(probe: Any) -> None:
    """Reject what can never be a probe set: another type, or a DataLoader that shuffles."""
    if probe is None:
        return
    if isinstance(probe, DataLoader):
        if isinstance(probe.sampler, RandomSampler):
            raise ValueError(
                "Expected a probe DataLoader that iterates in a fixed order, but it shuffles (RandomSampler). "
                "Pass the Dataset, or a DataLoader with shuffle=False."
            )
        return
    if not (isinstance(probe, Dataset) or hasattr(probe, "__getitem__")):
        raise ValueError(f"Expected `probe` to be a Dataset, a DataLoader or None, but got {type(probe).__name__}.")


def probe_loader(probe: Any, batch_size: int) -> DataLoader:
    """The probe set as a fixed-order DataLoader (a DataLoader is used as it is)."""
    if isinstance(probe, DataLoader):
        return probe
    return DataLoader(probe, batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------- the probe copy
def probe_copy(module: nn.Module, mode: str, trainer: Any) -> nn.Module:
    """An eager, gradient-free copy of a LightningModule for probing, made once per fit.

    Its weights are synced before each probe (:func:`sync_weights`). Dropout is off in both modes, so a
    probe is a deterministic function of the weights. What a ``training_step`` could change on the
    trainer's side is made inert on the copy (see :func:`_make_inert`).
    """
    probe = copy.deepcopy(module)  # LightningModule.__getstate__ drops the trainer reference
    if getattr(probe, "_compiler_ctx", None) is not None:
        # Lightning's from_compiled() put compiled bound methods on the instance: back to the class's.
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            probe.__dict__.pop(name, None)
        probe._compiler_ctx = None
    for parent in list(probe.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "OptimizedModule":
                setattr(parent, name, child._orig_mod)
    probe.requires_grad_(False)
    probe.train(mode == "train")
    for sub in probe.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.eval()
    _make_inert(probe, trainer)
    return probe


def sync_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s parameters and buffers into ``target`` (``torch.compile`` prefixes removed)."""
    state = {key.replace("_orig_mod.", ""): value for key, value in source.state_dict().items()}
    target.load_state_dict(state)


def _make_inert(probe: nn.Module, trainer: Any) -> None:
    """Let ``training_step`` run on the copy without touching the trainer, its loggers or optimizers.

    On every LightningModule of the copy: ``self.log`` and ``self.log_dict`` do nothing;
    ``self.optimizers()`` and ``self.lr_schedulers()`` return stand-ins whose ``step``/``zero_grad``
    change nothing (a closure passed to ``step`` is called once, so closure-style steps run their
    forward); ``manual_backward``, ``toggle_optimizer``, ``untoggle_optimizer``, ``toggled_optimizer``
    and ``clip_gradients`` do nothing. ``self.trainer`` is a view of the real trainer: attributes read
    through, writes are ignored, its ``logger``/``loggers`` are None/[] and its ``optimizers`` the
    stand-ins.
    """
    view = _TrainerView(trainer, logger=None, loggers=[])
    for sub in probe.modules():
        if not (hasattr(sub, "training_step") and any(is_lightning_class(c) for c in type(sub).__mro__)):
            continue
        for name in ("log", "log_dict", "manual_backward", "toggle_optimizer", "untoggle_optimizer", "clip_gradients"):
            object.__setattr__(sub, name, _nothing)
        object.__setattr__(sub, "toggled_optimizer", lambda *args, **kwargs: contextlib.nullcontext())
        object.__setattr__(sub, "optimizers", lambda use_pl_optimizer=True: _one_or_list(view.optimizers))
        object.__setattr__(sub, "lr_schedulers", lambda: _schedulers(trainer))
        sub.__dict__["_trainer"] = view


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _call_closure(closure: Optional[Callable[[], Any]] = None, *args: Any, **kwargs: Any) -> Any:
    return closure() if closure is not None else None


class _View:
    """Reads go to ``target`` unless overridden; writes are ignored."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_target"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        pass  # e.g. `self.trainer.should_stop = True` in a probe must not stop the real fit


class _TrainerView(_View):
    @property
    def optimizers(self) -> list:
        """Stand-ins of the trainer's optimizers, looked up when asked (they exist once fit has set up)."""
        return [_View(opt, step=_call_closure, zero_grad=_nothing) for opt in object.__getattribute__(self, "_target").optimizers]


def _schedulers(trainer: Any) -> Any:
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    return _one_or_list([_View(config.scheduler, step=_nothing) for config in configs]) if configs else None


def _one_or_list(items: list) -> Any:
    return items[0] if len(items) == 1 else items


# ---------------------------------------------------------------------- the probe forward rule
def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (not Lightning's or torch's base class) defines ``forward``."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls is not nn.Module and not is_lightning_class(cls)
    return False


class ProbeForward:
    """How one probe batch runs through the probe copy.

    The rule: ``probe_forward(module, batch)`` when given; else ``module(inputs)`` when the module's
    class overrides ``forward`` (inputs by ``inputs_from`` or the default rule of
    :func:`~actpat.callbacks._batches.default_inputs`); else ``module.training_step(batch, 0)``, the
    module's own batch handling. Errors are re-raised as :class:`ProbeForwardError` naming the rule
    and the option that changes it.
    """

    def __init__(self, module: nn.Module, probe_forward: Optional[Callable[[Any, Any], Any]], reader: BatchReader) -> None:
        name = type(module).__name__
        if probe_forward is not None:
            self._run = probe_forward
            self.rule = "your `probe_forward(module, batch)`"
            self._hint = "Fix `probe_forward`: it gets the probe copy of the module and a probe batch on its device."
        elif overrides_forward(module):
            self._run = lambda m, batch: m(reader.inputs(batch))
            inputs = "`inputs_from(batch)`" if reader.custom_inputs else f"batch[0], or batch[key] for a key in {INPUT_KEYS}"
            self.rule = f"`module(inputs)` with inputs = {inputs}, because {name} overrides `forward`"
            self._hint = (
                "If the probe batches are not `(inputs, labels, ...)` or dicts with an input key, pass `inputs_from=` "
                "(and `labels_from=`); to run the module another way, pass `probe_forward=`."
            )
        else:
            self._run = lambda m, batch: m.training_step(batch, 0)
            self.rule = f"`training_step(batch, 0)` on the probe copy, because {name} does not override `forward`"
            self._hint = (
                "Pass `probe_forward=` (for example `lambda module, batch: module.net(batch[0])`), or give the module "
                "a `forward`. On the probe copy `self.log`, optimizers, schedulers and `manual_backward` do nothing; "
                "collective calls (`self.all_gather`) are not supported."
            )

    def __call__(self, module: nn.Module, batch: Any) -> Any:
        try:
            return self._run(module, batch)
        except Exception as exc:
            raise ProbeForwardError(
                f"The probe forward, {self.rule}, failed on a probe batch {describe(batch)} with {exc!r}. {self._hint}"
            ) from exc


def describe(batch: Any, depth: int = 0) -> str:
    """A short structural description of a batch for error messages: types, shapes, dtypes, keys."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{list(batch.shape)} {str(batch.dtype).replace('torch.', '')}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{key!r}: {describe(value, depth + 1)}" for key, value in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}(" + ", ".join(describe(item, depth + 1) for item in batch) + ")"
    return type(batch).__name__


# ---------------------------------------------------------------------- running the probe set
@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Restore torch (CPU and ``device``), numpy and python RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _probe_batches(loader: DataLoader, device: torch.device, reader: BatchReader, limit: Optional[int] = None):
    """Yield ``(batch on device, sample ids, labels)``; sample ids are indices into the probe set."""
    offset = 0
    for index, batch in enumerate(loader):  # iterating draws a base seed from the global RNG: isolate it
        if limit is not None and index >= limit:
            return
        batch = move_data_to_device(batch, device)
        n = reader.size(batch)
        yield batch, torch.arange(offset, offset + n), reader.labels(batch, n)
        offset += n


def run_probe(
    probe: nn.Module,
    source: nn.Module,
    recorder: ActivationRecorder,
    loader: DataLoader,
    reader: BatchReader,
    forward: ProbeForward,
    forward_context: Callable[[], Any],
    *,
    step: int,
    epoch: int,
) -> None:
    """Sync ``probe`` to ``source`` and record the whole probe set through it as time point ``step``."""
    device = _device(source)
    with isolated_rng(device), torch.no_grad():
        sync_weights(probe, source)
        for batch, ids, labels in _probe_batches(loader, device, reader):
            with recorder.capture(step, labels=labels, sample_ids=ids, split=PROBE_SPLIT, epoch=epoch):
                with forward_context():
                    forward(probe, batch)


def dry_run(
    probe: nn.Module,
    source: nn.Module,
    hooks: SiteHooks,
    loader: DataLoader,
    reader: BatchReader,
    forward: ProbeForward,
    forward_context: Callable[[], Any],
) -> None:
    """Run the first probe batch through the synced ``probe`` with ``hooks`` attached, recording nothing."""
    device = _device(source)
    with isolated_rng(device), torch.no_grad():
        sync_weights(probe, source)
        for batch, _, _ in _probe_batches(loader, device, reader, limit=1):
            hooks.attach()
            try:
                with forward_context():
                    forward(probe, batch)
            finally:
                hooks.detach()


def _device(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(module.parameters(), torch.empty(0)).device

"""Probing a LightningModule: its probe forward rule, and the module made inert; Lightning is never imported.

The probe protocol itself (copy or not, weight sync, RNG isolation, the probe set, capture, live
statistics) is :class:`~actpat.recorder.prober.Prober`'s. What is Lightning's lives here: a module
without ``forward`` is probed through its ``training_step``, which must then run without touching the
trainer, its loggers or its optimizers. The Lightning callback probes live by these rules, and
:func:`~actpat.recorder.checkpoint_replay.replay` by the same ones, so that a replay records what the
callback did.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from torch import nn

from actpat.recorder.batches import BatchReader
from actpat.recorder.prober import ProbeForward

#: Import names of the Lightning packages whose classes are Lightning's own (``lightning`` and ``pytorch_lightning``).
LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def is_lightning_class(cls: type) -> bool:
    """Whether ``cls`` is defined by a Lightning package (not by the user)."""
    return cls.__module__.startswith(tuple(f"{name}." for name in LIGHTNING_PACKAGES))


def is_lightning_module(module: nn.Module) -> bool:
    """Whether ``module`` is a LightningModule (of either package), judged by its class's bases."""
    return any(is_lightning_class(cls) for cls in type(module).__mro__)


def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class (not Lightning's or torch's base class) defines ``forward``."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls is not nn.Module and not is_lightning_class(cls)
    return False


def lightning_forward(
    module: nn.Module,
    probe_forward: Optional[Callable[[Any, Any], Any]],
    reader: BatchReader,
    forward_context: Callable[[], Any],
) -> ProbeForward:
    """How one probe batch runs through a LightningModule, under the trainer's precision context.

    The rule: ``probe_forward(module, batch)`` when given; else ``module(inputs)`` when the module's
    class overrides ``forward`` (inputs by ``inputs_from`` or the default rule of
    :func:`~actpat.recorder.batches.default_inputs`); else ``module.training_step(batch, 0)``, the
    module's own batch handling (on a module made :func:`inert`). Errors are raised as
    :class:`~actpat.recorder.prober.ProbeForwardError` naming the rule and the option that changes it.
    """
    if probe_forward is not None or overrides_forward(module):
        because = "" if probe_forward is not None else f", because {type(module).__name__} overrides `forward`"
        return ProbeForward.default(probe_forward, reader, option="probe_forward", because=because,
                                    context=forward_context)
    return training_step_forward(module, "`probe_forward=`", forward_context)


def training_step_forward(
    module: nn.Module, option: str, forward_context: Optional[Callable[[], Any]] = None
) -> ProbeForward:
    """``module.training_step(batch, 0)`` as the probe forward of a LightningModule without ``forward``, to run
    on a module made :func:`inert`; ``option`` says how the caller's user passes a probe forward instead."""
    hint = (
        f"Pass {option} (for example `lambda module, batch: module.net(batch[0])`), or give the module "
        "a `forward`. While probing, `self.log`, optimizers, schedulers and `manual_backward` do nothing; "
        "collective calls (`self.all_gather`) are not supported."
    )
    return ProbeForward(
        lambda m, batch: m.training_step(batch, 0),
        f"`training_step(batch, 0)` on the probed module, because {type(module).__name__} does not override `forward`",
        hint, forward_context,
    )


@contextlib.contextmanager
def inert(module: nn.Module, trainer: Any) -> Iterator[None]:
    """Let ``training_step`` run on ``module`` without touching the trainer, its loggers or optimizers
    (``trainer`` None: a module replayed outside any fit, which has neither; it keeps no trainer, so
    ``self.current_epoch`` and ``self.global_step`` read 0 as on any module outside a fit).

    While the context is active, on every LightningModule in ``module``: ``self.log`` and
    ``self.log_dict`` do nothing; ``self.optimizers()`` and ``self.lr_schedulers()`` return stand-ins
    whose ``step``/``zero_grad`` change nothing (a closure passed to ``step`` is called once, so
    closure-style steps run their forward); ``manual_backward``, ``toggle_optimizer``,
    ``untoggle_optimizer``, ``toggled_optimizer`` and ``clip_gradients`` do nothing. ``self.trainer``
    is a view of the real trainer: attributes read through, writes are ignored, its
    ``logger``/``loggers`` are None/[] and its ``optimizers`` the stand-ins. Everything is restored on
    exit, so the real module may be lent to the probe (``probe_copy=False``).
    """
    view = _TrainerView(trainer, logger=None, loggers=[])
    overrides = {name: _nothing for name in ("log", "log_dict", "manual_backward", "toggle_optimizer",
                                              "untoggle_optimizer", "clip_gradients")}
    overrides["toggled_optimizer"] = lambda *args, **kwargs: contextlib.nullcontext()
    overrides["optimizers"] = lambda use_pl_optimizer=True: _one_or_list(view.optimizers)
    overrides["lr_schedulers"] = lambda: _schedulers(trainer)
    if trainer is not None:
        overrides["_trainer"] = view
    saved = []
    for sub in module.modules():
        if not (hasattr(sub, "training_step") and is_lightning_module(sub)):
            continue
        for name, value in overrides.items():
            saved.append((sub, name, name in sub.__dict__, sub.__dict__.get(name)))
            sub.__dict__[name] = value  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        for sub, name, had, old in reversed(saved):
            if had:
                sub.__dict__[name] = old
            else:
                del sub.__dict__[name]


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
        optimizers = getattr(object.__getattribute__(self, "_target"), "optimizers", [])
        return [_View(opt, step=_call_closure, zero_grad=_nothing) for opt in optimizers]


def _schedulers(trainer: Any) -> Any:
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    return _one_or_list([_View(config.scheduler, step=_nothing) for config in configs]) if configs else None


def _one_or_list(items: list) -> Any:
    return items[0] if len(items) == 1 else items

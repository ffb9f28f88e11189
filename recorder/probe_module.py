"""The module a probe runs on (SPEC section 6), without changing anything training sees.

Two ways, chosen by the prober's ``copy`` option:

- **copy** (default): an eager, gradient-free copy of the model, made at the first probe; before each
  probe its parameters and buffers are overwritten in place (``copy_``) with the model's. Costs a
  second set of weights in memory; the real model is never touched.
- **no copy**: the model itself. Around each probe, the train/eval flag of every submodule and every
  buffer (BatchNorm running statistics, counters) are saved and restored; parameters are only read
  (an in-place change of a parameter by the probe forward is detected and raised). Costs one copy of
  the buffers only.

Both run the probe under ``no_grad`` with every RNG stream (torch CPU and the model's accelerator,
numpy, python) saved and restored, so a run with probes trains bit-identically to one without.
"""

from __future__ import annotations

import contextlib
import copy as copying
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

MODES = ("train", "eval")


class ProbeModule:
    """Lend ``model``, or an in-place synced copy of it, to a probe.

    Parameters
    ----------
    model : nn.Module
        The module being trained.
    mode : {"train", "eval"}
        ``train``: BatchNorm normalizes with the probe batch's statistics; ``eval``: with the running
        statistics. Dropout is off in both, so a probe is a deterministic function of the weights.
    copy : bool
        Probe an eager copy (True) or the model itself (False); see the module docstring.

    Raises
    ------
    ValueError
        With ``copy=False``, if ``model`` is compiled with ``torch.compile``: hooks cannot see inside a
        compiled graph, and only a copy can be made eager.
    """

    def __init__(self, model: nn.Module, mode: str, copy: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
        if not copy and compiled_parts(model):
            raise ValueError(
                f"Expected an eager model for `copy=False`, but {type(model).__name__} is compiled with torch.compile "
                f"({', '.join(compiled_parts(model))}): hooks cannot see inside a compiled graph, and without a copy "
                "the probe would run the compiled code. Pass `copy=True` (the probe then runs an eager copy)."
            )
        self.model = model
        self.mode = mode
        self.copy = copy
        self._copy: nn.Module | None = None
        self._pairs: list[tuple[dict, dict, str]] = []

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (or buffer); CPU for a module without tensors."""
        for tensor in _tensors(self.model):
            return tensor.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def session(self) -> Iterator[nn.Module]:
        """The module to run one probe on, in the probe mode, under ``no_grad`` with every RNG isolated."""
        with isolated_rng(self.device), torch.no_grad():
            if self.copy:
                module = self._synced_copy()
                _set_mode(module, self.mode)
                yield module
            else:
                with _preserved(self.model):
                    _set_mode(self.model, self.mode)
                    yield self.model

    # ------------------------------------------------------------------ copy
    def _synced_copy(self) -> nn.Module:
        if self._copy is None or not self._sync():
            self._copy = eager_copy(self.model)
            self._pairs = _tensor_pairs(self._copy, self.model)
        return self._copy

    def _sync(self) -> bool:
        """Overwrite the copy's tensors with the model's in place; False if they no longer match."""
        targets, sources = [], []
        for target_dict, source_dict, key in self._pairs:
            target, source = target_dict.get(key), source_dict.get(key)
            if target is None or source is None:
                if target is not source:
                    return False
                continue
            if target.shape != source.shape or target.dtype != source.dtype or target.device != source.device:
                return False  # the model was moved, cast or resized: make a new copy
            targets.append(target)
            sources.append(source)
        if targets:
            torch._foreach_copy_(targets, sources)  # one grouped copy instead of a state_dict round trip
        return True


def eager_copy(model: nn.Module) -> nn.Module:
    """A gradient-free deep copy of ``model`` with every ``torch.compile`` wrapper removed."""
    if _is_optimized(model):
        model = model._orig_mod
    probe = copying.deepcopy(model)  # a LightningModule's __getstate__ drops its trainer reference
    for parent in list(probe.modules()):
        # A function compiled onto the instance (e.g. `forward` after fit was given a compiled module) is
        # shared, not copied, by deepcopy and would run the original module: back to the class's method.
        for name, value in list(vars(parent).items()):
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable"):
                del parent.__dict__[name]
        for name, child in list(parent.named_children()):
            if _is_optimized(child):
                setattr(parent, name, child._orig_mod)
    return probe.requires_grad_(False)


def compiled_parts(model: nn.Module) -> list[str]:
    """Where ``model`` is compiled: wrapped submodules by path, and functions compiled onto instances."""
    parts = [name or "the module" for name, m in model.named_modules() if _is_optimized(m)]
    for name, module in model.named_modules():
        parts += [
            f"{name + '.' if name else ''}{attr}"
            for attr, value in vars(module).items()
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable")
        ]
    return parts


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


def _is_optimized(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _tensor_pairs(target: nn.Module, source: nn.Module) -> list[tuple[dict, dict, str]]:
    """``(target dict, source dict, key)`` of every parameter and buffer, matched by module path.

    The dicts are the modules' own ``_parameters``/``_buffers``, looked up at every sync, so a buffer
    that a module reassigns (rather than updates in place) is still followed.
    """
    sources = {name.replace("_orig_mod.", "").replace("_orig_mod", ""): m for name, m in source.named_modules()}
    pairs = []
    for name, module in target.named_modules():
        other = sources.get(name)
        if other is None:
            raise RuntimeError(f"The probe copy has a submodule {name!r} that the model lacks; cannot sync weights.")
        for kind in ("_parameters", "_buffers"):
            pairs += [(getattr(module, kind), getattr(other, kind), key) for key in getattr(module, kind)]
    return pairs


def _set_mode(module: nn.Module, mode: str) -> None:
    module.train(mode == "train")
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.eval()


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train flag and every buffer of ``model`` on exit; refuse changed parameters."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [
        (m._buffers, key, tensor, tensor.clone())
        for m in model.modules() for key, tensor in m._buffers.items() if tensor is not None
    ]
    parameters = [(name, p, p._version) for name, p in model.named_parameters()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
        for owner, key, tensor, saved in buffers:
            owner[key] = tensor  # also where the forward reassigned it: training holds this object
            tensor.copy_(saved)  # always: BatchNorm's kernel updates its statistics without a version bump
    changed = [name for name, p, version in parameters if p._version != version]
    if changed:
        raise RuntimeError(
            f"The probe forward changed parameters of the model in place ({changed}); with `copy=False` that changes "
            "training. Pass `copy=True` so that the probe runs on a copy."
        )

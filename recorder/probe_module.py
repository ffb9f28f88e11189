"""The module a probe runs on (SPEC section 6), without changing anything training sees.

Two ways, chosen by the prober's ``copy`` option:

- **copy** (default): an eager, gradient-free copy of the model, made at the first probe; before each
  probe its parameters and buffers are overwritten in place (``copy_``) with the model's. Costs a
  second set of weights in memory; the real model is never touched.
- **no copy**: the model itself. Around each probe, the train/eval flag of every submodule, every
  buffer (BatchNorm running statistics, counters) and each module's own attributes (numbers, strings,
  lists, dicts and sets by their contents, RNGs a module owns by their states; buffers, parameters
  and submodules a forward adds are removed again) are saved and restored; parameters and tensors
  kept as plain attributes (or one level inside a list, tuple or dict) are only read (an in-place change
  of one by the probe forward is detected and raised). Costs one copy of the buffers only.

Before each probe the copy also takes the model's plain attributes that training may change (numbers
and strings such as a schedule's ``alpha``, tensors and arrays by value, RNG states), and is made anew
where the model's layout changed (a submodule replaced, a buffer, parameter or forward hook added or removed).

Both run the probe under ``no_grad`` with every RNG stream (torch CPU and the model's accelerator,
numpy, python) saved and restored, so a run with probes trains bit-identically to one without.
"""

from __future__ import annotations

import contextlib
import copy as copying
import numbers
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
        ``train``: BatchNorm (and InstanceNorm with running statistics) normalizes with the probe batch's
        statistics, where ``model.train()`` puts it in training mode (a frozen BatchNorm stays frozen);
        ``eval``: with the running statistics. Every other module is in eval mode in both, so that dropout
        (``nn.Dropout``, ``F.dropout(x, p, self.training)``, DropPath) and other noise a forward draws when
        ``self.training`` are off.
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
        self._modules: list[tuple[nn.Module, nn.Module]] = []
        self._layout: list | None = None
        self._synced: dict = {}  # (copy module id, attribute) -> the model's array and version at the last sync

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
                _refuse_lazy(self.model)
                with _preserved(self.model):
                    _set_mode(self.model, self.mode)
                    yield self.model

    # ------------------------------------------------------------------ copy
    def _synced_copy(self) -> nn.Module:
        layout = _layout(self.model)
        if self._copy is None or layout != self._layout or not self._sync():
            _refuse_lazy(self.model)
            self._copy = eager_copy(self.model)
            self._pairs = _tensor_pairs(self._copy, self.model)
            self._modules = _module_pairs(self._copy, self.model)
            self._layout, self._synced = layout, {}
        for target, source in self._modules:
            _sync_attributes(target, source, self._synced)
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
    try:
        probe = copying.deepcopy(model)  # a LightningModule's __getstate__ drops its trainer reference
    except Exception as exc:  # noqa: BLE001 - whatever a module's state refuses, named with the way out
        raise RuntimeError(
            f"The probe copies the model with copy.deepcopy, which failed on {type(model).__name__}: {exc} (Weights "
            "computed from others outside autograd's leaves, as torch.nn.utils.prune and the old weight_norm make "
            "them, refuse deepcopy.) Pass `copy=False` (the callback's `probe_copy=False`) to probe the model itself "
            "instead."
        ) from exc
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


def _refuse_lazy(model: nn.Module) -> None:
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"Expected initialized parameters, but {', '.join(lazy)} are not initialized yet (a lazy module such as "
            "nn.LazyLinear), and the first probe runs before the first training step. Initialize them with one "
            "forward pass of an example batch before training (`model(example)`), as torch advises for lazy modules."
        )


def _layout(model: nn.Module) -> list[tuple[int, tuple, tuple, tuple, tuple]]:
    """Which module objects the model holds, the names of their parameters and buffers, and their forward hooks
    (a hook added or removed since the copy was made must be so in the copy too)."""
    return [(id(m), tuple(m._parameters), tuple(m._buffers), tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
            for m in model.modules()]


def _module_pairs(target: nn.Module, source: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    sources = dict(_uncompiled_names(source))
    return [(module, sources[name]) for name, module in target.named_modules()]


def _uncompiled_names(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, sub in module.named_modules():
        yield name.replace("_orig_mod.", "").replace("_orig_mod", ""), sub


def _tensor_pairs(target: nn.Module, source: nn.Module) -> list[tuple[dict, dict, str]]:
    """``(target dict, source dict, key)`` of every parameter and buffer, matched by module path.

    The dicts are the modules' own ``_parameters``/``_buffers``, looked up at every sync, so a buffer
    that a module reassigns (rather than updates in place) is still followed.
    """
    sources = dict(_uncompiled_names(source))
    pairs = []
    for name, module in target.named_modules():
        other = sources.get(name)
        if other is None:
            raise RuntimeError(f"The probe copy has a submodule {name!r} that the model lacks; cannot sync weights.")
        for kind in ("_parameters", "_buffers"):
            pairs += [(getattr(module, kind), getattr(other, kind), key) for key in getattr(module, kind)]
    return pairs


def _set_mode(module: nn.Module, mode: str) -> None:
    # Every module in eval mode, also in "train": noise a forward draws when `self.training` (F.dropout(x, p,
    # self.training), DropPath, RReLU) would make a probe's patterns random. "train" differs in the normalization
    # layers alone, which normalize with the probe batch's statistics where the model's own `train()` puts them in
    # training mode (a model that overrides it to keep its BatchNorm frozen keeps it so).
    module.train(mode == "train")
    for sub in module.modules():
        if not isinstance(sub, nn.modules.batchnorm._NormBase):
            sub.training = False  # the flag alone: an overridden `eval()` could set the norms again


def rng_states(device: torch.device) -> tuple:
    """The torch (CPU and ``device``), numpy and python RNG states, to compare (:func:`same_rng_states`): whether a
    call between two of them drew random numbers."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    _, keys, position, *_ = np.random.get_state()
    return torch.get_rng_state(), cuda, keys.copy(), position, random.getstate()


def same_rng_states(a: tuple, b: tuple) -> bool:
    """Whether two :func:`rng_states` are equal."""
    return (torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1])) and np.array_equal(a[2], b[2])
            and a[3:] == b[3:])


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train flag, buffers and own attributes on exit; refuse parameters and tensor
    attributes changed in place."""
    modules = list(model.named_modules())
    flags = [(m, m.training) for _, m in modules]
    buffers = [
        (m._buffers, key, tensor, tensor.clone())
        for _, m in modules for key, tensor in m._buffers.items() if tensor is not None
    ]
    # Which buffers, parameters and submodules each module has: a forward that adds one (a buffer made at the
    # first call) would leave it, made from probe data, for training.
    registries = [(d, dict(d)) for _, m in modules for d in (m._buffers, m._parameters, m._modules)]
    attributes = [(m, _attributes(m)) for _, m in modules]
    watched = [(name, p, p._version) for name, p in model.named_parameters()]
    watched += [(f"{path + '.' if path else ''}{key}{where}", tensor, tensor._version)
                for (path, _), (_, saved) in zip(modules, attributes)
                for key, (value, _) in saved.items() for where, tensor in _tensors_in(value)]  # fmt: skip
    try:
        yield
    finally:
        for registry, saved in registries:
            if registry.keys() != saved.keys() or any(registry[k] is not v for k, v in saved.items()):
                registry.clear()
                registry.update(saved)
        for module, saved in attributes:
            _restore_attributes(module, saved)
        for module, flag in flags:
            module.training = flag
        for owner, key, tensor, saved in buffers:
            owner[key] = tensor  # also where the forward reassigned it: training holds this object
            tensor.copy_(saved)  # always: BatchNorm's kernel updates its statistics without a version bump
    changed = [name for name, tensor, version in watched if tensor._version != version]
    if changed:
        raise RuntimeError(
            f"The probe forward changed tensors of the model in place ({changed}): parameters, or tensors kept as "
            "plain attributes or in a list, tuple or dict attribute (a metric's state, say), which `copy=False` does "
            "not save; that changes training. Pass `copy=True` so that the probe runs on a copy; or keep such state "
            "in a buffer (`register_buffer`), which is saved and restored; or, for a metric (torchmetrics) updated "
            "in `training_step`, probe through a forward that does not update it (the callback's `probe_forward=`, "
            "the Prober's `forward=`)."
        )


def _attributes(module: nn.Module) -> dict[str, tuple[object, object]]:
    """``name -> (value, saved contents)`` of a module's own attributes (not nn.Module's machinery)."""
    return {name: (value, _contents(value)) for name, value in vars(module).items() if name not in _MODULE_INTERNALS}


def _contents(value: object) -> object:
    if isinstance(value, (list, dict, set)):
        return copying.copy(value)  # shallow: an appended output, a counter in a dict
    return _rng_state(value)  # None for numbers, strings and tuples (restored by reference) and tensors (watched)


def _tensors_in(value: object) -> list[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` of a tensor attribute, or of the tensors one level inside a list, tuple or dict."""
    if isinstance(value, torch.Tensor):
        return [("", value)]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [(f"[{key!r}]", item) for key, item in items if isinstance(item, torch.Tensor)]


def _rng_state(value: object) -> object:
    """The state of an RNG object (torch, numpy, python), or None for any other value."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, np.random.Generator):
        return value.bit_generator.state
    if isinstance(value, np.random.RandomState):
        return value.get_state()
    if isinstance(value, random.Random):
        return value.getstate()
    return None


def _set_rng_state(value: object, state: object) -> None:
    if isinstance(value, torch.Generator):
        value.set_state(state)
    elif isinstance(value, np.random.Generator):
        value.bit_generator.state = state
    elif isinstance(value, np.random.RandomState):
        value.set_state(state)
    elif isinstance(value, random.Random):
        value.setstate(state)


def _sync_attributes(target: nn.Module, source: nn.Module, synced: dict) -> None:
    """Give the copy's module ``target`` the model's values of what training changes besides parameters and
    buffers: numbers and strings (a fade-in `alpha`), tensors and arrays kept as plain attributes (their
    values), RNGs (their states). Containers and other objects stay the copy's own.

    ``synced`` holds, per array attribute, the model's object (and a tensor's version) at its last sync: one
    unchanged since (a dataset or a table kept on the module) is not copied again at every probe. A numpy
    array changed in place is not seen (it has no version counter)."""
    own = target.__dict__
    for name, value in vars(source).items():
        if name in _MODULE_INTERNALS:
            continue
        if isinstance(value, _NUMBERS):
            own[name] = value
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            tensor = isinstance(value, torch.Tensor)
            key, state = (id(target), name), (value, value._version if tensor else None)
            last = synced.get(key)
            if last is not None and last[0] is value and last[1] == state[1]:
                continue
            synced[key] = state
            # A fresh copy, never written into the copy's own: that may be shared with another attribute.
            own[name] = value.detach().clone() if tensor else value.copy()
        elif type(own.get(name)) is type(value) and (state := _rng_state(value)) is not None:
            _set_rng_state(own[name], state)



def _restore_attributes(module: nn.Module, saved: dict[str, tuple[object, object]]) -> None:
    own = module.__dict__
    for name in [name for name in own if name not in saved and name not in _MODULE_INTERNALS]:
        del own[name]  # set by the probe forward
    for name, (value, contents) in saved.items():
        own[name] = value
        if isinstance(value, list):
            value[:] = contents
        elif isinstance(value, (dict, set)):
            value.clear()
            value.update(contents)
        elif contents is not None:
            _set_rng_state(value, contents)


# nn.Module's own attributes (parameters, buffers, submodules, hooks, the train flag): handled apart.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_NUMBERS = (numbers.Number, str, type(None), np.generic)  # immutable: shared with the copy as they are

"""Find the activation sites of a model and hand each call's pre-activation to a callback.

Eager models: hooks are installed only while a capture is active, so a forward pass outside
``capture()`` runs the model untouched. Module sites are seen through global forward pre-hooks (the
input arrives before an in-place op can overwrite it) or, where only the signs matter, the in-place
ReLU-family calls after they ran (see ``signs_only``); functional calls through a ``TorchFunctionMode``,
entered on the capturing thread only while a forward of the model runs, so that the loss, backward and
the optimizer do not pay its Python dispatch on every torch call, and paused inside leaf layers that
cannot make a functional site call (torch's own layers of the exact type, without hooks or a forward
set on the instance, and the activation modules, whose own call is the site).

Compiled models (``torch.compile``): dynamo sees only the hooks that exist when it traces a graph and
does not notice hooks added later. Every module then gets its own pre- and post-hook for the lifetime
of the :class:`SiteHooks`, each doing nothing unless a capture is active; dynamo traces them, the
functional-call mode and the callback into the graph (one graph with and one without an active
capture), so the callback's tensor ops run inside the compiled code.
"""

from __future__ import annotations

import dis
import fnmatch
import itertools
import logging
import math
import threading
import types
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU)

# Every spelling of a ReLU-family call, mapped to the name used in site names.
FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
}

_IN_PLACE_FUNCTIONS = frozenset({F.relu_, torch.relu_, torch.Tensor.relu_, F.leaky_relu_})
_FLAGGED_FUNCTIONS = frozenset({F.relu, F.relu6, F.leaky_relu})  # in place with inplace=True
_SLOPED_FUNCTIONS = frozenset({F.leaky_relu, F.leaky_relu_})

SiteFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
SiteCallback = Callable[[str, str, torch.Tensor], None]

# Leaf layers of torch whose forward makes no ReLU-family call: the functional-call interceptor is
# paused inside them (with the activation modules, whose own call is recorded as the module), so their
# torch calls do not each pass through Python. Exact types only: a subclass may override forward.
_QUIET_TYPES: frozenset[type[nn.Module]] = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.Softmax, nn.LogSoftmax, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
})
_WRAPPER = "OptimizedModule"  # torch.compile's module wrapper, named so that torch._dynamo is not imported
_ABSENT = object()  # no forward in a module's __dict__
_UNCHANGED = object()  # a forward left as it was


def site_filter(sites: SiteFilter) -> Callable[[str], bool]:
    """Turn ``sites=`` (None, names or glob patterns, or a predicate on the name) into a predicate."""
    if sites is None:
        return lambda name: True
    if callable(sites):
        return sites
    patterns = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, Iterable) else [sites]
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"Expected `sites` to be None, names, glob patterns or a callable, but got {sites!r}.")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a part of it runs through ``torch.compile`` (wrapper, ``.compile()``, compiled forward)."""
    return any(_compiled_module(m) for m in model.modules())


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``model`` itself if it is no wrapper)."""
    while type(model).__name__ == _WRAPPER:
        model = model._orig_mod
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside Lightning Fabric's wrapper (``fabric.setup``) and ``torch.compile``'s, whose paths
    name the sites: the same names as the module's own, in every package (``_forward_module.`` is Fabric's)."""
    if type(model).__name__ == "_FabricModule" and type(model).__module__.startswith(("lightning.fabric.",
                                                                                       "lightning_fabric.")):
        model = model._original_module
    return uncompiled(model)


class SiteHooks:
    """Name every activation-site call of ``model`` during a capture and pass its input to ``callback``.

    Names are stable across forwards: a module site is its module path (``layer1.0.relu``), with ``#k``
    appended for its k-th further call in the same forward; a functional call is the path of the module
    whose ``forward`` made it, a colon, the function and its call index there (``layer1.0:relu#1``).
    Functional calls outside every module's forward are not sites. Paths are those of the uncompiled
    model: a ``torch.compile`` wrapper adds no ``_orig_mod`` to them.

    Parameters
    ----------
    model : nn.Module
        Eager or compiled (``torch.compile(model)``, ``model.compile()``, compiled submodules).
    callback : callable(site, module_type, z)
        Receives each selected site call's pre-activation ``z``. For a compiled model dynamo traces it
        into the graph: it must use torch ops and plain Python containers only.
    sites : None, str, sequence of str, or callable
        Which sites to record: names, glob patterns, or a predicate on the name.
    module_types : sequence of module classes
        Further classes to treat as activation sites besides :data:`DEFAULT_MODULE_TYPES`.
    functional : bool
        Whether to record functional calls (:data:`FUNCTIONS`).
    on_forward_end : callable(), optional
        Called after each top-level forward of the model during a capture, outside any compiled graph.
    signs_only : bool
        The callback reads only which values are ``> 0`` and which are NaN. An eager in-place call of
        ReLU, ReLU6 or LeakyReLU with a finite slope > 0 (module or functional; a module without hooks or
        a forward of its own, and no global hook but ours) then hands it its output, after the call,
        instead of its input: the same signs and NaNs. On a CPU, a pre-activation that the
        callback reads on the training thread just before torch's threads overwrite it in place costs
        those threads cache-line transfers where their cores do not share a cache (measured on 2 cores: an
        in-place ReLU of 2M values up to 30x slower); read afterwards, it costs nothing more.
    """

    def __init__(
        self,
        model: nn.Module,
        callback: SiteCallback,
        *,
        sites: SiteFilter = None,
        module_types: Iterable[type[nn.Module]] = (),
        functional: bool = True,
        on_forward_end: Callable[[], None] | None = None,
        signs_only: bool = False,
    ) -> None:
        self.module_types = DEFAULT_MODULE_TYPES + tuple(module_types)
        self.functional = functional
        self.compiled = is_compiled(model)
        self._after_in_place = signs_only and not self.compiled
        # module id -> site name and type, and whether from the output (else the input), emitted in _leave
        self._deferred: dict[int, tuple[str, str, bool]] = {}
        self._callback = callback
        self._on_forward_end = on_forward_end
        self._forward_end = self._end_forward
        self._selected = site_filter(sites)
        self._selected_cache: dict[str, bool] = {}
        # A token per hooks object: dynamo guards on it, so that a graph traced for another recorder (other
        # `sites`) is never reused with this one's selection baked in.
        self._token = str(next(_TOKENS))
        _SELECTIONS[self._token] = self
        self._modules = list(_named_modules(unwrapped(model)))
        self._paths = {id(module): name for name, module in self._modules}
        self._by_path = dict(self._modules)
        # Type names of the site modules, by module id.
        self._site_types = {
            id(module): type(module).__name__ for _, module in self._modules if isinstance(module, self.module_types)
        }
        self._site_modules = [module for _, module in self._modules if id(module) in self._site_types]
        # Site modules with pre-hooks of their own (which may change the input: noise, ablation) are read after those,
        # by a pre-hook of ours registered last; until then their names wait here, by (thread, module id).
        self._late: set[int] = set()
        self._awaiting: dict[tuple[int, int], tuple[str, str]] = {}
        self._told_late: set[int] = set()  # sites warned of as read before pre-hooks given during a capture
        # Where the interceptor pauses: leaves that make no functional site call of their own.
        self._quiet = {
            id(module) for _, module in self._modules
            if next(module.children(), None) is None
            and (type(module) in _QUIET_TYPES or id(module) in self._site_types)
        }
        self._paused_depth = 0  # the stack depth of the quiet module the interceptor is paused for; 0: none
        self._active = False
        self._stack: list[int] = []
        self._calls: dict[Any, int] = {}
        self._handles: list = []
        self._mode: _FunctionalMode | None = None
        self._mode_entered = False
        self._thread: int | None = None  # the capturing thread: the only one whose functional calls are intercepted
        self._elsewhere = threading.local()  # the module stack and call counts of forwards on other threads
        self._installed: list[tuple[nn.Module, list, Any]] = []  # module, hook handles, forward to restore
        self._site_pre_hooks: list[tuple[nn.Module, int]] = []  # compiled: each site module and its pre-hook's id
        self.forward_seen = False  # a forward of the model started since the last attach()
        # The path of a module ("": the model) whose torch.compile wrapper ran during the capture.
        self.compiled_elsewhere: str | None = None
        if self.compiled:
            fullgraph = [name or type(uncompiled(module)).__name__
                         for name, module in model.named_modules() if _made_fullgraph(module)]
            if fullgraph:
                raise ValueError(
                    f"Expected a model compiled without fullgraph=True, but {', '.join(fullgraph)} was compiled with "
                    "fullgraph=True: recording a compiled model ends each forward with a graph break, where the "
                    "forward's records are handed over, which fullgraph forbids. Compile without fullgraph=True (the "
                    "forward is still one graph), or record the eager model."
                )
            self._install()
            _warn_hidden_in_place_calls(self._modules)
        _warn_activations_inside_torch_layers(self._modules, self.module_types, functional)

    def enclosing(self, site: str) -> nn.Module:
        """The module around the call of ``site`` (a site name): a module site's parent, the module whose forward
        makes a functional call (the model itself, an activation module, encloses its own call)."""
        path, colon, _ = site.partition(":")
        if not colon:
            path = path.split("#")[0]
            # A module site's parent; else a functional call in the root module's forward ("relu#0").
            path = path.rpartition(".")[0] if path in self._by_path else ""
        return self._by_path.get(path)

    @property
    def module_sites(self) -> list[str]:
        """Paths of the modules that are activation sites (functional sites appear only when called)."""
        return [name or self._site_types[key] for key, name in self._paths.items() if key in self._site_types]

    def describe_search(self) -> str:
        """What was searched for, for error messages."""
        types_ = ", ".join(t.__name__ for t in self.module_types)
        funcs = "F.relu, torch.relu, Tensor.relu, F.relu6, F.leaky_relu (and in-place variants)"
        return f"modules of type ({types_})" + (f" and functional calls ({funcs})" if self.functional else "")

    def attach(self) -> None:
        """Start a capture: install the hooks (eager) or switch them on (compiled)."""
        if self._active:
            return
        if not self.compiled:
            # Compiled in place since (`.compile()`); a new torch.compile wrapper is caught by _pre_hook.
            compiled = [
                name or type(module).__name__
                for name, module in self._modules
                if getattr(module, "_compiled_call_impl", None) is not None
            ]
            if compiled:
                raise ValueError(
                    f"Expected the modules seen when the recorder was created, but {', '.join(compiled)} "
                    "was compiled with torch.compile afterwards: hooks installed for the eager model cannot "
                    "see inside its graph. Create the recorder after compiling the model."
                )
            self._handles = [
                nn.modules.module.register_module_forward_pre_hook(self._pre_hook),
                nn.modules.module.register_module_forward_hook(self._post_hook, always_call=True),
            ]
            self._late.update(id(module) for module in self._site_modules if module._forward_pre_hooks)
            self._handles += [
                module.register_forward_pre_hook(self._late_pre_hook)
                for module in self._site_modules if id(module) in self._late
            ]
        else:
            for module, ours in self._site_pre_hooks:
                hooks = module._forward_pre_hooks
                if next(reversed(hooks)) != ours:
                    hooks[ours] = hooks.pop(ours)  # last again, after pre-hooks registered since: what the forward gets
        self._stack.clear()
        self._calls.clear()
        self._deferred.clear()
        self._paused_depth = 0
        self._thread = threading.get_ident()
        self._elsewhere = threading.local()
        self.forward_seen, self.compiled_elsewhere = False, None
        self._active = True
        if self.functional:
            _discard_inert_modes()
            self._mode = _FunctionalMode(self)
            if self.compiled:
                self._enter_mode()
            # Eager: entered only while a forward of the model runs (_pre_hook, _post_hook). Every torch
            # call made under the mode goes through Python; the loss, Lightning's logging, backward and
            # the optimizer need not.

    def detach(self) -> None:
        """End a capture: remove the hooks installed by :meth:`attach` (eager) or switch them off."""
        self._exit_mode()
        if self._mode is not None:
            # Still entered when a mode the forward pushed is left above it: it stays there, inert, until
            # it is on top again (popped by _discard_inert_modes).
            self._mode._hooks = None
            self._mode = None
            self._mode_entered = False
            _discard_inert_modes()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._late.clear()  # cleared, not replaced: dynamo guards on the object a compiled forward reads
        self._awaiting.clear()
        self._active = False
        self._stack.clear()
        self._paused_depth = 0

    def remove(self) -> None:
        """Remove every hook, including the lasting hooks of a compiled model (the end of recording)."""
        self.detach()
        for module, handles, previous in self._installed:
            for handle in handles:
                handle.remove()
            if previous is _ABSENT:
                module.__dict__.pop("forward", None)
            elif previous is not _UNCHANGED:
                module.forward = previous
        self._installed, self._site_pre_hooks = [], []

    # ------------------------------------------------------------------ compiled models
    def _install(self) -> None:
        # A graph break after each top-level forward: the lists a graph appends to are emptied there, so
        # every forward starts with the state its graph was traced with (dynamo guards on their lengths).
        self._forward_end = torch.compiler.disable(self._end_forward)
        for path, module in self._modules:
            key = id(module)
            handles = [
                module.register_forward_pre_hook(_LastingHook(self._enter, key, path, self._site_types.get(key))),
                module.register_forward_hook(_LastingHook(self._leave, key), always_call=True),
            ]
            previous = module.__dict__.get("forward", _ABSENT)
            fresh = _fresh_forward(module, previous)
            if fresh is not None:
                module.forward = fresh
            self._installed.append((module, handles, previous if fresh is not None else _UNCHANGED))
            if key in self._site_types:
                self._site_pre_hooks.append((module, handles[0].id))

    # ------------------------------------------------------------------ hook bodies
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        key = id(module)
        path = self._paths.get(key)
        if path is None:
            wrapped = self._paths.get(id(getattr(module, "_orig_mod", None))) if type(module).__name__ == _WRAPPER else None
            if wrapped is not None:  # a part of our model, compiled after these hooks were made
                self.compiled_elsewhere = wrapped
            return
        if torch._C._current_graph_task_id() != -1:
            return  # a recomputation inside backward (activation checkpointing), not a forward of its own
        if threading.get_ident() != self._thread:
            self._enter_elsewhere(key, path, self._site_types.get(key), args)
            return
        if not self._stack and _runs_a_step(module):
            return  # a Lightning strategy calling training_step through the module's call: not its forward
        if self._mode is not None:
            if self._paused_depth:
                self._resume_mode()  # a module called inside a quiet one (unusual): intercepted as before
            elif not self._stack:
                self._enter_mode()
        self._enter(key, path, self._site_types.get(key), module, args)
        if self._mode_entered and key in self._quiet and _may_pause_in(module):
            self._pause_mode()

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if threading.get_ident() != self._thread:
            self._leave_elsewhere(id(module))
            return
        self._leave(id(module), module, args, output)
        if self._paused_depth and len(self._stack) < self._paused_depth:
            self._resume_mode()
        if not self._stack:
            self._exit_mode()

    def _enter_elsewhere(self, key: int, path: str, site_type: str | None, args: tuple) -> None:
        # A forward on another thread: its module sites only, named by that thread's own module stack, which
        # leaves the capturing thread's stack (names, pauses of the interceptor) untouched.
        if not self._active:
            return
        local = self._elsewhere
        if not getattr(local, "stack", None):
            local.stack, local.calls = [], {}
        local.stack.append(key)
        self._emit_module(local.calls, key, path, site_type, args)

    def _leave_elsewhere(self, key: int) -> None:
        stack = getattr(self._elsewhere, "stack", None)
        if stack and stack[-1] == key:
            stack.pop()

    def _pause_mode(self) -> None:
        if _top_mode() is self._mode:  # (the caller checked that the mode is entered)
            torch._C._pop_torch_function_stack()
            self._paused_depth = len(self._stack)

    def _resume_mode(self) -> None:
        torch._C._push_on_torch_function_stack(self._mode)
        self._paused_depth = 0

    def _enter_mode(self) -> None:
        if not self._mode_entered:
            self._mode.__enter__()
            self._mode_entered = True

    def _exit_mode(self) -> None:
        # Popping takes whatever mode is on top: only ours, and only on the thread that pushed it. A mode
        # someone pushed above ours and left there keeps ours below it (harmless: no site outside a capture).
        if self._mode_entered and threading.get_ident() == self._thread and _top_mode() is self._mode:
            self._mode_entered = False
            self._mode.__exit__(None, None, None)

    # _enter, _leave, _on_function and _emit are traced by dynamo for compiled models: no try/except,
    # no id(), and no read of state that changes between forwards (each read becomes a guard).
    def _enter(self, key: int, path: str, site_type: str | None, module: nn.Module, args: tuple) -> None:
        if not self._active:
            return
        if not self._stack:
            self._calls.clear()  # a new top-level forward: call indices restart
            self.forward_seen = True
        self._stack.append(key)
        self._emit_module(self._calls, key, path, site_type, args, module)

    def _emit_module(
        self, calls: dict, key: int, path: str, site_type: str | None, args: tuple, module: nn.Module | None = None
    ) -> None:
        if site_type is not None and args and isinstance(args[0], torch.Tensor):
            k = calls.get(key, 0)
            calls[key] = k + 1
            name = path or site_type  # the model itself an activation module: named by its type
            name = name if k == 0 else f"{name}#{k}"
            if key in self._late:
                self._awaiting[(threading.get_ident(), key)] = (name, site_type)
            elif module is not None and not self.compiled and module._forward_pre_hooks:
                self._read_after_call(key, name, site_type, module, args[0])
            elif self._after_in_place and module is not None and _keeps_signs_in_place(module):
                self._deferred[key] = (name, site_type, True)
            else:
                self._emit(name, site_type, args[0])

    def _read_after_call(self, key: int, name: str, site_type: str, module: nn.Module, z: torch.Tensor) -> None:
        """A site module given pre-hooks during the capture (inside ``training_step``), which run after this one:
        read what its forward gets when the call returns, its input, or the output of an in-place call that keeps
        the signs. Another in-place call overwrites its input with other signs: read before the hooks, and said."""
        in_place = bool(getattr(module, "inplace", False))
        if in_place and not (self._after_in_place and _keeps_signs_type(module)):
            if key not in self._told_late:
                self._told_late.add(key)
                log.warning(
                    "actpat: site %r got forward pre-hooks during a capture; it computes in place, so it is read "
                    "before them (its pattern is of the input before the hooks). Register the hooks before the "
                    "capture starts: a site is then read after them.", name,
                )
            self._emit(name, site_type, z)
            return
        self._deferred[key] = (name, site_type, in_place)

    def _late_pre_hook(self, module: nn.Module, args: tuple) -> None:
        # After the module's own pre-hooks: the input its forward gets.
        awaiting = self._awaiting.pop((threading.get_ident(), id(module)), None)
        if awaiting is not None and args and isinstance(args[0], torch.Tensor):
            self._emit(*awaiting, args[0])

    def _leave(self, key: int, module: nn.Module, args: tuple, output: object) -> None:
        if self._active and self._stack and self._stack[-1] == key:
            if not self.compiled and self._deferred:
                deferred = self._deferred.pop(key, None)
                if deferred is not None and output is not None:  # None: the call raised
                    name, site_type, from_output = deferred
                    z = output if from_output else args[0]
                    if isinstance(z, torch.Tensor):
                        self._emit(name, site_type, z)
            self._stack.pop()
            if not self._stack:
                self._forward_end()

    def _end_forward(self) -> None:
        self._calls.clear()
        if self._on_forward_end is not None:
            self._on_forward_end()

    def _on_function(self, func: Callable, z: object) -> None:
        if not self._stack:
            return  # outside any module's forward (e.g. a loss computed inside the capture): not a site
        if self._stack[-1] in self._site_types:
            return  # the call an activation module makes itself is already recorded as the module
        if not isinstance(z, torch.Tensor):
            return
        enclosing = self._paths[self._stack[-1]]
        fname = FUNCTIONS[func]
        key = (enclosing, fname)
        k = self._calls.get(key, 0)
        self._calls[key] = k + 1
        name = f"{enclosing}:{fname}#{k}" if enclosing else f"{fname}#{k}"
        self._emit(name, f"function:{fname}", z)

    def _emit(self, name: str, module_type: str, z: torch.Tensor) -> None:
        if not _is_selected(self._token, name):
            return
        if self._mode is None or self.compiled:
            self._callback(name, module_type, z)
            return
        # The recorder's own tensor ops need not pass through the functional-call interceptor (~20% of
        # a small model's recording cost).
        with torch._C.DisableTorchFunction():
            self._callback(name, module_type, z)

    def _select(self, name: str) -> bool:
        selected = self._selected_cache.get(name)
        if selected is None:
            selected = self._selected_cache[name] = bool(self._selected(name))
        return selected


def _keeps_signs_in_place(module: nn.Module) -> bool:
    """Whether the module's call overwrites its input with values of the same signs (``> 0`` where the
    input was, NaN where it was, nowhere else), and nothing but that call runs between our pre- and
    post-hook (:func:`_may_pause_in`: no hook or forward of its own, no other global hook, any of which
    may change the input or the output)."""
    return _keeps_signs_type(module) and _may_pause_in(module)


def _keeps_signs_type(module: nn.Module) -> bool:
    """Whether the module computes in place and keeps the signs and NaNs (exact types: a subclass may override
    forward)."""
    kind = type(module)
    return bool(getattr(module, "inplace", False)) and (
        kind is nn.ReLU or kind is nn.ReLU6 or (kind is nn.LeakyReLU and _keeps_signs(module.negative_slope))
    )


def _keeps_signs(slope: float) -> bool:
    # A slope of 0 turns -inf into NaN (0 * -inf), an infinite one turns -0.0 into NaN: the NaN count changes.
    return 0 < slope < math.inf


def _call_keeps_signs_in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """:func:`_keeps_signs_in_place` for a functional call (``F.relu`` and its kin pass ``inplace`` and
    ``negative_slope`` by keyword to ``__torch_function__``; ``leaky_relu_`` may take the slope by position)."""
    if func in _IN_PLACE_FUNCTIONS:
        in_place = True
    elif func in _FLAGGED_FUNCTIONS:
        in_place = bool(kwargs.get("inplace", False))
    else:
        return False
    if in_place and func in _SLOPED_FUNCTIONS:
        return _keeps_signs(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    return in_place


# In-place functions that dynamo (torch 2.13) does not hand to a torch-function mode: a compiled forward's calls
# to them never reach the interceptor.
_HIDDEN_WHEN_COMPILED = (torch.relu_, F.relu_, F.leaky_relu_)


def _warn_hidden_in_place_calls(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Warn of calls to :data:`_HIDDEN_WHEN_COMPILED` in the forwards of a compiled model: each name the forward
    loads from its globals (and the attributes read from a module object there) is resolved to the object it
    names, so ``x.relu_()``, which dynamo does hand over, is no such call."""
    warned = set()
    for _, module in modules:
        forward = getattr(type(module), "forward", None)
        code, names = getattr(forward, "__code__", None), getattr(forward, "__globals__", {})
        if code is None or code in warned:
            continue
        current = None
        for instruction in dis.get_instructions(code):
            if instruction.opname == "LOAD_GLOBAL":
                current = names.get(instruction.argval)
            elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and isinstance(current, types.ModuleType):
                current = getattr(current, instruction.argval, None)
            else:
                current = None
            if any(current is hidden for hidden in _HIDDEN_WHEN_COMPILED):
                warned.add(code)
                log.warning(
                    "actpat: %s.forward calls %s, which a compiled model hides from the recorder: those sites are not "
                    "recorded. Write F.relu(x, inplace=True), x.relu_() or F.leaky_relu(x, slope, inplace=True), "
                    "which are, or record the eager model.", type(module).__name__, getattr(current, "__name__", current),
                )
                break


def _warn_activations_inside_torch_layers(
    modules: Iterable[tuple[str, nn.Module]], module_types: tuple[type, ...], functional: bool
) -> None:
    """Warn of ReLUs that run where no hook sees them: inside a TorchScript module (scripted or traced); an
    ``nn.RNN``'s (or ``nn.RNNCell``'s) inside its fused kernel, always; a transformer encoder layer's activation
    module inside torch's fast path (eval mode without autograd), unless functional calls are intercepted, which
    turns that path off while capturing."""
    scripted: list[str] = []
    for name, module in modules:
        if any(name.startswith(f"{outer}.") or not outer for outer in scripted):
            continue  # inside a TorchScript module already named
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
            log.warning(
                "actpat: %s is a TorchScript module (torch.jit.script or trace): its forward runs in TorchScript, "
                "where no hook sees its activations, so none of them is recorded. Record the eager module.",
                name or "the model",
            )
        elif isinstance(module, (nn.RNN, nn.RNNCell)) and module.nonlinearity == "relu":
            log.warning(
                "actpat: %s (%s with nonlinearity='relu') applies its ReLU inside torch's fused recurrent kernel, which "
                "no hook sees: it is no site and is not recorded. To record it, write the recurrence with nn.Linear and "
                "nn.ReLU or F.relu.", name or "the model", type(module).__name__,
            )
        elif isinstance(module, nn.TransformerEncoderLayer) and not functional:
            activation = getattr(module, "activation", None)
            if isinstance(activation, module_types):
                log.warning(
                    "actpat: %s (TransformerEncoderLayer) runs torch's fused fast path in eval mode without autograd, "
                    "which skips its activation module: with functional=False those calls are not recorded. Keep "
                    "functional=True (it turns the fast path off while capturing), or record in train mode.",
                    name or "the model",
                )
            elif activation in FUNCTIONS:
                log.warning(
                    "actpat: %s (TransformerEncoderLayer) applies %s as a functional call, which functional=False does "
                    "not record. Keep functional=True, or give the layer activation=nn.ReLU().",
                    name or "the model", getattr(activation, "__name__", activation),
                )


def _runs_a_step(module: nn.Module) -> bool:
    """Whether the module's call runs a Lightning strategy's redirection (DDP, FSDP: ``training_step`` called through
    the wrapped module's ``forward``, so that the wrapper sees it), not the module's own forward."""
    forward = module.__dict__.get("forward")
    return (
        getattr(forward, "__name__", None) == "wrapped_forward"
        and getattr(forward, "__module__", "").startswith(("lightning.", "pytorch_lightning.", "lightning_fabric."))
    )


def _may_pause_in(module: nn.Module) -> bool:
    """Whether nothing but the module's own forward runs during its call: no hooks of its own, no forward
    set on the instance, no global forward hooks but the capture's own pair (any might call F.relu)."""
    return not (
        module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__
        or len(_module_globals._global_forward_pre_hooks) > 1 or len(_module_globals._global_forward_hooks) > 1
    )


def _top_mode() -> Any:
    depth = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(depth - 1) if depth else None


def _discard_inert_modes() -> None:
    while isinstance(top := _top_mode(), _FunctionalMode) and top._hooks is None:
        torch._C._pop_torch_function_stack()


_TOKENS = itertools.count()
_SELECTIONS: "weakref.WeakValueDictionary[str, SiteHooks]" = weakref.WeakValueDictionary()


@torch.compiler.assume_constant_result
def _is_selected(token: str, name: str) -> bool:
    # A constant for dynamo: evaluated while tracing, never a break; its arguments are constant strings
    # (torch before 2.13 refused the hooks object as one), the token guarded where it is read.
    return _SELECTIONS[token]._select(name)


def _named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` without torch.compile wrappers and without their ``_orig_mod`` in paths."""
    for name, module in root.named_modules():
        if type(module).__name__ != _WRAPPER:
            yield ".".join(part for part in name.split(".") if part != "_orig_mod"), module


def _fresh_forward(module: nn.Module, previous: Any) -> Callable | None:
    """The module's forward as a method whose code object is new, or None where it is not a plain method.

    Dynamo does not guard on hooks (as configured by default), but it guards that `forward` is absent
    from a module's __dict__, or else on the identity of its code object. A forward of the module's own,
    with a code object no graph has seen, makes every graph traced before these hooks existed (by an
    earlier recorder, too) fail its guards, so it is traced again, with the hooks.
    """
    if previous is _ABSENT:
        function = type(module).forward
    elif isinstance(previous, types.MethodType) and previous.__self__ is module:
        function = previous.__func__
    else:
        return None  # a forward replaced by another kind of callable (e.g. a compiled one): left alone
    if not isinstance(function, types.FunctionType):
        return None
    fresh = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__,
        function.__closure__,
    )
    fresh.__kwdefaults__ = function.__kwdefaults__
    fresh.__qualname__, fresh.__doc__, fresh.__module__ = function.__qualname__, function.__doc__, function.__module__
    return types.MethodType(fresh, module)


def _made_fullgraph(module: nn.Module) -> bool:
    """Whether ``module``'s torch.compile wrapper, in-place compile or compiled forward was made with
    ``fullgraph=True`` (read from dynamo's context object, held by the wrapper or by the compiled function)."""
    contexts = [getattr(module, "dynamo_ctx", None)] if type(module).__name__ == _WRAPPER else []
    for compiled in (getattr(module, "_compiled_call_impl", None), module.__dict__.get("forward")):
        for cell in getattr(compiled, "__closure__", None) or ():
            try:
                contexts.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return any(getattr(context, "fullgraph", False) is True for context in contexts)


def _compiled_module(module: nn.Module) -> bool:
    if type(module).__name__ == _WRAPPER or getattr(module, "_compiled_call_impl", None) is not None:
        return True
    forward = module.__dict__.get("forward")  # a forward replaced by a compiled one (Lightning, by hand)
    return getattr(forward, "_torchdynamo_orig_callable", None) is not None


class _LastingHook:
    """A hook that stays installed on a compiled model; copies of the model get an inert one.

    ``copy.deepcopy`` (e.g. a probe copy) and pickling would otherwise copy the recorder along with
    the model.
    """

    __slots__ = ("_body", "_args")

    def __init__(self, body: Callable, *args: Any) -> None:
        self._body = body
        self._args = args

    def __call__(self, module: nn.Module, *hook_args: Any) -> None:
        self._body(*self._args, module, *hook_args)

    def __deepcopy__(self, memo: dict) -> Callable:
        return _inert_hook

    def __reduce__(self) -> tuple:
        return (_make_inert_hook, ())


def _inert_hook(*args: Any) -> None:
    return None


def _make_inert_hook() -> Callable:
    return _inert_hook


class _FunctionalMode(TorchFunctionMode):
    def __init__(self, hooks: SiteHooks) -> None:
        super().__init__()
        self._hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        hooks = self._hooks
        if func in FUNCTIONS and hooks is not None:  # None: left behind by an ended capture, inert
            if hooks._after_in_place and _call_keeps_signs_in_place(func, args, kwargs):
                output = func(*args, **kwargs)
                hooks._on_function(func, output)
                return output
            hooks._on_function(func, args[0] if args else kwargs.get("input"))
        return func(*args, **kwargs)

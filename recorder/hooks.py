"""Find the activation sites of a model and hand each call's pre-activation to a callback.

Hooks are installed only while a capture is active, so a forward pass outside ``capture()`` runs the
model untouched. Module sites are seen through global forward pre-hooks (the input arrives before an
in-place op can overwrite it); functional calls through a ``TorchFunctionMode``.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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

SiteFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
SiteCallback = Callable[[str, str, torch.Tensor], None]


def site_filter(sites: SiteFilter) -> Callable[[str], bool]:
    """Turn ``sites=`` (None, names or glob patterns, or a predicate on the name) into a predicate."""
    if sites is None:
        return lambda name: True
    if callable(sites):
        return sites
    patterns = [sites] if isinstance(sites, str) else list(sites)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"Expected `sites` to be None, names, glob patterns or a callable, but got {sites!r}.")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class SiteHooks:
    """Name every activation-site call of ``model`` during a capture and pass its input to ``callback``.

    Names are stable across forwards: a module site is its module path (``layer1.0.relu``), with ``#k``
    appended for its k-th further call in the same forward; a functional call is the path of the module
    whose ``forward`` made it, a colon, the function and its call index there (``layer1.0:relu#1``).
    A functional call made outside every forward of ``model``'s modules is not a site.

    Parameters
    ----------
    model : nn.Module
    callback : callable(site, module_type, z)
        Receives each selected site call's pre-activation ``z``.
    sites : None, str, sequence of str, or callable
        Which sites to record: names, glob patterns, or a predicate on the name.
    module_types : sequence of module classes
        Further classes to treat as activation sites besides :data:`DEFAULT_MODULE_TYPES`.
    functional : bool
        Whether to record functional calls (:data:`FUNCTIONS`).
    """

    def __init__(
        self,
        model: nn.Module,
        callback: SiteCallback,
        *,
        sites: SiteFilter = None,
        module_types: Iterable[type[nn.Module]] = (),
        functional: bool = True,
    ) -> None:
        self.module_types = DEFAULT_MODULE_TYPES + tuple(module_types)
        self.functional = functional
        self._callback = callback
        self._selected = site_filter(sites)
        self._selected_cache: dict[str, bool] = {}
        self._paths = {id(module): name for name, module in model.named_modules()}
        self._site_modules = {
            id(module) for module in model.modules() if isinstance(module, self.module_types)
        }
        self._stack: list[int] = []
        self._calls: Counter = Counter()
        self._handles: list = []
        self._mode: _FunctionalMode | None = None
        self.forwards = 0  # top-level forwards of the model seen since the last attach()

    @property
    def module_sites(self) -> list[str]:
        """Paths of the modules that are activation sites (functional sites appear only when called)."""
        return [name for key, name in self._paths.items() if key in self._site_modules]

    def describe_search(self) -> str:
        """What was searched for, for error messages."""
        types = ", ".join(t.__name__ for t in self.module_types)
        funcs = "F.relu, torch.relu, Tensor.relu, F.relu6, F.leaky_relu (and in-place variants)"
        return f"modules of type ({types})" + (f" and functional calls ({funcs})" if self.functional else "")

    def attach(self) -> None:
        """Install the hooks for one capture."""
        if self._handles:
            return
        self._stack.clear()
        self._calls.clear()
        self.forwards = 0
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre_hook),
            nn.modules.module.register_module_forward_hook(self._post_hook, always_call=True),
        ]
        if self.functional:
            self._mode = _FunctionalMode(self)
            self._mode.__enter__()

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach`."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.clear()

    def _emit(self, name: str, module_type: str, z: torch.Tensor) -> None:
        selected = self._selected_cache.get(name)
        if selected is None:
            selected = self._selected_cache[name] = bool(self._selected(name))
        if not selected:
            return
        if self._mode is None:
            self._callback(name, module_type, z)
            return
        # The recorder's own tensor ops need not pass through the functional-call interceptor (~20% of
        # a small model's recording cost).
        with torch._C.DisableTorchFunction():
            self._callback(name, module_type, z)

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        key = id(module)
        path = self._paths.get(key)
        if path is None:
            return
        if not self._stack:
            self._calls.clear()  # a new top-level forward: call indices restart
            self.forwards += 1
        self._stack.append(key)
        if key in self._site_modules and args and isinstance(args[0], torch.Tensor):
            k = self._calls[key]
            self._calls[key] += 1
            self._emit(path if k == 0 else f"{path}#{k}", type(module).__name__, args[0])

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._stack and self._stack[-1] == id(module):
            self._stack.pop()

    def _on_function(self, func: Callable, z: object) -> None:
        # Only calls inside some module's forward are sites (not a hinge loss in `training_step`), and the
        # call an activation module makes itself is already recorded as the module.
        if not self._stack or self._stack[-1] in self._site_modules:
            return
        if not isinstance(z, torch.Tensor):
            return
        enclosing = self._paths[self._stack[-1]]
        fname = FUNCTIONS[func]
        key = (enclosing, fname)
        k = self._calls[key]
        self._calls[key] += 1
        name = f"{enclosing}:{fname}#{k}" if enclosing else f"{fname}#{k}"
        self._emit(name, f"function:{fname}", z)


class _FunctionalMode(TorchFunctionMode):
    def __init__(self, hooks: SiteHooks) -> None:
        super().__init__()
        self._hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FUNCTIONS:
            z = args[0] if args else (kwargs or {}).get("input")
            self._hooks._on_function(func, z)
        return func(*args, **(kwargs or {}))

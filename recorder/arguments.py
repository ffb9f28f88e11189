"""Argument checks of the prober and the callback, each naming the argument as its caller spells it.

Every message follows one template: ``Expected `name` to be ..., but got <value>.``
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn


def expect_int(name: str, value: Any, minimum: int) -> None:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")


def expect_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        expect_int(name, value, minimum)


def expect_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be True or False, but got {value!r}.")


def expect_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {tuple(allowed)}, but got {value!r}.")


def expect_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"Expected `{name}` to be None or a callable, but got {type(value).__name__}.")


def expect_every(name: str, value: Any) -> None:
    """A probe interval: a float > 0 (fraction of an epoch) or an int >= 1 (optimizer steps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"Expected `{name}` to be a float > 0 (fraction of an epoch) or an int >= 1 (optimizer steps), "
            f"but got {value!r}."
        )


def expect_values(name: str, value: Any) -> None:
    """What to store of the pre-activations: None, ``"all"`` or a number of units."""
    if not (value is None or value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
        raise ValueError(f"Expected `{name}` to be None, 'all' or an int >= 1, but got {value!r}.")


#: Classes of torch.nn's activation module that act on more than one value at a time.
_NOT_ELEMENTWISE = frozenset({"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU"})


def expect_module_types(name: str, value: Any) -> None:
    if isinstance(value, type) or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in value):
        raise ValueError(f"Expected `{name}` to be a sequence of nn.Module subclasses, but got {value!r}.")
    # A class given is recorded by the signs of its input: right for an elementwise activation, while torch's
    # other layers' inputs are no pre-activation (an nn.RNN's input is the sequence, its ReLU runs inside it).
    for t in value:
        if t.__module__.startswith("torch.") and (
            t.__module__ != "torch.nn.modules.activation" or t.__name__ in _NOT_ELEMENTWISE
        ):
            raise ValueError(
                f"Expected `{name}` to name activation classes, but got torch's {t.__name__}, which is no elementwise "
                f"activation: a class in `{name}` is recorded by the signs of its input, which for {t.__name__} is no "
                "pre-activation. Name the activation modules themselves; a nonlinearity applied inside a torch layer "
                "(nn.RNN's ReLU) cannot be recorded: write that computation with nn.Linear and nn.ReLU or F.relu."
            )

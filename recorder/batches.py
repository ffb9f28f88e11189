"""What is read from a batch: the model's inputs, per-sample class labels, the batch size.

Used by the prober for probe batches and by the Lightning callback for training batches.

The default rules read tuple/list batches by position (``(inputs, labels, ...)``) and dict batches by
key (:data:`INPUT_KEYS`, :data:`LABEL_KEYS`); ``inputs_from`` and ``labels_from`` replace them. Labels
are checked here, once for every batch that is recorded: integer class labels of shape ``(N,)``, or
one-hot ``(N, K)`` reduced with argmax. Anything else is an error that names the shape and the fix,
never a silent truncation (a float label 0.7 must not become class 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

INPUT_KEYS = ("x", "input", "inputs", "image", "images")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def _call(option: str, fn: Callable[[Any], Any], batch: Any) -> Any:
    """``fn(batch)``; its failure names the option and what the batch holds (not the disk, say)."""
    try:
        return fn(batch)
    except Exception as exc:
        raise ValueError(
            f"Expected `{option}` to take a batch as its loader yields it, but `{option}(batch)` raised {exc!r} "
            f"on a batch of {describe(batch)}. Fix `{option}` for batches of this structure."
        ) from exc


class BatchReader:
    """Read inputs, labels and the batch size of a batch, by the user's functions or the default rules.

    Parameters
    ----------
    inputs_from, labels_from : callable(batch), optional
        The user's functions; None selects the default rules.
    notify : callable(key, message)
        Reports a fact once per key (a warn-once): here, that one-hot labels are reduced.
    mask_from : callable(batch), optional
        The observations of a batch to keep (see ``ActivationRecorder.capture``'s ``mask``); None keeps all.
    """

    def __init__(
        self,
        inputs_from: Optional[Callable[[Any], Any]],
        labels_from: Optional[Callable[[Any], Any]],
        notify: Callable[[str, str], None],
        mask_from: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.custom_inputs = inputs_from is not None
        self._inputs_from = inputs_from
        self._labels_from = labels_from
        self._mask_from = mask_from
        self._notify = notify
        self._one_hot_checked = False

    def inputs(self, batch: Any) -> Any:
        """What the default probe forward feeds to ``module(...)``."""
        return _call("inputs_from", self._inputs_from, batch) if self._inputs_from is not None else default_inputs(batch)

    def mask(self, batch: Any) -> Any:
        """``mask_from(batch)``, the observations to keep, or None (all)."""
        return _call("mask_from", self._mask_from, batch) if self._mask_from is not None else None

    def size(self, batch: Any) -> int:
        """Samples in ``batch``: of ``inputs_from(batch)`` if given, else of the batch's first tensor."""
        return batch_size(_call("inputs_from", self._inputs_from, batch) if self._inputs_from is not None else batch)

    def labels(self, batch: Any, n: int) -> Any:
        """Integer class labels of shape ``(n,)``, or None when the batch has none."""
        if self._labels_from is not None:
            labels, source = _call("labels_from", self._labels_from, batch), "`labels_from(batch)`"
        else:
            labels, source = default_labels(batch)
            if labels is None and isinstance(batch, Mapping) and len(batch) > 1:
                raise ValueError(
                    f"Expected the labels of a dict batch under one of the keys {list(LABEL_KEYS)}, but its keys are "
                    f"{list(batch)}: pass `labels_from=lambda batch: batch[KEY]` with the key of the class labels, or "
                    "`labels_from=lambda batch: None` to record without labels."
                )
        if labels is None:
            return None
        return self._check(labels, n, source)

    def _check(self, labels: Any, n: int, source: str) -> Any:
        fix = (
            "Pass `labels_from=` returning integer class labels of shape (N,) (for example "
            "`lambda batch: batch[1].long()` for 0./1. targets), or `labels_from=lambda batch: None` to "
            "record without labels."
        )
        if not isinstance(labels, torch.Tensor):
            try:
                labels = np.asarray(labels)
            except Exception as exc:  # noqa: BLE001 - any unconvertible object gets the same message
                raise ValueError(
                    f"Expected labels as a tensor or array, but got {type(labels).__name__} from {source}. {fix}"
                ) from exc
        shape = tuple(labels.shape)
        if not _is_integer(labels) and not _is_float(labels):
            raise ValueError(
                f"Expected integer class labels, but got labels of dtype {labels.dtype} and shape {shape} from "
                f"{source}. {fix}"
            )
        if len(shape) == 2 and shape[0] == n and shape[1] >= 2 and self._is_one_hot(labels):
            self._notify(
                "one-hot",
                f"actpat: the labels from {source} are one-hot of shape {shape}; they are recorded as the "
                "class index (argmax).",
            )
            return labels.argmax(1) if isinstance(labels, torch.Tensor) else np.argmax(labels, axis=1)
        if len(shape) != 1:
            why = ""
            if len(shape) == 2 and shape[0] == n and shape[1] >= 2:  # the shape of one-hot, not its values
                why = ", whose rows are not one-hot (one 1 per row): soft or multi-label targets are no classes"
            raise ValueError(
                f"Expected class labels of shape ({n},) or one-hot ({n}, K), but got shape {shape} from "
                f"{source}{why}. {fix}"
            )
        if shape[0] != n:
            raise ValueError(
                f"Expected one label per sample, {n} for this batch, but got labels of shape {shape} from {source}. "
                f"{fix}"
            )
        if not _is_integer(labels):
            raise ValueError(
                f"Expected integer class labels, but got float labels ({labels.dtype}) of shape {shape} from "
                f"{source}: a float is not a class (0.7 would become class 0). {fix}"
            )
        return labels

    def _is_one_hot(self, labels: Any) -> bool:
        # Checking values costs a device sync: on an accelerator only the first labels are checked.
        on_host = not isinstance(labels, torch.Tensor) or labels.device.type == "cpu"
        if self._one_hot_checked and not on_host:
            return True
        values = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
        one_hot = bool(((values == 0) | (values == 1)).all()) and bool((values.sum(1) == 1).all())
        self._one_hot_checked = True
        return one_hot


def default_inputs(batch: Any) -> Any:
    """``batch[0]`` of a tuple/list, ``batch[key]`` for the first of :data:`INPUT_KEYS` of a dict, else the batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"Expected a batch dict with one of the keys {INPUT_KEYS}, but got keys {sorted(map(str, batch))}. "
            "Pass `inputs_from=` (for example `lambda batch: batch['pixels']`) to say what the module's forward "
            "takes, or your own probe forward (`probe_forward=` of the callback, `forward=` of the Prober) to run "
            "the module on the batch your way."
        )
    return batch


def default_labels(batch: Any) -> tuple[Any, str]:
    """``batch[1]`` of a tuple/list, the first of :data:`LABEL_KEYS` of a dict, else None; and where from."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1], "batch[1]"
    if isinstance(batch, dict):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key], f"batch[{key!r}]"
    return None, "the batch"


def batch_size(inputs: Any) -> int:
    """Length of the first tensor found depth-first in ``inputs`` (a tensor, tuple, list or dict)."""
    found = _first_tensor(inputs)
    if found is None:
        raise ValueError(
            f"Expected a batch with a tensor of shape (N, ...), but found none in a {type(inputs).__name__}. "
            "Pass `inputs_from=` returning the model's input tensor."
        )
    return int(found.shape[0])


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


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, named tuples, lists and mappings recursed).

    Other objects (strings, ints) are kept as they are. A non-blocking copy: a pinned host tensor
    reaches an accelerator without waiting.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device) for key, value in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict
            return moved
    return batch


def tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``batch``, depth-first (tuples, lists and mappings recursed)."""
    if isinstance(batch, torch.Tensor):
        yield batch
        return
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        yield from tensors(item)


def tensor_bytes(batch: Any) -> int:
    """Bytes of all tensors in ``batch``."""
    return sum(t.numel() * t.element_size() for t in tensors(batch))


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value if value.dim() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _is_integer(labels: Any) -> bool:
    if isinstance(labels, torch.Tensor):
        return not labels.is_floating_point() and not labels.is_complex()
    return labels.dtype.kind in "iub"


def _is_float(labels: Any) -> bool:
    if isinstance(labels, torch.Tensor):
        return labels.is_floating_point()
    return labels.dtype.kind == "f"

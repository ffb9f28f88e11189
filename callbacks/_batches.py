"""What the callback reads from a batch: the model's inputs, per-sample class labels, the batch size.

The default rules read tuple/list batches by position (``(inputs, labels, ...)``) and dict batches by
key (:data:`INPUT_KEYS`, :data:`LABEL_KEYS`); ``inputs_from`` and ``labels_from`` replace them. Labels
are checked here, once for every batch that is recorded: integer class labels of shape ``(N,)``, or
one-hot ``(N, K)`` reduced with argmax. Anything else is an error that names the shape and the fix,
never a silent truncation (a float label 0.7 must not become class 0).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

INPUT_KEYS = ("x", "input", "inputs", "image", "images")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


class BatchReader:
    """Read inputs, labels and the batch size of a batch, by the user's functions or the default rules.

    Parameters
    ----------
    inputs_from, labels_from : callable(batch), optional
        The user's functions; None selects the default rules.
    notify : callable(key, message)
        Reports a fact once per key (the callback's warn-once): here, that one-hot labels are reduced.
    """

    def __init__(
        self,
        inputs_from: Optional[Callable[[Any], Any]],
        labels_from: Optional[Callable[[Any], Any]],
        notify: Callable[[str, str], None],
    ) -> None:
        self.custom_inputs = inputs_from is not None
        self._inputs_from = inputs_from
        self._labels_from = labels_from
        self._notify = notify
        self._one_hot_checked = False

    def inputs(self, batch: Any) -> Any:
        """What the default probe forward feeds to ``module(...)``."""
        return self._inputs_from(batch) if self._inputs_from is not None else default_inputs(batch)

    def size(self, batch: Any) -> int:
        """Samples in ``batch``: of ``inputs_from(batch)`` if given, else of the batch's first tensor."""
        return batch_size(self._inputs_from(batch) if self._inputs_from is not None else batch)

    def labels(self, batch: Any, n: int) -> Any:
        """Integer class labels of shape ``(n,)``, or None when the batch has none."""
        if self._labels_from is not None:
            labels, source = self._labels_from(batch), "`labels_from(batch)`"
        else:
            labels, source = default_labels(batch)
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
            raise ValueError(
                f"Expected class labels of shape ({n},) or one-hot ({n}, K), but got shape {shape} from {source}. "
                f"{fix}"
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
            "takes, or `probe_forward=` to run the module on the batch your way."
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

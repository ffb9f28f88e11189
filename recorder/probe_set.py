"""The probe set as batches on the model's device, with sample ids and labels, cached within a budget.

The probe set is fixed (SPEC section 6): the same samples in the same order at every probe. So it is
read from its loader once and kept on the device when all of it fits ``cache_bytes``; later probes
then skip the loader (workers, collation, host-to-device copies) altogether. A probe set larger than
the budget is read from the loader at every probe.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, default_collate

from actpat.recorder.batches import BatchReader, tensor_bytes, tensors

log = logging.getLogger(__name__)

#: Default of ``cache_bytes``: the probe set is kept on the device if it takes at most this many bytes.
DEFAULT_CACHE_BYTES = 256 << 20

# (batch on the device, sample ids (n,) int64, labels (n,) or None)
ProbeBatch = tuple[Any, torch.Tensor, Any]


def check_probe_set(probe: Any) -> None:
    """Reject what can never be a probe set: another type, a list of tensors, an empty set, or a DataLoader
    that shuffles."""
    if isinstance(probe, DataLoader):
        if isinstance(probe.sampler, RandomSampler):
            raise ValueError(
                "Expected a probe DataLoader that iterates in a fixed order, but it shuffles (RandomSampler). "
                "Pass the Dataset, or a DataLoader with shuffle=False."
            )
    elif _tensors_of_several_shapes(probe):
        shapes = [tuple(t.shape) for t in probe]
        raise ValueError(
            f"Expected `probe` to be a Dataset or a DataLoader, but got a {type(probe).__name__} of tensors with "
            f"shapes {shapes}, which would be read as {len(probe)} samples. For inputs and labels, pass "
            "`torch.utils.data.TensorDataset(inputs, labels)`."
        )
    elif not (isinstance(probe, Dataset) or hasattr(probe, "__getitem__")):
        raise ValueError(f"Expected `probe` to be a Dataset or a DataLoader, but got {type(probe).__name__}.")
    size = _size(probe.dataset if isinstance(probe, DataLoader) else probe)
    if size == 0:
        raise ValueError("Expected a probe set with at least one sample, but `probe` is empty.")


def _tensors_of_several_shapes(probe: Any) -> bool:
    # [inputs, labels]: a list of samples would hold tensors of one shape.
    return (isinstance(probe, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in probe)
            and len({tuple(t.shape) for t in probe}) > 1)  # fmt: skip


def _size(dataset: Any) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset, or a Dataset without __len__: its size shows at the first probe
        return None


def probe_loader(probe: Any, batch_size: Optional[int]) -> DataLoader:
    """The probe set as a fixed-order DataLoader (a DataLoader is used as it is)."""
    if isinstance(probe, DataLoader):
        return probe
    if batch_size is None:
        raise ValueError(
            "Expected a `batch_size` for a Dataset probe set, but got None. Pass the training batch size: in "
            "`train` mode BatchNorm normalizes with each probe batch's statistics, so the batch size is part of "
            "the protocol (the paper probes with the training batch size)."
        )
    return DataLoader(probe, batch_size=batch_size, shuffle=False, collate_fn=_default_collate_or_why)


def _default_collate_or_why(samples: list) -> Any:
    """torch's default collate, whose failure on samples of different shapes names the probe's own way out."""
    try:
        return default_collate(samples)
    except RuntimeError as exc:
        if "equal size" not in str(exc):
            raise
        raise ValueError(
            f"Expected probe samples that torch's default collate stacks into batches, but they have different "
            f"shapes ({exc}; sequences of different lengths?). Pass the probe as a DataLoader with your own "
            "collate_fn (padding, as for training) and shuffle=False."
        ) from exc


def _dataset_indices(loader: DataLoader) -> Optional[torch.Tensor]:
    """The dataset index of each sample ``loader`` yields, in order, where its sampler is not the plain sequential
    one (a DistributedSampler gives each rank every n-th sample): the sample ids then name the same samples on every
    rank. None: the samples' positions are their indices (a sequential sampler, an IterableDataset)."""
    if isinstance(loader.sampler, SequentialSampler) or isinstance(loader.dataset, IterableDataset):
        return None
    batches = loader.batch_sampler if loader.batch_sampler is not None else ([i] for i in loader.sampler)
    return torch.tensor([int(i) for batch in batches for i in batch], dtype=torch.int64)


class ProbeBatches:
    """Iterate the probe set as :data:`ProbeBatch` tuples on a device, caching them within a budget.

    Parameters
    ----------
    loader : DataLoader
        Fixed-order loader of the probe set.
    reader : BatchReader
        Reads each batch's size and labels (checked here, once per batch read from the loader).
    to_device : callable(batch, device)
        Moves a batch to the device.
    cache_bytes : int
        Keep the batches on the device if all of them (inputs, labels, sample ids) take at most this
        many bytes; 0 turns caching off.
    """

    def __init__(
        self, loader: DataLoader, reader: BatchReader, to_device: Callable[[Any, torch.device], Any], cache_bytes: int
    ) -> None:
        self.loader = loader
        self._reader = reader
        self._to_device = to_device
        self._cache_bytes = cache_bytes
        self._cache: Optional[list[ProbeBatch]] = None
        self._cache_device: Optional[torch.device] = None
        self._too_large = False
        self._versions: list[tuple[torch.Tensor, int]] = []

    @property
    def cached(self) -> bool:
        """Whether the whole probe set is held on the device."""
        return self._cache is not None

    def __call__(self, device: torch.device, limit: Optional[int] = None) -> Iterator[ProbeBatch]:
        """Yield the probe batches on ``device``; at most ``limit`` batches (a partial pass caches nothing)."""
        if self._cache is not None and self._cache_device == device:
            if all(t._version == v for t, v in self._versions):
                yield from self._cache[:limit]
                return
            self._too_large = True  # a probe forward changed its input in place: read afresh every time
            log.info("actpat: a probe forward changed its input batch in place; the probe set is no longer cached.")
        self._cache = None
        keep: Optional[list[ProbeBatch]] = [] if limit is None and not self._too_large and self._cache_bytes > 0 else None
        kept_bytes, offset, versions = 0, 0, []
        indices = _dataset_indices(self.loader)
        for index, batch in enumerate(self.loader):
            if limit is not None and index >= limit:
                return
            batch = self._to_device(batch, device)
            n = self._reader.size(batch)
            ids = torch.arange(offset, offset + n) if indices is None else indices[offset : offset + n]
            item = (batch, ids, self._reader.labels(batch, n))
            offset += n
            if keep is not None:
                kept_bytes += tensor_bytes(item)
                if kept_bytes <= self._cache_bytes:
                    keep.append(item)
                    versions += [(t, t._version) for t in tensors(item)]  # before a forward could change them
                else:
                    keep, self._too_large = None, True
                    log.info(
                        "actpat: the probe set takes more than cache_bytes=%d bytes on %s; it is read from its loader "
                        "at every probe.", self._cache_bytes, device,
                    )
            yield item
        if keep is not None:
            self._cache, self._cache_device, self._versions = keep, device, versions


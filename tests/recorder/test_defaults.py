"""Defaults chosen by measurement: shards are uncompressed unless asked (plain h5py reads them, no codec
runs on the training cores); see the README's benchmark table (writer_codecs, overhead)."""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from actpat.recorder import ActivationRecorder, Prober


def _datasets(run_dir):
    """(compression attribute of each shard, filters of every dataset in it)."""
    found = []
    for path in sorted(run_dir.glob("*.h5")):
        with h5py.File(path, "r") as f:
            filters = []
            f.visititems(lambda name, obj: filters.append((name, obj.compression)) if isinstance(obj, h5py.Dataset) else None)
            found.append((f.attrs["compression"], filters))
    return found


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_recorder_writes_uncompressed_shards_by_default(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
        model(torch.randn(16, 4))
    ((attr, filters),) = _datasets(tmp_path)
    assert attr == "none"
    assert filters and all(compression is None for _, compression in filters), filters


def test_the_prober_and_the_callback_default_to_no_compression(tmp_path):
    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
    with Prober(_model(), data, tmp_path, every=1, batch_size=4) as prober:
        prober.maybe(0)
    ((attr, filters),) = _datasets(tmp_path)
    assert attr == "none" and all(compression is None for _, compression in filters)
    from actpat.callbacks import ActivationPatternCallback

    assert ActivationPatternCallback(probe=data).compression is None


def test_a_second_run_into_the_same_directory_cannot_pool_its_steps_with_the_first(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec:
        for step in range(3):
            with rec.capture(step, split="probe"):
                model(torch.randn(4, 4))
            for _ in range(2):  # the same step twice in one session (e.g. micro-batches): one run
                with rec.capture(step):
                    model(torch.randn(4, 4))
    with ActivationRecorder(model, tmp_path) as rec:
        with pytest.raises(ValueError, match=r"step after 2 in split 'probe'.*rank 0.*pooled.*new `out_dir`.*step 3"):
            with rec.capture(2, split="probe"):
                model(torch.randn(4, 4))
        with rec.capture(3, split="probe"):  # a continued run goes on after the last step
            model(torch.randn(4, 4))
    with ActivationRecorder(model, tmp_path, rank=1) as rec, rec.capture(0, split="probe"):
        model(torch.randn(4, 4))  # another rank's records of the same step are the same run's
    from actpat.recorder import open_run

    run = open_run(tmp_path)
    assert run.steps("1", "probe").tolist() == [0, 1, 2, 3] and len(run.read("1", 0, "probe")) == 8
    assert len(run.read("1", 1, "train")) == 8


def test_a_second_run_with_other_site_shapes_is_refused_before_it_spoils_the_directory(tmp_path):
    model = _model()
    with ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
        model(torch.randn(4, 4))
    with ActivationRecorder(model, tmp_path, pattern="flat") as rec:
        with pytest.raises(ValueError, match=r"site '1'.*8 units \('channel' patterns.*got 8 units \('flat'"):
            with rec.capture(1):
                model(torch.randn(4, 4))
    with ActivationRecorder(model, tmp_path) as rec, rec.capture(1):  # the same description: one run
        model(torch.randn(4, 4))
    wider = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    with ActivationRecorder(wider, tmp_path) as rec:
        with pytest.raises(ValueError, match=r"site '1'.*8 units.*got 16 units.*new `out_dir`"):
            with rec.capture(2):
                wider(torch.randn(4, 4))
    from actpat.recorder import open_run

    assert open_run(tmp_path).steps("1").tolist() == [0, 1]  # the directory still opens as one run

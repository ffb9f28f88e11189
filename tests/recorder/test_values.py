"""Float16 pre-activation values stored beside the bits (format version 2), and reading version 1."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from actpat.recorder import ActivationRecorder, open_run
from actpat.recorder import schema


def _truth(layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return layer(x).numpy()


@pytest.mark.parametrize("store_values", ["all", 3, 100])
def test_values_equal_pre_activations(tmp_path, store_values):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True))
    x = torch.randn(9, 6)
    z = _truth(model[0], x)
    with ActivationRecorder(model, tmp_path, store_values=store_values) as rec:
        with rec.capture(0):
            model(x)
    run = open_run(tmp_path)
    units = run.site_info("1")["value_units"]
    expected_k = 10 if store_values != 3 else 3
    assert len(units) == expected_k and list(units) == sorted(set(units))
    values = run.read("1", 0).values
    assert values.dtype == np.float16 and values.shape == (9, expected_k)
    np.testing.assert_allclose(values.astype(np.float32), z[:, list(units)], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("store_values", [None, "all"])
def test_in_place_sites_are_read_after_their_call_unless_values_are_stored(tmp_path, store_values):
    """Read after the call (cheaper: no cache lines taken from the threads that overwrite z) only where the
    recorder needs the signs alone; stored values must be the inputs (the test above)."""
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True))
    with ActivationRecorder(model, tmp_path, store_values=store_values) as rec:
        assert rec._hooks._after_in_place is (store_values is None)


def test_values_follow_subsampled_conv_rows(tmp_path):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(3, 2, 5, 5)
    rows = _truth(conv, x).transpose(0, 2, 3, 1).reshape(3 * 25, 4)  # sample-major, then position
    with ActivationRecorder(model, tmp_path, store_values="all", max_observations=20) as rec:
        with rec.capture(0, sample_ids=torch.arange(3)):
            model(x)
    p = open_run(tmp_path).read("1", 0)
    assert len(p) == 20
    picked = rows[p.sample_ids * 25 + p.positions]
    np.testing.assert_allclose(p.values.astype(np.float32), picked, rtol=1e-3, atol=1e-3)
    assert np.array_equal(p.unpack(), picked > 0)


def test_version_1_shards_still_read(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    x = torch.randn(6, 4)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(3, labels=torch.arange(6)):
            model(x)
    (shard,) = tmp_path.glob("*.h5")
    # Rewrite the shard as version 1 wrote it: no value_start field, version attribute 1.
    v1_dtype = np.dtype([(name, schema.RECORD_DTYPE[name]) for name in schema.RECORD_DTYPE.names if name != "value_start"])
    with h5py.File(shard, "r+") as handle:
        handle.attrs["format_version"] = 1
        group = handle["sites/1"]
        old = group["records"][()]
        del group["records"]
        new = np.zeros(len(old), dtype=v1_dtype)
        for name in v1_dtype.names:
            new[name] = old[name]
        group.create_dataset("records", data=new, maxshape=(None,), chunks=(256,))
    p = open_run(tmp_path).read("1", 3)
    assert p.values is None
    assert np.array_equal(p.unpack(), _truth(model[0], x) > 0)
    assert p.labels.tolist() == list(range(6))


def test_store_values_validated(tmp_path):
    with pytest.raises(ValueError, match="store_values"):
        ActivationRecorder(nn.Sequential(nn.ReLU()), tmp_path, store_values="some")

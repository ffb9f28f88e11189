"""The probe protocol without a Trainer: plain training loops against independent truth.

The truth never calls the library's hooks, packing or counting: the tests hook the ReLUs themselves,
pack with ``np.packbits`` and count rows with ``collections.Counter``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import random
import threading
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from actpat.analysis.live import live_measures
from actpat.recorder import Prober, live_stats, open_run
from actpat.recorder.probe_module import ProbeModule
from actpat.recorder.prober import ProbeForwardError, resume_point

N_PROBE = 20
PROBE_BATCH = 8


_spec = importlib.util.spec_from_file_location("actpat_test_toys", Path(__file__).resolve().parents[1] / "toys.py")
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)
Net = toys.Net


def data(n: int, seed: int) -> TensorDataset:
    return toys.toy_data(n, seed)


def train(prober_options: dict | None, out_dir, *, epochs: int = 2, seed: int = 0, device: str = "cpu"):
    """A plain loop of 4 steps per epoch on ``device``; returns the model and its weights after every step."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = Net().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data(32, 0), batch_size=8, shuffle=True)
    weights = {0: copy.deepcopy(model.state_dict())}
    prober = None
    if prober_options is not None:
        prober = Prober(model, data(N_PROBE, 1), out_dir, steps_per_epoch=len(loader), batch_size=PROBE_BATCH,
                        **prober_options)
        prober.maybe(0, epoch=0)
    step = 0
    for epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x) + 0.01 * np.random.randn() + 0.01 * random.random(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            weights[step] = copy.deepcopy(model.state_dict())
            if prober is not None:
                prober.maybe(step, epoch=epoch)
    if prober is not None:
        prober.probe(step, epoch=epochs)
        prober.close()
    return model, weights


def relu_bits(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    return {name: toys.channel_bits(z) for name, z in toys.relu_inputs(model, x).items()}


def truth(weights: dict, mode: str, probe: TensorDataset, device: str = "cpu") -> dict[str, np.ndarray]:
    model = Net().to(device)
    model.load_state_dict(weights)
    model.train(mode == "train")
    model.net[4].eval()  # no dropout noise in a probe
    parts: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(probe), PROBE_BATCH):  # BatchNorm sees these batches in train mode
            for site, bits in relu_bits(model, probe.tensors[0][start : start + PROBE_BATCH].to(device)).items():
                parts.setdefault(site, []).append(bits)
    return {site: np.concatenate(p) for site, p in parts.items()}


# ---------------------------------------------------------------------- the protocol against truth
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("copy_model", [True, False])
def test_probes_equal_recomputation_and_training_is_bit_identical(tmp_path, mode, copy_model, device):
    cuda_rng = torch.cuda.get_rng_state if device == "cuda" else lambda: torch.zeros(0)  # dropout's stream there
    plain, _ = train(None, None, device=device)
    rng_after_plain = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), cuda_rng())
    model, weights = train(dict(every=0.5, mode=mode, copy=copy_model), tmp_path, device=device)
    for (key, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key  # weights and BatchNorm buffers
    assert torch.equal(cuda_rng(), rng_after_plain[3])
    assert torch.equal(torch.get_rng_state(), rng_after_plain[0])
    assert np.array_equal(np.random.get_state()[1], rng_after_plain[1]) and random.getstate() == rng_after_plain[2]
    assert model.training and all(m.training for m in model.modules())
    run = open_run(tmp_path)
    probe = data(N_PROBE, 1)
    assert run.steps("net.2", "probe").tolist() == [0, 2, 4, 6, 8]
    for step in (0, 2, 4, 6, 8):
        expected = truth(weights[step], mode, probe, device)
        assert sorted(expected) == sorted(run.sites)
        for site, bits in expected.items():
            p = run.read(site, step, "probe")
            np.testing.assert_array_equal(p.bits, bits, err_msg=f"{site} at step {step}")
            positions = 16 if site == "net.2" else 1
            np.testing.assert_array_equal(p.sample_ids, np.repeat(np.arange(N_PROBE), positions))
            np.testing.assert_array_equal(p.labels, np.repeat(probe.tensors[1].numpy(), positions))
    assert [run.read("net.6", s, "probe").epoch for s in (0, 2, 4, 6, 8)] == [0, 0, 0, 1, 1]


class _DropPath(nn.Module):
    """timm's stochastic depth: a sample's residual branch dropped when training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class _Noisy(nn.Module):
    """BatchNorm, functional dropout on `self.training` and a DropPath'd residual branch: written as models are."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(3, 32), nn.BatchNorm1d(32)
        self.branch, self.drop_path = nn.Sequential(nn.Linear(32, 32), nn.ReLU()), _DropPath(0.5)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        h = nn.functional.relu(self.bn(self.fc1(x)))
        h = nn.functional.dropout(h, 0.5, self.training)
        h = h + self.drop_path(self.branch(h))
        return self.fc2(torch.relu(h))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("copy_model", [True, False])
def test_dropout_of_any_kind_is_off_in_a_probe_and_batchnorm_normalizes_as_the_mode_says(tmp_path, mode, copy_model):
    # F.dropout(x, p, self.training) and DropPath were on in a train-mode probe: random patterns, and every
    # similarity measure between probes noise. Truth: the module in eval mode, its BatchNorm in the probe's mode.
    torch.manual_seed(0)
    model, probe = _Noisy(), TensorDataset(torch.randn(24, 3), torch.zeros(24, dtype=torch.long))
    model.bn.running_mean.fill_(0.3)  # running statistics unlike any batch's: the modes differ
    with Prober(model, probe, tmp_path, 1, mode=mode, copy=copy_model, batch_size=8) as prober:
        prober.probe(0)
        prober.probe(1)
    assert model.training and all(m.training for m in model.modules())
    reference = copy.deepcopy(model).eval()
    reference.bn.train(mode == "train")
    with torch.no_grad():
        expected = {name: np.concatenate([toys.channel_bits(z) for z in zs]) for name, zs in _site_inputs(
            reference, [probe.tensors[0][i : i + 8] for i in range(0, 24, 8)]).items()}
    run = open_run(tmp_path)
    assert sorted(run.sites) == sorted(expected)
    for step in (0, 1):  # the same weights: the same bits at both probes
        for site, bits in expected.items():
            np.testing.assert_array_equal(run.read(site, step, "probe").bits, bits, err_msg=f"{site}, step {step}")


class _FrozenNorm(_Noisy):
    """Keeps its BatchNorm in eval mode when trained (`norm_eval=True` of mmcv's backbones): fine-tuning."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self


@pytest.mark.parametrize("copy_model", [True, False])
def test_a_train_mode_probe_keeps_the_batchnorm_a_model_freezes_in_training_frozen(tmp_path, copy_model):
    torch.manual_seed(0)
    model, probe = _FrozenNorm().train(), TensorDataset(torch.randn(24, 3), torch.zeros(24, dtype=torch.long))
    model.bn.running_mean.fill_(0.3)
    assert not model.bn.training
    with Prober(model, probe, tmp_path, 1, mode="train", copy=copy_model, batch_size=8) as prober:
        prober.probe(0)
    assert model.training and not model.bn.training and model.drop_path.training
    reference = copy.deepcopy(model).eval()  # running statistics, as in training
    with torch.no_grad():
        expected = {name: np.concatenate([toys.channel_bits(z) for z in zs]) for name, zs in _site_inputs(
            reference, [probe.tensors[0][i : i + 8] for i in range(0, 24, 8)]).items()}
    run = open_run(tmp_path)
    for site, bits in expected.items():
        np.testing.assert_array_equal(run.read(site, 0, "probe").bits, bits, err_msg=site)


def _site_inputs(model: "_Noisy", batches: list) -> dict[str, list[torch.Tensor]]:
    """Every ReLU's input per batch of :class:`_Noisy` without dropout, computed by hand, named as the recorder
    names its sites (module paths; functional calls by the enclosing module and call index)."""
    seen: dict[str, list] = {"relu#0": [], "branch.1": [], "relu#1": []}
    for x in batches:
        z = model.bn(model.fc1(x))
        h = torch.relu(z)
        b = model.branch[0](h)
        h = h + torch.relu(b)
        for name, value in (("relu#0", z), ("branch.1", b), ("relu#1", h)):
            seen[name].append(value)
    return seen


def test_a_probe_forward_that_draws_random_numbers_is_warned_of_once(tmp_path, caplog):
    class Jitter(nn.Module):  # noise drawn whatever the mode
        def forward(self, x):
            return x + 0.01 * torch.randn_like(x)

    model = nn.Sequential(nn.Linear(3, 8), Jitter(), nn.ReLU(), nn.Linear(8, 2))
    probe = TensorDataset(torch.randn(16, 3), torch.zeros(16, dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="actpat"):
        with Prober(model, probe, tmp_path, 1, batch_size=8) as prober:
            prober.probe(0)
            prober.probe(1)
        with Prober(nn.Sequential(nn.Linear(3, 8), nn.ReLU()), probe, tmp_path / "quiet", 1, batch_size=8) as p:
            p.probe(0)
    warned = [r.getMessage() for r in caplog.records if "draws random numbers" in r.getMessage()]
    assert len(warned) == 1 and "Draw such noise only when `self.training`" in warned[0], warned


def test_schedule_is_the_first_step_at_or_after_each_multiple_of_the_interval(tmp_path):
    prober = Prober(Net(), data(4, 1), tmp_path, 0.3, steps_per_epoch=7, batch_size=4)
    interval = Fraction(3, 10) * 7  # 2.1 steps
    assert prober.interval == interval
    multiples = [k * interval for k in range(1, 20)]
    expected = sorted({math.ceil(m) for m in multiples if m <= 30})
    prober._init_step = prober._last_probe_step = 0  # as after the init probe
    probed = []
    for step in range(1, 31):
        if prober.due(step):
            probed.append(step)
            prober._last_probe_step = step  # as probe(step) does
    assert probed == expected
    assert Prober(Net(), data(4, 1), tmp_path, 0.01, steps_per_epoch=7, batch_size=4).interval == 1  # never below a step


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_a_multiple_stepped_over_is_probed_at_the_first_step_after_it(tmp_path, stride):
    # Steps that grow by more than one (a module stepping two optimizers per batch): each multiple still gets its
    # probe, at the first step `maybe` sees at or after it.
    prober = Prober(Net(), data(4, 1), tmp_path, 3, batch_size=4)
    prober._init_step = prober._last_probe_step = 0  # as after the init probe
    probed = []
    for step in range(stride, 61, stride):
        if prober.due(step):
            probed.append(step)
            prober._last_probe_step = step  # as probe(step) does
    expected = sorted({next(s for s in range(stride, 61, stride) if s >= m) for m in range(3, 61, 3)})
    assert probed == expected


# ---------------------------------------------------------------------- the two ways of lending the model
def test_the_copy_is_synced_in_place_without_a_state_dict_round_trip(monkeypatch):
    model = Net()
    lender = ProbeModule(model, "train", copy=True)
    with lender.session() as first:
        tensors = [t for t in first.state_dict(keep_vars=True).values()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.net[1].running_mean.add_(3.0)

    def refuse(*args, **kwargs):
        raise AssertionError("load_state_dict was called")

    monkeypatch.setattr(nn.Module, "load_state_dict", refuse)
    monkeypatch.setattr(nn.Module, "state_dict", refuse)
    with lender.session() as second:
        assert second is first
        copied = dict(second.named_parameters()) | dict(second.named_buffers())
        for name, value in list(model.named_parameters()) + list(model.named_buffers()):
            assert torch.equal(copied[name], value), name
    monkeypatch.undo()
    assert all(a is b for a, b in zip(tensors, first.state_dict(keep_vars=True).values()))
    assert not any(p.requires_grad for p in first.parameters())


class Stateful(nn.Module):
    """Buffers a forward changes: one in place, one by reassignment; and a submodule left in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        out = self.net(x)
        self.calls += 1
        self.ema = 0.9 * self.ema + 0.1 * out.mean(0)
        return out


def test_without_a_copy_buffers_flags_and_rng_are_restored(tmp_path):
    model = Stateful()
    model.train()
    model.net.net[5].eval()  # mixed flags must come back as they were
    with torch.no_grad():
        model(torch.randn(8, 1, 4, 4))  # non-trivial BatchNorm statistics and buffers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = model.ema
    flags = [m.training for m in model.modules()]
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with Prober(model, data(N_PROBE, 1), tmp_path, 1, mode="train", copy=False, batch_size=PROBE_BATCH) as prober:
        prober.maybe(0)
        prober.maybe(1)
    assert open_run(tmp_path).steps("net.net.2", "probe").tolist() == [0, 1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.ema is ema  # the object training holds
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]


def _mul_weight(module, batch):
    module.net[0].weight.mul_(1.0)  # an in-place change, even of the same value


def _add_total(module, batch):
    module.total += batch[0].sum()  # a metric's state kept as a plain tensor attribute (torchmetrics keeps them so)


def _update_stats(module, batch):
    # Running statistics kept in a dict: its keys were restored, its tensors kept the probe's update, silently.
    module.stats["mean"].mul_(0.9).add_(batch[0].flatten(1).mean(0), alpha=0.1)


@pytest.mark.parametrize("change, match", [
    (_mul_weight, r"changed tensors of the model in place.*net.0.weight.*copy=True"),
    (_add_total, r"changed tensors of the model in place \(\['total'\]\).*register_buffer"),
    (_update_stats, r"changed tensors of the model in place \(\[\"stats\['mean'\]\"\]\)"),
])
def test_without_a_copy_a_forward_that_changes_a_tensor_in_place_raises(tmp_path, change, match):
    """Parameters, tensor attributes and tensors one level inside a container attribute are not saved: watched."""
    model = Net()
    model.total, model.stats = torch.zeros(()), {"mean": torch.zeros(4 * 4)}

    def forward(module, batch):
        change(module, batch)
        module(batch[0])

    with Prober(model, data(8, 1), tmp_path, 1, copy=False, batch_size=8, forward=forward) as prober:
        with pytest.raises(RuntimeError, match=match):
            prober.maybe(0)


def test_without_a_copy_a_compiled_model_is_refused_at_construction(tmp_path):
    model = Net()
    model.net = torch.compile(model.net)
    with pytest.raises(ValueError, match=r"copy=False.*compiled.*\bnet\b.*copy=True"):
        Prober(model, data(8, 1), tmp_path, 1, copy=False, batch_size=8)


# ---------------------------------------------------------------------- the probe set on the device
class Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.inner = data(n, 1)
        self.reads = 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_a_resume_with_another_schedule_names_no_probe_lost_that_the_run_holds(tmp_path, caplog):
    # Probes every 0.5 epoch of 10 steps up to step 10 in the state, then on to 20; resumed every 3 steps: the new
    # schedule's steps 3, 6, 9 were never probed, so none is missing (a warning said they "never reached the disk").
    model = Net()
    prober = Prober(model, data(8, 1), tmp_path, 0.5, steps_per_epoch=10, batch_size=8)
    for step in range(11):
        prober.maybe(step)
    state = prober.state_dict()
    for step in range(11, 21):
        prober.maybe(step)
    prober.close()
    with caplog.at_level(logging.WARNING, logger="actpat"):
        resumed = Prober(model, data(8, 1), tmp_path, 3, batch_size=8)
        resumed.load_state_dict(state, step=20)
        resumed.maybe(21)
        resumed.close()
    assert not [r for r in caplog.records if "never reached the disk" in r.getMessage()]
    assert open_run(tmp_path).steps(open_run(tmp_path).sites[0], "probe").tolist() == [0, 5, 10, 15, 20, 21]


def test_sample_ids_are_the_dataset_indices_a_distributed_sampler_gives_this_rank(tmp_path):
    # A probe DataLoader that gives each rank its part (probe_on_all_ranks): rank 1 of 2 probes samples 1, 3, 5, ...
    from torch.utils.data.distributed import DistributedSampler

    probe = data(12, 1)
    loader = DataLoader(probe, batch_size=4, sampler=DistributedSampler(probe, num_replicas=2, rank=1, shuffle=False))
    with Prober(Net(), loader, tmp_path, 1, rank=1) as prober:
        prober.probe(0)
    run = open_run(tmp_path)
    for site in run.sites:
        read = run.read(site, 0, "probe")
        ids = np.unique(read.sample_ids)
        assert ids.tolist() == [1, 3, 5, 7, 9, 11]
        labels = {int(i): int(label) for i, label in zip(read.sample_ids, read.labels)}
        assert labels == {i: int(probe[i][1]) for i in ids}  # each id names the sample whose label it carries


@pytest.mark.parametrize("cache_bytes, reads", [(1 << 20, 1), (0, 3), (100, 3)])
def test_probe_set_is_read_once_when_it_fits_the_cache(tmp_path, cache_bytes, reads):
    probe = Counting(N_PROBE)
    model = Net()
    with Prober(model, probe, tmp_path, 1, mode="eval", batch_size=PROBE_BATCH, cache_bytes=cache_bytes) as prober:
        for step in range(3):
            prober.maybe(step)
        assert prober.cached == (reads == 1)
    assert probe.reads == reads * N_PROBE
    run = open_run(tmp_path)
    expected = truth(model.state_dict(), "eval", probe.inner)
    for step in range(3):
        np.testing.assert_array_equal(run.read("net.6", step, "probe").bits, expected["net.6"])


def test_a_forward_that_changes_its_input_in_place_ends_the_cache(tmp_path):
    probe = Counting(N_PROBE)
    model = Net()

    def forward(module, batch):
        module(batch[0])
        batch[0].mul_(-1)  # a model that normalizes its input in place, after the fact

    with Prober(model, probe, tmp_path, 1, mode="eval", batch_size=PROBE_BATCH, forward=forward) as prober:
        for step in range(3):
            prober.maybe(step)
    assert probe.reads == 3 * N_PROBE  # cached at the first probe, found changed at the second: read every time
    expected = truth(model.state_dict(), "eval", probe.inner)["net.6"]
    for step in range(3):
        np.testing.assert_array_equal(open_run(tmp_path).read("net.6", step, "probe").bits, expected)


# ---------------------------------------------------------------------- live statistics
def _entropy(counter: Counter) -> float:
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values())


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_live_statistics_equal_brute_force_counts_of_the_shards(tmp_path):
    received = []
    model, _ = train(dict(every=0.5, stats=live_measures, on_stats=lambda step, m: received.append((step, m))), tmp_path)
    assert [step for step, _ in received] == [0, 2, 4, 6, 8]
    run = open_run(tmp_path)
    checked = 0
    for site in run.sites:
        init = last = None
        for step, metrics in received:
            p = run.read(site, step, "probe")
            rows = [tuple(r) for r in p.unpack().astype(int).tolist()]
            a = Counter(rows)
            labels = p.labels.tolist()
            expected = {
                "entropy": _entropy(a),
                "normalized_entropy": _entropy(a) / min(p.n_units, math.log2(len(rows))),
                "distinct": len(a),
                "top_mass": max(a.values()) / len(rows),
                "mutual_information": _entropy(a) + _entropy(Counter(labels)) - _entropy(Counter(zip(rows, labels))),
            }
            for name, ref in (("init", init or a), ("last", last)):
                if ref is not None:
                    expected[f"jaccard_{name}"] = len(a.keys() & ref.keys()) / len(a.keys() | ref.keys())
                    keys = a.keys() | ref.keys()
                    expected[f"weighted_jaccard_{name}"] = (
                        sum(min(a[k], ref[k]) for k in keys) / sum(max(a[k], ref[k]) for k in keys)
                    )
            assert set(metrics[site]) == set(expected), (site, step)
            for name, value in expected.items():
                assert metrics[site][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (site, step, name)
                checked += 1
            init, last = init or a, a
    assert checked > 60


def test_live_statistics_that_fall_behind_are_skipped_said_once_and_never_block(tmp_path, caplog):
    release = threading.Event()
    computed = []

    def slow(patterns, references):
        if not release.wait(timeout=60):  # a worker stuck for a minute fails the test, it does not hang it
            raise TimeoutError
        computed.append(patterns.step)
        return live_measures(patterns, references)

    received = {}
    prober = Prober(Net(), data(N_PROBE, 1), tmp_path, 1, mode="eval", batch_size=PROBE_BATCH, stats=slow,
                    on_stats=lambda step, metrics: received.__setitem__(step, metrics))
    with caplog.at_level(logging.WARNING, logger="actpat"):
        for step in range(5):  # 0 is being computed, 1 waits, 2, 3 and 4 find the worker two probes behind
            prober.maybe(step)
        assert not release.is_set() and computed == []  # every probe returned while the worker was stuck
        release.set()
        prober.poll(wait=True)
        prober.maybe(5)  # the first probe after a gap: no `last` comparison
        prober.maybe(6)
        prober.close()
    assert sorted(received) == [0, 1, 5, 6]
    assert "jaccard_last" not in received[5]["net.6"] and "jaccard_init" in received[5]["net.6"]
    assert "jaccard_last" in received[6]["net.6"]
    warnings = [r.getMessage() for r in caplog.records if "fell 2 probes behind" in r.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0]
    assert open_run(tmp_path).steps("net.6", "probe").tolist() == list(range(7))  # the shards hold every probe


# ---------------------------------------------------------------------- resume
@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_a_second_prober_into_a_run_fails_at_its_first_probe_and_another_ranks_records_are_no_warning(
    tmp_path, caplog
):
    """A fresh prober into a directory holding its rank's probes warned that its records would be 'added beside
    them' and then failed at the capture; another rank's probes there were warned of as 'of another run?'."""
    model, probe = Net(), data(N_PROBE, 1)
    for rank in (0, 1):
        first = Prober(model, probe, tmp_path, 1, steps_per_epoch=4, batch_size=PROBE_BATCH, rank=rank)
        first.maybe(0)
        first.maybe(1)
        first.close()
    assert any("rank001" in p.name for p in tmp_path.glob("*.h5"))  # rank 1 probed beside rank 0, silently
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    shards = sorted(p.name for p in tmp_path.iterdir())
    again = Prober(model, probe, tmp_path, 1, steps_per_epoch=4, batch_size=PROBE_BATCH, rank=0)
    with pytest.raises(ValueError, match=r"recorded up to step 1 in .* continue from step 2"):
        again.maybe(0)
    again.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(p.name for p in tmp_path.iterdir()) == shards  # nothing written


def test_resume_from_state_dict_continues_without_duplicates_and_rereads_references(tmp_path, caplog, monkeypatch):
    # Every probe gets its statistics, however slowly the statistics process runs on a loaded machine (a probe
    # that finds two waiting gets none: the backlog is not what this test is about).
    monkeypatch.setattr(live_stats, "BACKLOG", 100)
    model = Net()
    probe = data(N_PROBE, 1)
    options = dict(every=2, batch_size=PROBE_BATCH, mode="eval", stats=live_measures)

    def run(out, steps, state=None):
        received = {}
        prober = Prober(model, probe, out, on_stats=lambda s, m: received.__setitem__(s, m), **options)
        if state is not None:
            prober.load_state_dict(state)
        for step in steps:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9).add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + step))
            prober.maybe(step)
        prober.close()
        return prober.state_dict(), received

    torch.manual_seed(0)
    start = copy.deepcopy(model.state_dict())
    _, straight = run(tmp_path / "straight", range(9))
    model.load_state_dict(start)
    state, first = run(tmp_path / "resumed", range(5))
    assert state == {"version": 1, "last_probe_step": 4, "init_step": 0}
    # The process died after its probe at step 4 but before saving its state: the state says step 2.
    caplog.clear()
    _, second = run(tmp_path / "resumed", range(5, 9), state={**state, "last_probe_step": 2})
    # The record of step 4 is the dead process's: kept, and said so, with the way to keep fits apart.
    (note,) = [r.getMessage() for r in caplog.records if "where this fit resumes" in r.getMessage()]
    assert "1 step after step 2, where this fit resumes: step 4," in note and "another `out_dir`" in note
    resumed = open_run(tmp_path / "resumed")
    assert resumed.steps("net.6", "probe").tolist() == [0, 2, 4, 6, 8]
    assert len(resumed.read("net.6", 4, "probe")) == N_PROBE  # recorded once, not twice
    assert first.keys() | second.keys() == straight.keys() == {0, 2, 4, 6, 8}
    for step, metrics in second.items():
        assert metrics == straight[step], step  # init and last re-read from the shards


# ---------------------------------------------------------------------- mistakes fail before training goes on
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0.2), r"`steps_per_epoch` for `every=0.2`.*len\(train_loader\)"),
        (dict(every=0), r"`every`.*but got 0"),
        (dict(every=1, batch_size=None), r"`batch_size` for a Dataset probe.*train"),
        (dict(every=1, mode="test"), r"`mode`.*'test'"),
        (dict(every=1, copy="no"), r"`copy` to be True or False"),
        (dict(every=1, cache_bytes=-1), r"`cache_bytes` to be an int >= 0"),
        (dict(every=1, stats=live_measures), r"`stats` and `on_stats` together.*only `stats`"),
        (dict(every=1, compression="snappy"), r"`compression`.*'snappy'"),
        (dict(every=1, sites=[1]), r"`sites`"),
    ],
)
def test_invalid_arguments_fail_at_construction(tmp_path, kwargs, message):
    options = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        Prober(Net(), data(8, 1), tmp_path, **options)


def test_a_shuffling_probe_loader_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shuffles"):
        Prober(Net(), DataLoader(data(8, 1), shuffle=True), tmp_path, 1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(sites=["net.2", "net.9"]), ValueError, r"\['net.9'\] is not.*\['net.2', 'net.6'\]"),
        (dict(sites="layer*"), ValueError, r"sites='layer\*'.*\['net.2', 'net.6'\]"),
        (dict(labels_from=lambda batch: batch[1].float()), ValueError, r"float labels.*labels_from"),
        (dict(inputs_from=lambda batch: batch[1]), ProbeForwardError, r"`module\(inputs\)`.*inputs_from.*forward="),
        (dict(forward=lambda module, batch: module(batch)), ProbeForwardError, r"your `forward\(module, batch\)`"),
        # Inputs that do not fit the model: its first site runs, a later layer raises; none of its records is written.
        (dict(inputs_from=lambda batch: batch[0][..., :3, :3]), ProbeForwardError,
         r"failed on a probe batch .* Check that the probe data fit the model"),
        # Functions written for dict batches, given the lists of a TensorDataset's loader: named, with the batch.
        (dict(labels_from=lambda batch: batch["label"]), ValueError,
         r"`labels_from\(batch\)` raised TypeError.*list\(Tensor\[8, 1, 4, 4\] float32, Tensor\[8\] int64\)"),
        (dict(inputs_from=lambda batch: batch["image"]), ValueError, r"`inputs_from\(batch\)` raised TypeError"),
    ],
)
def test_setup_mistakes_raise_at_the_first_probe_with_the_fix(tmp_path, kwargs, error, message):
    prober = Prober(Net(), data(8, 1), tmp_path, 1, batch_size=8, **kwargs)
    with pytest.raises(error, match=message) as caught:
        prober.maybe(0)
    prober.close(wait=False)
    assert str(caught.value.__cause__) != str(caught.value)  # said once, not again as its own cause
    assert not list(tmp_path.rglob("*.h5*")), "a setup mistake wrote records"


class _Block(nn.Module):
    """torchvision's BasicBlock in small: one `relu` module called twice, and a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 8)

    def forward(self, x):
        h = self.relu(self.fc1(x))
        return nn.functional.relu(self.relu(self.fc2(h) + h)) + torch.relu(h)


@pytest.mark.parametrize("sites, partial", [
    ("layer*.relu", "layer1.relu but not layer1.relu#1"),
    (["layer1.relu", "layer1:relu#0"], "layer1.relu but not layer1.relu#1; layer1:relu#0 but not layer1:relu#1"),
    ("layer*.relu*", None),
    (lambda name: name == "layer1.relu", None),  # a predicate: leaving calls out is meant
])
def test_names_that_select_some_calls_of_a_site_but_not_its_others_are_warned_of(tmp_path, caplog, sites, partial):
    # The second call of a reused module (`relu#1`: torchvision's block output) went unrecorded without a word.
    model = nn.Sequential()
    model.add_module("layer1", _Block())
    probe = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="actpat"):
        with Prober(model, probe, tmp_path, 1, batch_size=8, sites=sites) as prober:
            prober.probe(0)
            prober.probe(1)
    warned = [r.getMessage() for r in caplog.records if "selects some calls of a site" in r.getMessage()]
    if partial is None:
        assert not warned
    else:
        assert len(warned) == 1 and f"({partial})" in warned[0] and "`layer*.relu*`" in warned[0], warned
    assert open_run(tmp_path).sites  # recorded all the same


def test_resume_point_names_the_steps_ahead_of_the_resumed_fit(tmp_path):
    assert resume_point(tmp_path, "train", 2, recorded=[0, 1, 2]) == (2, None)
    last, note = resume_point(tmp_path, "train", 2, recorded=[0, 1, 2, 5, 8])
    assert last == 8 and "train records at 2 steps after step 2, where this fit resumes: steps 5, 8, written" in note
    last, note = resume_point(tmp_path, "probe", 2, recorded=[0, 2, 3, 4, 5, 6, 9], resume_step=3)
    assert last == 9 and "probe records at 4 steps after step 3, where this fit resumes: steps 4, 5, 6, 9," in note
    last, note = resume_point(tmp_path, "probe", 2, recorded=[0, 2, 3, 4, 5, 6, 9])
    assert "at 5 steps after step 2, where this fit resumes: steps 3, 4, ..., 9," in note
    _, note = resume_point(tmp_path, "probe", 2, recorded=[0, 2, 3, 4, 5, 6, 7])
    assert "at 5 steps after step 2, where this fit resumes: steps 3 to 7," in note


def test_a_probe_forward_that_skips_the_first_batch_is_told_that_batch_is_checked(tmp_path):
    probe = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    calls = []

    def forward(module, batch):
        calls.append(1)
        return None if len(calls) == 1 else module(batch[0])  # the first batch never reaches the model

    prober = Prober(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), probe, tmp_path, 1, batch_size=4, forward=forward)
    with pytest.raises(Exception, match=r"the first batch of the first probe \(a `probe_forward` must run the model"):
        prober.maybe(0)
    prober.close()
    assert not list(tmp_path.glob("*.h5"))  # nothing written


# ---------------------------------------------------------------------- state beyond weights and buffers
class Stateful2(nn.Module):
    """State the way models keep it besides parameters and buffers: made at the first call, RNGs of their own,
    Python counters and lists, a submodule made on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
        self.register_buffer("shift", None)
        self.gen = torch.Generator().manual_seed(1)
        self.rng = np.random.default_rng(2)
        self.calls, self.seen, self.by_name = 0, [], {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.shift is None:
            self.shift = x.mean(0).detach()  # fills the buffer registered as None
        if "scale" not in self._buffers:
            self.register_buffer("scale", x.std(0).detach() + 1)
        if not hasattr(self, "extra"):
            self.extra = nn.Linear(3, 3)  # its weights are drawn from torch's RNG at the first call
        self.calls += 1
        self.seen.append(self.calls)
        self.by_name[self.calls] = 1
        z = self.fc1((x - self.shift) / self.scale)
        if self.training:
            z = z + 0.1 * torch.randn(z.shape, generator=self.gen) + float(self.rng.normal())
        return self.extra(self.fc2(self.act(z)))


def _fit_stateful(tmp_path, copy_model: bool | None, steps: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = Stateful2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    prober = None
    if copy_model is not None:
        prober = Prober(model, data(N_PROBE, 1), tmp_path, 1, mode="train", copy=copy_model, batch_size=PROBE_BATCH)
        prober.maybe(0)
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 1:  # made by the first training forward: now an optimizer would be made
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if prober is not None:
            prober.maybe(step)
    if prober is not None:
        prober.close()
    return model


@pytest.mark.parametrize("copy_model", [True, False])
def test_state_a_forward_makes_or_draws_is_training_s_alone(tmp_path, copy_model):
    """Without a copy, the probe forward made the buffer training's first forward should make (from probe data),
    drew from the module's own RNGs and counted in its counters; training then differed from a run without probes."""
    plain = _fit_stateful(tmp_path / "plain", None)
    probed = _fit_stateful(tmp_path / "probed", copy_model)
    assert open_run(tmp_path / "probed").steps("act", "probe").tolist() == [0, 1, 2, 3, 4]
    assert plain.state_dict().keys() == probed.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, probed.state_dict()[key]), key
    assert torch.equal(plain.gen.get_state(), probed.gen.get_state())
    assert plain.rng.bit_generator.state == probed.rng.bit_generator.state
    assert (plain.calls, plain.seen, plain.by_name) == (probed.calls, probed.seen, probed.by_name) and plain.calls == 4


def _probe_truth(model: nn.Module, probe: TensorDataset) -> np.ndarray:
    """The bits of `act` on the probe set, by a pre-hook on a fresh deep copy of the model as it is now."""
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        return toys.channel_bits(toys.relu_inputs(twin, probe.tensors[0])["act"])


@pytest.mark.parametrize("change", ["attribute", "numpy_number", "fraction", "tensor", "tensor_in_place",
                                    "aliased_tensor", "generator", "submodule", "buffer"])
def test_the_copy_follows_what_training_changes_besides_tensors(tmp_path, change):
    """The copy was synced by the tensors of the modules it was made from: a number training changes (a fade-in;
    also as a numpy scalar or a tensor attribute), the state of a generator the module draws from, a submodule
    replaced after it was made and a buffer registered later were those of the first probe."""

    class Faded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
            self.base = torch.zeros(())
            self.alpha = {"tensor_in_place": torch.zeros(()), "aliased_tensor": self.base}.get(change, 0.0)
            self.gen = torch.Generator().manual_seed(0)

        def forward(self, x):
            z = self.fc1(x.flatten(1)) + float(self.alpha) - self.base
            if change == "generator":  # noise from the module's own generator, in a probe too
                z = z + torch.randn(z.shape, generator=self.gen)
            if "center" in self._buffers:
                z = z - self.center
            return self.fc2(self.act(z))

    torch.manual_seed(0)
    model, probe = Faded(), data(N_PROBE, 1)
    with Prober(model, probe, tmp_path, 1, mode="eval", batch_size=N_PROBE) as prober:
        prober.maybe(0)
        if change == "attribute":
            model.alpha = 0.7
        elif change == "numpy_number":
            model.alpha = np.float32(0.7)
        elif change == "fraction":
            model.alpha = Fraction(7, 10)
        elif change == "aliased_tensor":
            model.alpha = torch.tensor(0.7)  # the copy's alpha is its base, too
        elif change == "tensor":
            model.alpha = torch.tensor(0.7)
        elif change == "tensor_in_place":
            model.alpha.add_(0.7)
        elif change == "generator":
            torch.randn(5, generator=model.gen)  # training draws from it
        elif change == "submodule":
            model.fc1 = nn.Linear(16, 8)
        else:
            model.register_buffer("center", torch.linspace(-1, 1, 8))
        prober.maybe(1)
    run = open_run(tmp_path)
    recorded = run.read("act", 1, "probe").bits
    expected = _probe_truth(model, probe)
    assert not np.array_equal(run.read("act", 0, "probe").bits, expected)  # the change shows in the patterns
    assert np.array_equal(recorded, expected)


class _Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("copy_model", [True, False])
def test_uninitialized_lazy_modules_are_refused_with_the_fix(tmp_path, copy_model):
    with Prober(_Lazy(), data(8, 1), tmp_path, 1, copy=copy_model, batch_size=8) as prober:
        with pytest.raises(ValueError, match=r"net\.1\.weight, net\.1\.bias are not initialized.*LazyLinear.*"
                                             r"one forward pass of an example batch"):
            prober.maybe(0)


def test_a_model_deepcopy_refuses_names_copy_false(tmp_path):
    model = Net()
    model.handle = threading.Lock()  # deepcopy cannot copy a lock
    with Prober(model, data(8, 1), tmp_path, 1, batch_size=8) as prober:
        with pytest.raises(RuntimeError, match=r"copy\.deepcopy, which failed on Net: .*lock.*Pass `copy=False`"):
            prober.maybe(0)


def test_a_pruned_model_that_deepcopy_refuses_is_named_and_probed_without_the_copy(tmp_path):
    from torch.nn.utils import prune

    model = Net()
    layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
    prune.l1_unstructured(layer, "weight", amount=0.5)  # the weight becomes computed from weight_orig and a mask
    with Prober(model, data(8, 1), tmp_path / "copy", 1, batch_size=8) as prober:
        with pytest.raises(RuntimeError, match=r"deepcopy.*torch\.nn\.utils\.prune.*Pass `copy=False`"):
            prober.maybe(0)
    seen = []
    handle = next(m for m in model.modules() if isinstance(m, nn.ReLU)).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()))
    with Prober(model, data(8, 1), tmp_path / "nocopy", 1, copy=False, batch_size=8) as prober:
        prober.maybe(0)
    handle.remove()
    site = open_run(tmp_path / "nocopy").sites[0]
    z = seen[0]
    rows = (z > 0).movedim(1, -1).reshape(-1, z.shape[1])  # channel patterns: one per (sample, position)
    expected = np.packbits(rows.numpy(), axis=1, bitorder="little")
    np.testing.assert_array_equal(open_run(tmp_path / "nocopy").read(site, 0).bits, expected)


class _Sequences(torch.utils.data.Dataset):
    """Token sequences of different lengths, as a tokenized text dataset gives them."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.randn(3 + i % 3, 4, generator=torch.Generator().manual_seed(i)), i % 2


def test_a_dataset_probe_of_different_lengths_names_the_dataloader_way_out(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with Prober(model, _Sequences(), tmp_path, 1, batch_size=3, pattern="channel_last") as prober:
        with pytest.raises(ValueError, match=r"different shapes .*sequences of different lengths.*DataLoader with your "
                                             r"own collate_fn"):
            prober.maybe(0)


def test_mask_from_makes_a_probe_of_padded_sequences_independent_of_the_padding(tmp_path):
    from actpat.analysis import summarize

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.block = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)

        def forward(self, x, real):
            return self.block(self.embed(x), src_key_padding_mask=~real)

    def pad(samples):  # to the longest of each batch, as a tokenized text loader does
        xs, ys = zip(*samples)
        real = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in xs], batch_first=True)
        return torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True), torch.tensor(ys), real

    torch.manual_seed(0)
    model = Tokens()
    seen = []
    model.block.linear1.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    probe = _Sequences()
    entropies = {}
    for batch_size in (2, 6):
        loader = DataLoader(probe, batch_size=batch_size, collate_fn=pad)
        seen.clear()
        out = tmp_path / str(batch_size)
        with Prober(model, loader, out, 1, mode="eval", pattern="channel_last", mask_from=lambda batch: batch[2],
                    forward=lambda module, batch: module(batch[0], batch[2])) as prober:
            prober.maybe(0)
        # Brute force: the patterns of the real tokens only, over the whole probe set.
        rows = [tuple((z[i, t] > 0).tolist()) for (x, y, real), z in zip(loader, seen)
                for i in range(len(x)) for t in range(int(real[i].sum()))]
        counts = np.array(list(Counter(rows).values()), dtype=float)
        expected = -(counts / counts.sum() * np.log2(counts / counts.sum())).sum()
        table = summarize(out, "probe", progress=False)
        got = table[(table["metric"] == "entropy")]["value"].item()
        assert got == pytest.approx(expected, abs=1e-12)
        assert table[table["metric"] == "n_observations"]["value"].item() == len(rows) == 24  # 6 sequences of 3-5
        entropies[batch_size] = got
    assert entropies[2] == pytest.approx(entropies[6], abs=1e-12)


def test_the_probe_copy_follows_forward_hooks_added_and_removed_on_the_model(tmp_path):
    model = Net().eval()
    probe = data(8, 1)
    with torch.no_grad():
        z = model.net[:6](probe.tensors[0])
    with Prober(model, probe, tmp_path, 1, batch_size=8, mode="eval", copy=True, stats=None) as prober:
        prober.probe(0)
        handle = model.net[6].register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))  # an ablation from now on
        prober.probe(1)
        handle.remove()
        prober.probe(2)
    run = open_run(tmp_path)
    for step, shift in ((0, 0.0), (1, 0.5), (2, 0.0)):
        p = run.read("net.6", step, "probe")
        np.testing.assert_array_equal(p.unpack()[np.argsort(p.sample_ids)], (z - shift > 0).numpy(), err_msg=str(step))


def test_a_probe_that_raised_is_tried_again_at_the_next_multiple_not_the_next_step(tmp_path):
    failing = {"on": False}

    def forward(module, batch):
        if failing["on"]:
            raise RuntimeError("out of memory")  # transient, caught by the training loop
        return module(batch[0])

    prober = Prober(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), TensorDataset(torch.randn(8, 4)), tmp_path, 10,
                    batch_size=8, forward=forward)
    prober.maybe(0)
    attempts = []
    for step in range(1, 31):
        failing["on"] = 10 <= step < 20
        if prober.due(step):
            attempts.append(step)
            try:
                prober.maybe(step)
            except ProbeForwardError as exc:  # the probe data fitted at step 0: no advice to check them
                assert "out of memory" in str(exc) and "fit the model" not in str(exc)
    prober.close()
    assert attempts == [10, 20, 30]
    assert open_run(tmp_path).steps("1", "probe").tolist() == [0, 20, 30]


def test_a_probe_set_of_another_float_dtype_than_the_weights_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).double()  # as trained at precision "64-true"
    with Prober(model, TensorDataset(torch.randn(8, 4)), tmp_path, 1, batch_size=8) as prober:
        with pytest.raises(ProbeForwardError, match=r"The batch holds torch.float32 tensors and the module's weights "
                                                    r"are torch.float64: .* convert the inputs in the probe forward"):
            prober.maybe(0)

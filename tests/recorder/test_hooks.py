"""Recorded bits equal an independent ``z > 0`` captured by the test's own hooks, for every site kind."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actpat.recorder import ActivationRecorder, open_run
from actpat.recorder.hooks import SiteHooks, site_filter


def _record(model, inputs, out_dir, *, steps=None, labels=None, sample_ids=None, **kwargs):
    """Run ``model`` on each input inside its own capture; returns the opened run."""
    with ActivationRecorder(model, out_dir, **kwargs) as rec:
        for step, x in enumerate(inputs):
            with rec.capture(steps[step] if steps else step, labels=labels, sample_ids=sample_ids):
                model(x)
    return open_run(out_dir)


def _assert_site(run, site, step, expected, truth):
    got = run.read(site, step)
    assert got.n_units == expected.shape[1]
    np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), expected)
    return got


# ---------------------------------------------------------------------------- module sites
@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: nn.Linear(5, 11), (6, 5)),
        (lambda: nn.Conv1d(3, 9, 3, padding=1), (4, 3, 7)),
        (lambda: nn.Conv2d(3, 17, 3, padding=1), (3, 3, 5, 6)),
        (lambda: nn.Conv3d(2, 8, 3, padding=1), (2, 2, 3, 4, 5)),
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d"],
)
def test_module_relu_bits_match_independent_truth(layer, shape, tmp_path, truth, no_global_hooks):
    torch.manual_seed(0)
    model = nn.Sequential(layer(), nn.ReLU())
    taps = truth.Taps(model[1])
    xs = [torch.randn(shape) for _ in range(2)]
    labels = torch.arange(shape[0]) % 3
    sample_ids = torch.arange(shape[0]) + 100
    run = _record(model, xs, tmp_path, labels=labels, sample_ids=sample_ids)
    taps.remove()

    assert run.sites == ["1"]
    info = run.site_info("1")
    assert info["module_type"] == "ReLU" and info["pattern"] == "channel"
    assert info["shape"] == tuple(taps.inputs[0].shape[1:])
    for step, z in enumerate(taps.inputs):
        expected = truth.channel(z)
        assert expected.any() and not expected.all()  # the comparison is not vacuous
        got = _assert_site(run, "1", step, expected, truth)
        n_positions = int(np.prod(z.shape[2:]))
        np.testing.assert_array_equal(got.positions, np.tile(np.arange(n_positions), shape[0]))
        np.testing.assert_array_equal(got.labels, np.repeat(labels.numpy(), n_positions))
        np.testing.assert_array_equal(got.sample_ids, np.repeat(sample_ids.numpy(), n_positions))
        assert got.nan_count == 0


def test_inplace_relu_records_pre_activation_before_overwrite(tmp_path, truth):
    class SubtractInPlace(nn.Module):
        def forward(self, x):
            return x.sub_(0.5)  # would flip bits if the recorder read z after the in-place ops

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(inplace=True), SubtractInPlace())
    taps = truth.Taps(model[1])
    run = _record(model, [torch.randn(9, 7)], tmp_path)
    taps.remove()
    z = taps.inputs[0]
    assert (z < 0).any()
    _assert_site(run, "1", 0, truth.channel(z), truth)
    # After the forward the tensor fed to the ReLU holds relu(z) - 0.5: the recorder must not see that.
    assert not np.array_equal(truth.channel(F.relu(z) - 0.5), truth.channel(z))


# Every in-place spelling of a ReLU-family call, and whether the recorder may read it after the call (from its
# output): only where the output has the input's signs and NaNs. A LeakyReLU slope of 0 turns -inf into NaN,
# an infinite one -0.0; a negative one flips signs.
_IN_PLACE_CALLS = {
    "ReLU": (nn.ReLU(inplace=True), True),
    "ReLU6": (nn.ReLU6(inplace=True), True),
    "LeakyReLU(0.1)": (nn.LeakyReLU(0.1, inplace=True), True),
    "LeakyReLU(0)": (nn.LeakyReLU(0.0, inplace=True), False),
    "LeakyReLU(inf)": (nn.LeakyReLU(math.inf, inplace=True), False),
    "LeakyReLU(-0.5)": (nn.LeakyReLU(-0.5, inplace=True), False),
    "F.relu": (lambda t: F.relu(t, inplace=True), True),
    "F.relu_": (F.relu_, True),
    "torch.relu_": (torch.relu_, True),
    "Tensor.relu_": (lambda t: t.relu_(), True),
    "F.relu6": (lambda t: F.relu6(t, inplace=True), True),
    "F.leaky_relu(0.2)": (lambda t: F.leaky_relu(t, 0.2, inplace=True), True),
    "F.leaky_relu(0)": (lambda t: F.leaky_relu(t, 0.0, inplace=True), False),
    "F.leaky_relu(-0.3)": (lambda t: F.leaky_relu(t, -0.3, inplace=True), False),
    "F.leaky_relu_": (F.leaky_relu_, True),
    "F.leaky_relu_(0)": (lambda t: F.leaky_relu_(t, 0.0), False),
    "F.leaky_relu_(-0.3)": (lambda t: F.leaky_relu_(t, -0.3), False),
    "F.leaky_relu_(slope=-0.3)": (lambda t: F.leaky_relu_(t, negative_slope=-0.3), False),
}


class _Calls(nn.Module):
    """Linear, then the call, then an in-place op that would change the signs again; keeps each input."""

    def __init__(self, call):
        super().__init__()
        self.fc = nn.Linear(6, 11)
        self.act = call if isinstance(call, nn.Module) else None
        self.call = call
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        z = self.fc(x)
        z[0, :3] = float("nan")  # NaNs: off, and counted
        z[1, 0], z[1, 1], z[1, 2] = -0.0, 0.0, -math.inf
        self.inputs.append(z.detach().clone())
        return self.call(z).sub_(0.25)


def _record_calls(model, tmp_path, steps=2):
    torch.manual_seed(6)
    with ActivationRecorder(model, tmp_path) as rec:
        for step in range(steps):
            with rec.capture(step), torch.no_grad():
                model(torch.randn(7, 6))
    return open_run(tmp_path)


def _assert_inputs_recorded(run, site, inputs, truth):
    for step, z in enumerate(inputs):
        assert (z < 0).any() and (z > 0).any()
        got = _assert_site(run, site, step, truth.channel(z), truth)
        assert got.nan_count == int(torch.isnan(z).sum())


@pytest.mark.parametrize("name", list(_IN_PLACE_CALLS))
def test_in_place_calls_record_the_pre_activation_signs(name, tmp_path, truth):
    model = _Calls(_IN_PLACE_CALLS[name][0])
    run = _record_calls(model, tmp_path)
    (site,) = run.sites
    if model.act is not None:
        assert site == "act"
    else:  # a functional call in the root module's forward
        assert site.split("#") == [{"relu6": "relu6", "leaky": "leaky_relu"}.get(name[2:7], "relu"), "0"]
    _assert_inputs_recorded(run, site, model.inputs, truth)
    assert run.read(site, 0).nan_count == 3


def _pre_hook_returning(module, args):
    return (args[0] - 0.5,)


def _pre_hook_in_place(module, args):
    args[0].sub_(0.5)


def _own_forward(module):
    module.forward = lambda t: F.relu(t - 1.0)


@pytest.mark.parametrize("interference", ["pre-hook returning", "pre-hook in place", "own forward", "global hook"])
def test_in_place_module_with_hooks_or_forward_of_its_own_records_its_input(interference, tmp_path, truth):
    """What a user's forward or global hook does between the module's call and its output must not reach the
    record; the module's own pre-hooks change what is fed into it: the site is the input its forward gets."""
    model = _Calls(nn.ReLU(inplace=True))
    handle = None
    if interference == "pre-hook returning":
        handle = model.act.register_forward_pre_hook(_pre_hook_returning)
    elif interference == "pre-hook in place":
        handle = model.act.register_forward_pre_hook(_pre_hook_in_place)
    elif interference == "own forward":
        _own_forward(model.act)
    else:  # registered before the recorder's own global hooks, so it runs before them
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, output: output.fill_(1.0) if isinstance(module, nn.ReLU) else None
        )
    try:
        run = _record_calls(model, tmp_path)
    finally:
        if handle is not None:
            handle.remove()
    fed = [z - 0.5 for z in model.inputs] if interference.startswith("pre-hook") else model.inputs
    _assert_inputs_recorded(run, "act", fed, truth)


@pytest.mark.parametrize("signs_only", [False, True])
@pytest.mark.parametrize(
    "name", ["ReLU", "LeakyReLU(-0.5)", "LeakyReLU(0)", "F.relu", "F.leaky_relu(-0.3)", "F.leaky_relu_(0)", "torch.relu_"]
)
def test_signs_only_hands_sign_keeping_in_place_calls_their_output(name, signs_only):
    """The hooks' contract: with ``signs_only`` a sign-keeping in-place call is handed over after it ran
    (its output, no negative value left), any other call and every call without it before (its input)."""
    torch.manual_seed(7)
    call, keeps_signs = _IN_PLACE_CALLS[name]
    model = _Calls(call)
    seen = []
    hooks = SiteHooks(model, lambda site, kind, z: seen.append(z.detach().clone()), signs_only=signs_only)
    hooks.attach()
    try:
        with torch.no_grad():
            model(torch.randn(5, 6))
    finally:
        hooks.detach()
    (z,) = seen
    if signs_only and keeps_signs:
        assert not (z < 0).any()  # relu's output
    else:
        torch.testing.assert_close(z, model.inputs[0], equal_nan=True)


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.2), nn.PReLU(4), nn.ReLU6(), nn.LeakyReLU(0.1, inplace=True)])
def test_leaky_prelu_relu6(act, tmp_path, truth):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), act)
    taps = truth.Taps(act)
    run = _record(model, [torch.randn(3, 2, 6, 6)], tmp_path)
    taps.remove()
    assert run.site_info("1")["module_type"] == type(act).__name__
    _assert_site(run, "1", 0, truth.channel(taps.inputs[0]), truth)


def test_module_instance_reused_twice_is_named_path_and_path_hash_1(tmp_path, truth):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(6, 10), nn.Linear(10, 12), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(3)
    model = nn.Sequential(Reuse())
    taps = truth.Taps(model[0].act)
    run = _record(model, [torch.randn(5, 6), torch.randn(5, 6)], tmp_path)
    taps.remove()
    assert run.sites == ["0.act", "0.act#1"]
    assert run.site_info("0.act")["n_units"] == 10 and run.site_info("0.act#1")["n_units"] == 12
    for step in range(2):
        z0, z1 = taps.inputs[2 * step], taps.inputs[2 * step + 1]
        _assert_site(run, "0.act", step, truth.channel(z0), truth)
        _assert_site(run, "0.act#1", step, truth.channel(z1), truth)


# ---------------------------------------------------------------------------- functional sites
class _TwoFunctional(nn.Module):
    """Calls a functional relu twice and keeps its own copy of each pre-activation."""

    def __init__(self, first=F.relu, second=torch.relu):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 9), nn.Linear(9, 5)
        self.first, self.second = first, second
        self.taps: list[torch.Tensor] = []

    def forward(self, x):
        z = self.fc1(x)
        self.taps.append(z.detach().clone())
        z = self.fc2(self.first(z))
        self.taps.append(z.detach().clone())
        return self.second(z)


def test_functional_relu_twice_in_a_submodule(tmp_path, truth):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Identity(), _TwoFunctional(F.relu, lambda t: t.relu()))
    run = _record(model, [torch.randn(8, 4)], tmp_path)
    assert run.sites == ["1:relu#0", "1:relu#1"]
    assert run.site_info("1:relu#0")["module_type"] == "function:relu"
    z0, z1 = model[1].taps
    _assert_site(run, "1:relu#0", 0, truth.channel(z0), truth)
    _assert_site(run, "1:relu#1", 0, truth.channel(z1), truth)


def test_functional_relu_at_root_is_named_without_path(tmp_path, truth):
    torch.manual_seed(5)
    model = _TwoFunctional(lambda t: F.relu(t, inplace=True), torch.relu_)
    run = _record(model, [torch.randn(8, 4), torch.randn(8, 4)], tmp_path)
    assert run.sites == ["relu#0", "relu#1"]  # call indices restart with every top-level forward
    for step in range(2):
        z0, z1 = model.taps[2 * step : 2 * step + 2]
        _assert_site(run, "relu#0", step, truth.channel(z0), truth)
        _assert_site(run, "relu#1", step, truth.channel(z1), truth)


def test_functional_calls_in_library_modules_subclasses_and_hooks_are_sites(tmp_path, truth):
    """The interceptor skips torch.nn's own layers; what they cannot see must still be recorded.

    A functional ReLU inside a torch.nn module that calls one (TransformerEncoderLayer), in a subclass of a
    plain layer that overrides forward, and in a forward hook on a plain layer inside a Sequential.
    """
    torch.manual_seed(6)

    class GatedLinear(nn.Linear):
        def forward(self, x):
            z = super().forward(x)
            self.tap = z.detach().clone()
            return F.relu(z)

    hooked = []
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), GatedLinear(4 * 4 * 4, 8))
    cnn[0].register_forward_hook(lambda module, args, out: hooked.append(out.detach().clone()) or F.relu(out))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = cnn
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x, t):
            return self.cnn(x), self.enc(t)

    model = Model()
    x, t = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 8)
    linear1 = []  # the encoder's pre-activation, its first linear layer's output, from a forward of its own
    handle = model.enc.linear1.register_forward_hook(lambda module, args, out: linear1.append(out.detach().clone()))
    model(x, t)
    handle.remove()
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(x, t)
    run = open_run(tmp_path)
    assert run.sites == ["cnn:relu#0", "cnn.2:relu#0", "enc:relu#0"]
    _assert_site(run, "cnn.2:relu#0", 0, truth.channel(cnn[2].tap), truth)
    _assert_site(run, "cnn:relu#0", 0, truth.channel(hooked[-1]), truth)
    _assert_site(run, "enc:relu#0", 0, truth.channel(linear1[0]), truth)


def test_functional_leaky_relu_and_relu6_names(tmp_path):
    class Mixed(nn.Module):
        def forward(self, x):
            return F.relu6(F.leaky_relu(x, 0.1)) + F.leaky_relu(x)

    model = Mixed()
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(torch.randn(2, 3))
    assert sorted(open_run(tmp_path).sites) == ["leaky_relu#0", "leaky_relu#1", "relu6#0"]


def test_functional_false_records_modules_only(tmp_path):
    model = nn.Sequential(nn.ReLU(), _TwoFunctional())
    with ActivationRecorder(model, tmp_path, functional=False) as rec:
        with rec.capture(0):
            model(torch.randn(2, 4))
    assert open_run(tmp_path).sites == ["0"]


def test_custom_module_types(tmp_path, truth):
    model = nn.Sequential(nn.Linear(3, 6), nn.GELU())
    taps = truth.Taps(model[1])
    run = _record(model, [torch.randn(4, 3)], tmp_path, module_types=(nn.GELU,))
    taps.remove()
    assert run.sites == ["1"] and run.site_info("1")["module_type"] == "GELU"
    _assert_site(run, "1", 0, truth.channel(taps.inputs[0]), truth)


# ---------------------------------------------------------------------------- dtypes, layouts, sizes
def test_autocast_bf16(tmp_path, truth):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU())
    taps = truth.Taps(model[1], model[4])
    out = tmp_path / "run"
    with ActivationRecorder(model, out) as rec:
        with rec.capture(0), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(3, 3, 6, 6))
    taps.remove()
    assert all(z.dtype == torch.bfloat16 for z in taps.inputs)
    run = open_run(out)
    _assert_site(run, "1", 0, truth.channel(taps.inputs[0]), truth)
    _assert_site(run, "4", 0, truth.channel(taps.inputs[1]), truth)


def test_channels_last_input(tmp_path, truth):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU()).to(memory_format=torch.channels_last)
    taps = truth.Taps(model[1])
    x = torch.randn(4, 3, 5, 7).to(memory_format=torch.channels_last)
    run = _record(model, [x], tmp_path, sample_ids=torch.arange(4))
    taps.remove()
    assert taps.inputs[0].is_contiguous(memory_format=torch.channels_last)
    got = _assert_site(run, "1", 0, truth.channel(taps.inputs[0]), truth)
    np.testing.assert_array_equal(got.positions, np.tile(np.arange(35), 4))


def test_batch_of_one(tmp_path, truth):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
    taps = truth.Taps(model[1], model[4])
    run = _record(model, [torch.randn(1, 1, 4, 4)], tmp_path, labels=[7])
    taps.remove()
    got = _assert_site(run, "1", 0, truth.channel(taps.inputs[0]), truth)
    assert len(got) == 4 and (got.labels == 7).all()
    got = _assert_site(run, "4", 0, truth.channel(taps.inputs[1]), truth)
    assert len(got) == 1 and got.labels.tolist() == [7]


def test_zero_size_batch_records_nothing(tmp_path, truth):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU())
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0, labels=torch.zeros(0, dtype=torch.long)):
            out = model(torch.randn(0, 2, 5, 5))  # first capture ever: no error, nothing recorded
        assert out.shape == (0, 4, 3, 3)
        assert rec.sites == []
        x = torch.randn(2, 2, 5, 5)
        with rec.capture(1):
            model(x)
        with rec.capture(2):
            model(torch.randn(0, 2, 5, 5))
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [1]
    z = model[0](x)
    _assert_site(run, "1", 1, truth.channel(z), truth)
    with pytest.raises(KeyError):
        run.read("1", 0)


def test_zero_size_batch_only_writes_no_shard(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(torch.randn(0, 2))
    assert open_run(tmp_path).sites == []


@pytest.mark.parametrize("pattern", ["channel", "flat"])
def test_flat_vs_channel_layouts(pattern, tmp_path, truth):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 9, 6), nn.ReLU())
    taps = truth.Taps(model[1], model[4])
    labels, sample_ids = torch.tensor([3, 1, 4]), torch.tensor([10, 11, 12])
    run = _record(model, [torch.randn(3, 3, 5, 5)], tmp_path, pattern=pattern, labels=labels, sample_ids=sample_ids)
    taps.remove()
    z_conv, z_fc = taps.inputs
    if pattern == "flat":
        got = _assert_site(run, "1", 0, truth.flat(z_conv), truth)
        assert got.n_units == 45 and len(got) == 3
        np.testing.assert_array_equal(got.positions, np.zeros(3))
        np.testing.assert_array_equal(got.labels, labels.numpy())
        np.testing.assert_array_equal(got.sample_ids, sample_ids.numpy())
    else:
        got = _assert_site(run, "1", 0, truth.channel(z_conv), truth)
        assert got.n_units == 5 and len(got) == 27
        # Row r is sample r // 9 at flattened position r % 9, unit c = channel c.
        for r in (0, 8, 9, 26):
            s, pos = divmod(r, 9)
            np.testing.assert_array_equal(truth.unpack(got.bits[r : r + 1], 5)[0], (z_conv[s, :, pos // 3, pos % 3] > 0).numpy())
        np.testing.assert_array_equal(got.positions, np.tile(np.arange(9), 3))
        np.testing.assert_array_equal(got.labels, np.repeat(labels.numpy(), 9))
        np.testing.assert_array_equal(got.sample_ids, np.repeat(sample_ids.numpy(), 9))
    assert run.site_info("1")["pattern"] == pattern
    # A dense site is the same in both layouts.
    got = _assert_site(run, "4", 0, truth.flat(z_fc), truth)
    np.testing.assert_array_equal(got.positions, np.zeros(3))


def test_nan_pre_activations_are_off_and_counted(tmp_path, truth):
    class PoisonNaN(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, 0] = float("nan")
            x[1, 2:4] = float("nan")
            return x

    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), PoisonNaN(), nn.ReLU())
    taps = truth.Taps(model[2])
    run = _record(model, [torch.randn(3, 2, 5, 5)], tmp_path)
    taps.remove()
    z = taps.inputs[0]
    n_nan = int(torch.isnan(z).sum())
    assert n_nan == 9 + 2 * 9
    got = _assert_site(run, "2", 0, truth.channel(z), truth)
    assert got.nan_count == n_nan
    nan_rows = np.moveaxis(torch.isnan(z).numpy(), 1, -1).reshape(-1, 4)
    assert not truth.unpack(got.bits, 4)[nan_rows].any()


def test_site_names_are_stable_across_forwards_and_two_forwards_in_one_capture(tmp_path, truth):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), _TwoFunctional(), nn.ReLU())
    model[2].fc1 = nn.Linear(5, 9)
    xs = [torch.randn(2, 3), torch.randn(4, 3)]
    taps = truth.Taps(model[1])
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0, sample_ids=None):
            model(xs[0])
            model(xs[1])  # e.g. two micro-batches: appended to the same time point
    taps.remove()
    run = open_run(tmp_path)
    assert run.sites == ["1", "2:relu#0", "2:relu#1", "3"]
    expected = np.concatenate([truth.channel(taps.inputs[0]), truth.channel(taps.inputs[1])])
    got = _assert_site(run, "1", 0, expected, truth)
    assert (got.sample_ids == -1).all() and (got.labels == -1).all()


# ---------------------------------------------------------------------------- SiteHooks directly
def test_site_hooks_attach_detach_and_filter(no_global_hooks):
    seen = []
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.ReLU6()))
    hooks = SiteHooks(model, lambda name, kind, z: seen.append((name, kind)), sites="2.*")
    assert hooks.module_sites == ["1", "2.0"]
    assert "ReLU" in hooks.describe_search() and "F.relu" in hooks.describe_search()
    hooks.attach()
    hooks.attach()  # idempotent
    try:
        model(torch.randn(1, 2))
    finally:
        hooks.detach()
    model(torch.randn(1, 2))
    assert seen == [("2.0", "ReLU6")]


def test_site_filter_forms():
    assert site_filter(None)("anything")
    assert site_filter("layer1.*")("layer1.0.relu") and not site_filter("layer1.*")("layer2.0.relu")
    assert site_filter(["a", "b*"])("bc") and not site_filter(["a", "b*"])("c")
    assert site_filter(lambda s: s.endswith("#1"))("x#1")
    with pytest.raises(ValueError, match="sites"):
        site_filter([1, 2])


@pytest.mark.parametrize("sites", [3, 2.5, object(), ["relu", 3]])
def test_sites_of_the_wrong_kind_get_a_clear_error(sites):
    with pytest.raises(ValueError, match="Expected `sites` to be None, names, glob patterns or a callable"):
        site_filter(sites)


@pytest.mark.parametrize("how", ["returns", "in_place", "with_kwargs"])
def test_a_site_with_pre_hooks_of_its_own_is_read_after_them(tmp_path, how):
    # A user's pre-hook that changes the activation's input (noise, ablation): the pattern is of what the activation
    # gets, at each of its calls in a forward.
    relu = nn.ReLU(inplace=how == "in_place")
    if how == "returns":
        relu.register_forward_pre_hook(lambda module, args: (args[0] - 0.5,))
    elif how == "in_place":
        def shift(module, args):
            args[0].sub_(0.5)

        relu.register_forward_pre_hook(shift)
    else:
        relu.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] - 0.5,), kwargs), with_kwargs=True)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(6, 8), nn.Linear(8, 8), relu

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    model = TwoCalls()
    x = torch.randn(16, 6)
    with torch.no_grad():
        first = model.a(x) - 0.5
        second = model.b(torch.relu(first)) - 0.5
    with ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
        model(x)
    run = open_run(tmp_path)
    for site, z in (("relu", first), ("relu#1", second)):
        np.testing.assert_array_equal(run.read(site, 0).unpack(), (z > 0).numpy(), err_msg=site)


@pytest.mark.parametrize("act", ["ReLU", "ReLU(inplace)", "LeakyReLU(0, inplace)"])
def test_pre_hooks_given_during_a_capture_are_read_after_or_said(tmp_path, caplog, act):
    # An ablation inside training_step: the hook is registered after the capture started.
    module = {"ReLU": nn.ReLU(), "ReLU(inplace)": nn.ReLU(inplace=True),
              "LeakyReLU(0, inplace)": nn.LeakyReLU(0.0, inplace=True)}[act]
    model = nn.Sequential(nn.Linear(6, 9), module)
    x = torch.randn(16, 6)
    with torch.no_grad():
        z = model[0](x)
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
        handle = module.register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
        model(x)
        handle.remove()
    got = open_run(tmp_path).read("1", 0).unpack()
    told = [r.getMessage() for r in caplog.records if "during a capture" in r.getMessage()]
    if act.startswith("LeakyReLU"):  # overwrites its input with other signs: read before the hook, and said
        np.testing.assert_array_equal(got, (z > 0).numpy())
        assert len(told) == 1 and "'1'" in told[0]
    else:
        np.testing.assert_array_equal(got, (z - 0.5 > 0).numpy())
        assert told == []


def test_a_site_given_pre_hooks_during_a_capture_whose_forward_returns_a_tuple_is_still_recorded(tmp_path):
    class Gate(nn.ReLU):  # a user-named activation class returning its output with a side value
        def forward(self, z):
            return torch.relu(z), z.mean()

    gate = Gate()
    model = nn.Sequential(nn.Linear(6, 9))
    x = torch.randn(16, 6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.gate = model, gate

        def forward(self, x):
            return self.gate(self.body(x))[0]

    net = Net()
    with ActivationRecorder(net, tmp_path, module_types=(Gate,)) as rec, rec.capture(0):
        handle = gate.register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
        net(x)
        handle.remove()
    with torch.no_grad():
        z = model(x) - 0.5
    np.testing.assert_array_equal(open_run(tmp_path).read("gate", 0).unpack(), (z > 0).numpy())

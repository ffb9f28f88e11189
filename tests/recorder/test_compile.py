"""Recording a torch.compile'd model: the same sites and bits as the eager model, one graph per state.

The training test compiles with the ``aot_eager`` backend (dynamo traces the hooks and AOT autograd
functionalizes the in-place ReLU as inductor would, but no C++ is compiled); the others with dynamo's
``eager`` backend, which traces the hooks the same way in a fraction of the time; one test compiles
with inductor and skips where no C++ compiler works.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actpat.recorder import ActivationRecorder, open_run
from actpat.recorder.hooks import uncompiled

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

BACKEND = "eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Block(nn.Module):
    """Module sites (one in-place, one called twice) and functional sites of three spellings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.leaky = nn.LeakyReLU(0.1)

    def forward(self, x):
        h = F.max_pool2d(self.act(self.bn(self.conv(x))), 2)
        h = F.relu(self.fc(h.flatten(1)))
        h = torch.relu(self.leaky(self.fc2(h)) - 0.05).relu()
        return self.act(h - 0.1)


SITES = ["0.act", "0:relu#0", "0.leaky", "0:relu#1", "0:relu#2", "0.act#1"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(_Block(), nn.Linear(16, 4))


def _train(model, step_model, recorder, batches, *, record_every=1, start=0):
    """SGD steps on ``batches``; the forward of every ``record_every``-th step inside a capture."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches, start=start):
        if recorder is not None and step % record_every == 0:
            with recorder.capture(step, labels=y):
                loss = F.cross_entropy(step_model(x), y)
        else:
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _batches(n_steps, sizes=(6,)):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(sizes[i % len(sizes)], 3, 8, 8, generator=g), torch.randint(0, 4, (sizes[i % len(sizes)],), generator=g))
        for i in range(n_steps)
    ]


def _assert_same_runs(eager_dir, compiled_dir, steps):
    eager, compiled = open_run(eager_dir), open_run(compiled_dir)
    assert compiled.sites == eager.sites == SITES
    n_compared = 0
    for site in SITES:
        assert compiled.site_info(site)["module_type"] == eager.site_info(site)["module_type"]
        assert compiled.steps(site).tolist() == eager.steps(site).tolist() == steps
        for step in steps:
            a, b = eager.read(site, step), compiled.read(site, step)
            np.testing.assert_array_equal(b.bits, a.bits)
            np.testing.assert_array_equal(b.labels, a.labels)
            assert b.nan_count == a.nan_count
            n_compared += a.bits.size
    return n_compared


@pytest.mark.slow
def test_compiled_training_records_the_eager_sites_and_bits(tmp_path, truth):
    batches = _batches(3, sizes=(6, 4))  # a smaller batch makes dynamo recompile with a dynamic size
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    taps = truth.Taps(eager[0].leaky)
    with ActivationRecorder(eager, tmp_path / "eager") as rec:
        _train(eager, eager, rec, batches)
    taps.remove()
    with ActivationRecorder(compiled, tmp_path / "compiled") as rec:
        _train(compiled_model, compiled, rec, batches)
    assert _assert_same_runs(tmp_path / "eager", tmp_path / "compiled", list(range(3))) > 1000
    # The eager run itself against the test's own hook: z > 0 of the leaky ReLU's input at each step.
    run = open_run(tmp_path / "compiled")
    for step, z in enumerate(taps.inputs):
        got = run.read("0.leaky", step)
        np.testing.assert_array_equal(truth.unpack(got.bits, 16), truth.channel(z))
    for p_eager, p_compiled in zip(eager.parameters(), compiled_model.parameters()):
        assert torch.equal(p_eager, p_compiled)  # recording changed neither training


@pytest.mark.parametrize("how", ["wrapper", "method"])
def test_graphs_are_reused_between_captures(how, tmp_path):
    """Once traced with and without an active capture, further steps compile nothing new, also with
    two forwards per capture (e.g. gradient accumulation)."""
    from torch._dynamo.utils import counters

    model = _model()
    if how == "wrapper":
        compiled = torch.compile(model, backend=BACKEND)
    else:
        model.compile(backend=BACKEND)
        compiled = model
    batches = _batches(8)
    with ActivationRecorder(compiled, tmp_path) as rec:
        _train(model, compiled, rec, batches[:2], record_every=2)
        graphs = counters["stats"]["unique_graphs"]
        _train(model, compiled, rec, batches[2:6], record_every=2, start=2)
        for step, (x, _) in enumerate(batches[6:], start=6):
            with rec.capture(step):
                compiled(x)
                compiled(x)
        assert counters["stats"]["unique_graphs"] == graphs
    run = open_run(tmp_path)
    assert run.steps("0.act").tolist() == [0, 2, 4, 6, 7]
    assert run.n_observations("0.leaky") == 6 * (3 + 2 * 2)


def test_recorder_created_after_the_first_compiled_call_still_records(tmp_path):
    """Dynamo does not guard on hooks: graphs traced before the recorder existed are traced again."""
    batches = _batches(2)
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=BACKEND)
    other = torch.compile(_model(1), backend=BACKEND)  # another instance of the classes, traced first
    other(batches[0][0])
    compiled(batches[0][0])
    eager(batches[0][0])  # the same forward for both twins (BatchNorm running statistics)
    with ActivationRecorder(eager, tmp_path / "eager") as rec:
        _train(eager, eager, rec, batches)
    with ActivationRecorder(compiled, tmp_path / "compiled") as rec:
        _train(compiled_model, compiled, rec, batches)
    _assert_same_runs(tmp_path / "eager", tmp_path / "compiled", [0, 1])


def test_a_second_recorder_on_the_same_compiled_model_records(tmp_path):
    """Graphs traced with a closed recorder's hooks are traced again for the next recorder (a new fit)."""
    batches = _batches(2)
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=BACKEND)
    with ActivationRecorder(compiled, tmp_path / "first") as rec:
        _train(compiled_model, compiled, rec, batches[:1])
    with ActivationRecorder(eager, tmp_path / "eager") as rec:
        _train(eager, eager, rec, batches[:1])
        _train(eager, eager, rec, batches[1:], start=1)
    with ActivationRecorder(compiled, tmp_path / "compiled") as rec:
        _train(compiled_model, compiled, rec, batches[1:], start=1)
    eager_run, second = open_run(tmp_path / "eager"), open_run(tmp_path / "compiled")
    assert second.sites == SITES
    for site in SITES:
        np.testing.assert_array_equal(second.read(site, 1).bits, eager_run.read(site, 1).bits)


@pytest.mark.parametrize("same_model", [True, False])
def test_recorders_one_after_another_each_record_their_own_sites(tmp_path, same_model):
    """A graph traced for one recorder's `sites` is never reused with another's (torch 2.11 reused it)."""
    def make():
        torch.manual_seed(0)
        return torch.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()), backend=BACKEND)

    compiled, x = make(), torch.randn(6, 4)
    for k, (sites, expected) in enumerate([(None, ["1", "3"]), (["3"], ["3"]), ("1", ["1"]), (None, ["1", "3"])]):
        compiled = compiled if same_model else make()
        with ActivationRecorder(compiled, tmp_path / str(k), sites=sites) as rec:
            with rec.capture(0):
                compiled(x)
        assert open_run(tmp_path / str(k)).sites == expected, sites


@pytest.mark.parametrize("how", ["method", "submodule"])
def test_in_place_compile_and_compiled_submodules_keep_eager_names(how, tmp_path):
    batches = _batches(2)
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    if how == "method":
        compiled_model.compile(backend=BACKEND)
    else:
        compiled_model[0] = torch.compile(compiled_model[0], backend=BACKEND)
    with ActivationRecorder(eager, tmp_path / "eager") as rec:
        _train(eager, eager, rec, batches)
    with ActivationRecorder(compiled_model, tmp_path / "compiled") as rec:
        _train(compiled_model, compiled_model, rec, batches)
    _assert_same_runs(tmp_path / "eager", tmp_path / "compiled", [0, 1])


def test_two_forwards_in_one_capture_and_max_observations(tmp_path, truth):
    model = _model()
    compiled = torch.compile(model, backend=BACKEND)
    xs = [x for x, _ in _batches(2)]
    taps = truth.Taps(model[0].act)  # called twice per forward: inputs 0 and 2 are those of site 0.act
    with torch.no_grad(), ActivationRecorder(compiled, tmp_path, max_observations=7) as rec:
        with rec.capture(0, sample_ids=torch.arange(6)):
            compiled(xs[0])
            compiled(xs[1])
    taps.remove()
    got = open_run(tmp_path).read("0.act", 0)
    assert got.bits.shape == (14, 1)  # each forward's 6 x 64 observations subsampled to 7
    for forward in range(2):
        rows = slice(7 * forward, 7 * forward + 7)
        expected = truth.channel(taps.inputs[2 * forward])[got.sample_ids[rows] * 64 + got.positions[rows]]
        np.testing.assert_array_equal(truth.unpack(got.bits[rows], 8), expected)


def test_close_removes_every_hook_and_copies_of_the_model_carry_no_recorder(tmp_path):
    model = _model()
    compiled = torch.compile(model, backend=BACKEND)
    x = _batches(1)[0][0]
    rec = ActivationRecorder(compiled, tmp_path)
    assert all(m._forward_pre_hooks and m._forward_hooks for m in model.modules())
    twin = copy.deepcopy(model)  # e.g. the callback's probe copy: must not copy the recorder's writer
    pickle.loads(pickle.dumps(model))
    with rec:
        with rec.capture(0):
            compiled(x)
            twin(x)  # the copy's hooks are inert: it adds no record
    assert open_run(tmp_path).n_observations("0.leaky") == len(x)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    compiled(x)  # still runs after the recorder is gone


def test_compiled_model_refuses_stored_values(tmp_path):
    compiled = torch.compile(_model(), backend=BACKEND)
    with pytest.raises(ValueError, match="store_values"):
        ActivationRecorder(compiled, tmp_path, store_values="all")


@pytest.mark.parametrize("version", ["2.5.1+cu124", "2.4.1"])
def test_a_compiled_model_on_a_torch_too_old_to_trace_it_is_refused_at_construction(tmp_path, monkeypatch, version):
    model = _model()
    compiled = torch.compile(model, backend=BACKEND)
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ValueError, match=rf"torch 2.6 or later.*this is torch {re.escape(version)}.*_orig_mod"):
        ActivationRecorder(compiled, tmp_path)
    ActivationRecorder(model, tmp_path).close()  # the eager module records on any supported torch
    assert not list(tmp_path.glob("*.h5"))


def test_model_compiled_after_the_recorder_was_created_is_a_clear_error(tmp_path):
    x = torch.randn(2, 3)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with ActivationRecorder(model, tmp_path / "a") as rec:
        model.compile(backend=BACKEND)
        with pytest.raises(ValueError, match="compiled with torch.compile afterwards"):
            with rec.capture(0):
                model(x)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with ActivationRecorder(model, tmp_path / "b") as rec:
        compiled = torch.compile(model, backend=BACKEND)
        with pytest.raises(ValueError, match="compiled after the recorder was created"):
            with rec.capture(0):
                compiled(x)


    # Only a submodule compiled: the error names it (it named the model).
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU()))
    with ActivationRecorder(model, tmp_path / "c") as rec:
        model[1] = torch.compile(model[1], backend=BACKEND)
        with pytest.raises(ValueError, match="wrapper of its submodule '1' ran inside"):
            with rec.capture(0):
                model(x)


@pytest.mark.parametrize("how", ["wrapper", "in place", "forward", "submodule", "default"])
def test_fullgraph_is_refused_at_construction_and_the_rest_records(tmp_path, how):
    """fullgraph=True failed at the first forward inside a capture, with dynamo's error about the recorder's own
    graph break at the end of the forward."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU()))
    fullgraph = how != "default"
    if how in ("wrapper", "default"):
        model = torch.compile(model, backend=BACKEND, fullgraph=fullgraph)
    elif how == "in place":
        model.compile(backend=BACKEND, fullgraph=True)
    elif how == "forward":
        model.forward = torch.compile(model.forward, backend=BACKEND, fullgraph=True)
    else:
        model[1] = torch.compile(model[1], backend=BACKEND, fullgraph=True)
    if fullgraph:
        with pytest.raises(ValueError, match=r"compiled with fullgraph=True.*Compile without fullgraph=True"):
            ActivationRecorder(model, tmp_path)
        assert not list(tmp_path.glob("*.h5"))
        return
    x = torch.randn(2, 3)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(x)
    z = uncompiled(model)[0](x)
    np.testing.assert_array_equal(open_run(tmp_path).read("1.0", 0).unpack(), (z > 0).numpy())


@pytest.mark.slow
def test_inductor_graph_records_eager_bits(tmp_path, truth, device):
    """Inductor fuses the packing into its kernels (C++ on the CPU, Triton on a GPU); integer-valued weights
    make every z exact."""
    model, x = truth.exact_conv_net(16, 4, 16)
    model, x = model.to(device), x.to(device)
    compiled = torch.compile(model)
    taps = truth.Taps(model[1], model[3])
    if device == "cpu" and not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler on the CPU; none is installed")
    try:
        with torch.no_grad(), ActivationRecorder(compiled, tmp_path) as rec:
            with rec.capture(0):
                compiled(x)
    except Exception as exc:
        if "CppCompileError" in repr(exc) or "InvalidCxxCompiler" in repr(exc):  # a toolchain that cannot build
            pytest.skip(f"inductor cannot build C++ kernels on this machine: {exc!r}"[:300])
        raise
    finally:
        taps.remove()
    run = open_run(tmp_path)
    assert run.sites == ["1", "3"]
    for site, z in zip(run.sites, taps.inputs):
        got = run.read(site, 0)
        np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), truth.channel(z))
        assert got.nan_count == int(torch.isnan(z).sum()) > 0


class _InPlaceByName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.leaky_relu_(self.fc(x), 0.2)


class _InPlaceMethod(_InPlaceByName):
    def forward(self, x):
        return self.fc(x).relu_()


def test_in_place_functions_a_compiled_model_hides_are_named_when_the_recorder_is_made(tmp_path, caplog):
    # Dynamo does not hand F.relu_, torch.relu_ and F.leaky_relu_ to the recorder: their sites would be missing
    # from a compiled model's records, silently. The method x.relu_() is handed over and recorded: no warning.
    with caplog.at_level("WARNING", logger="actpat"):
        ActivationRecorder(torch.compile(_InPlaceByName()), tmp_path / "a").close()
        ActivationRecorder(torch.compile(_InPlaceMethod()), tmp_path / "b").close()
        ActivationRecorder(_InPlaceByName(), tmp_path / "c").close()  # eager: recorded, nothing to say
    warned = [r.getMessage() for r in caplog.records if "hides from the recorder" in r.getMessage()]
    assert len(warned) == 1 and "_InPlaceByName.forward calls leaky_relu_" in warned[0], warned


def test_a_pre_hook_registered_after_the_recorder_is_read_after_on_a_compiled_model(tmp_path):
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    compiled = torch.compile(model, backend=BACKEND)
    x = torch.randn(16, 6)
    with ActivationRecorder(compiled, tmp_path) as rec:
        with rec.capture(0):
            compiled(x)
        model[1].register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))  # what the ReLU gets from now on
        with rec.capture(1):
            compiled(x)
    with torch.no_grad():
        z = model[0](x)
    run = open_run(tmp_path)
    np.testing.assert_array_equal(run.read("1", 0).unpack(), (z > 0).numpy())
    np.testing.assert_array_equal(run.read("1", 1).unpack(), (z - 0.5 > 0).numpy())

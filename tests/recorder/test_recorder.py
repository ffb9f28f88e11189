"""ActivationRecorder: site selection, errors, capture scope, subsampling and failure safety."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_mod

from actpat.recorder import ActivationRecorder, RecorderError, open_run


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return F.relu(self.relu(self.conv(x)) + x)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module("act", nn.ReLU())
    net.add_module("layer1", nn.Sequential(_Block(4), _Block(4)))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 3))
    return net


ALL_SITES = ["act", "layer1.0.relu", "layer1.0:relu#0", "layer1.1.relu", "layer1.1:relu#0"]


def _sites_recorded(tmp_path, sites):
    model = _net()
    with ActivationRecorder(model, tmp_path, sites=sites) as rec:
        with rec.capture(0):
            model(torch.randn(2, 1, 4, 4))
    return open_run(tmp_path).sites


@pytest.mark.parametrize(
    "sites, expected",
    [
        (None, ALL_SITES),
        ("act", ["act"]),
        (["act", "layer1.1.relu"], ["act", "layer1.1.relu"]),
        ("layer1.*", ALL_SITES[1:]),
        ("*:relu#*", ["layer1.0:relu#0", "layer1.1:relu#0"]),
        (lambda name: name.startswith("layer1.0"), ["layer1.0.relu", "layer1.0:relu#0"]),
    ],
    ids=["all", "name", "names", "glob", "functional-glob", "predicate"],
)
def test_sites_names_globs_and_predicate(sites, expected, tmp_path):
    assert _sites_recorded(tmp_path, sites) == expected


def test_model_without_site_raises_after_first_forward(tmp_path, no_global_hooks):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            pass  # no forward yet: nothing to complain about
        with pytest.raises(ValueError) as excinfo:
            with rec.capture(1):
                model(torch.randn(2, 3))
    message = str(excinfo.value)
    for searched in ("Sequential", "ReLU", "LeakyReLU", "PReLU", "F.relu", "module_types=", "sites="):
        assert searched in message


def test_filter_that_selects_nothing_raises(tmp_path):
    model = _net()
    with ActivationRecorder(model, tmp_path, sites="no.such.site") as rec:
        with pytest.raises(ValueError, match="activation site"):
            with rec.capture(0):
                model(torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pattern": "pixel"}, "pattern"),
        ({"max_observations": 0}, "max_observations"),
        ({"compression": "snappy"}, "compression"),
        ({"on_backpressure": "wait"}, "on_backpressure"),
        ({"max_queue_bytes": 0}, "max_queue_bytes"),
        ({"max_shard_bytes": 0}, "max_shard_bytes"),
    ],
)
def test_argument_validation(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ActivationRecorder(_net(), tmp_path, **kwargs)
    with pytest.raises(ValueError, match="Module"):
        ActivationRecorder(lambda x: x, tmp_path)


def test_nothing_recorded_and_no_hook_outside_capture(tmp_path, truth, no_global_hooks):
    model = _net()
    n_pre, n_post = len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)
    with ActivationRecorder(model, tmp_path) as rec:
        model(torch.randn(2, 1, 4, 4))  # before any capture
        with rec.capture(5):
            assert len(module_mod._global_forward_pre_hooks) == n_pre + 1
            model(torch.randn(2, 1, 4, 4))
        assert len(module_mod._global_forward_pre_hooks) == n_pre
        assert len(module_mod._global_forward_hooks) == n_post
        assert torch._C._len_torch_function_stack() == 0
        model(torch.randn(3, 1, 4, 4))  # between captures
    run = open_run(tmp_path)
    assert all(run.steps(site).tolist() == [5] for site in run.sites)
    assert run.n_observations("act") == 2 * 16


def test_functional_interceptor_only_inside_forwards_of_the_model(tmp_path, no_global_hooks):
    # Torch calls outside the model's forwards (loss, backward, optimizer, logging) must not pay for the
    # interception of functional calls, nor see it.
    class Probe(nn.Module):
        def forward(self, x):
            depths.append(torch._C._len_torch_function_stack())
            return F.relu(x)

    depths = []
    model = nn.Sequential(nn.Linear(4, 4), Probe())
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            assert torch._C._len_torch_function_stack() == 0
            model(torch.randn(2, 4)).sum().backward()
            assert torch._C._len_torch_function_stack() == 0
            Probe()(torch.randn(2, 4))  # not part of the model: no interception
            with pytest.raises(RuntimeError):
                model(torch.randn(2, 5))  # an error inside the forward leaves no interceptor behind
            assert torch._C._len_torch_function_stack() == 0
        assert torch._C._len_torch_function_stack() == 0
        assert rec.sites == ["1:relu#0"]
    assert depths == [1, 0]
    assert open_run(tmp_path).n_observations("1:relu#0") == 2


def test_interceptor_pauses_inside_torch_layers_only_where_no_functional_site_can_hide(tmp_path, no_global_hooks, monkeypatch):
    """Inside torch's own leaf layers (and the activation modules) no torch call passes the interceptor;
    a subclass with its own forward, a layer with hooks of its own and a module called inside a paused
    layer still have their functional calls recorded."""
    from actpat.recorder import hooks as hooks_mod

    seen = []
    intercept = hooks_mod._FunctionalMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return intercept(self, func, types, args, kwargs)

    monkeypatch.setattr(hooks_mod._FunctionalMode, "__torch_function__", counting)

    class ReluConv(nn.Conv2d):  # not the exact type: its forward may do anything
        def forward(self, x):
            return F.relu(super().forward(x))

    class Shared(nn.Module):
        def forward(self, x):
            return F.relu(x)

    class Act(nn.Module):  # an activation class of the user's (a quiet leaf) that calls a module of the model
        def __init__(self, shared):
            super().__init__()
            object.__setattr__(self, "shared", shared)  # not a child: Act stays a leaf

        def forward(self, x):
            return self.shared(x)

    shared = Shared()
    patched = nn.Linear(8, 2)
    plain_forward = patched.forward
    patched.forward = lambda x: F.relu(plain_forward(x))  # a forward set on the instance of a torch layer
    def relu_before(module, args):
        F.relu(args[0])

    hooked = nn.Conv2d(2, 2, 1)  # functional calls in a layer's own hooks
    hooked.register_forward_pre_hook(relu_before)
    hooked.register_forward_hook(lambda module, args, out: F.relu(out))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), ReluConv(2, 2, 1), hooked,
                          Act(shared), nn.Flatten(), patched, nn.Linear(2, 2), nn.Dropout(0.0), shared)
    with ActivationRecorder(model, tmp_path, module_types=[Act]) as rec:
        with rec.capture(0):
            seen.clear()
            model(torch.randn(3, 1, 4, 4))
            quiet = list(seen)
        sites = rec.sites
    # The forward hook's call comes after the layer has left the module stack: named after the enclosing module.
    assert sites == ["2", "3:relu#0", "4:relu#0", "relu#0", "5", "10:relu#0", "7:relu#0", "10:relu#1"]
    # Intercepted: the calls of ReluConv, of the hooked layer, of the module called inside Act and of the
    # patched Linear; none of the plain layers' (conv2d, batch_norm, flatten, linear, dropout).
    assert quiet == ["conv2d", "relu", "relu", "conv2d", "relu", "relu", "linear", "relu", "relu"]
    run = open_run(tmp_path)
    rows = {site: run.read(site, 0).bits.shape[0] for site in sites}
    assert rows == {"2": 12, "3:relu#0": 12, "4:relu#0": 12, "relu#0": 12, "5": 12, "10:relu#0": 12, "7:relu#0": 3,
                    "10:relu#1": 3}  # 3 samples x positions


def test_interceptor_keeps_modes_of_the_forward_threads_and_recomputation_as_they_were(tmp_path, no_global_hooks):
    """What the interceptor's entering and leaving must not disturb (each found broken in a review).

    A mode the forward itself enters around a child call (``torch.device``) stays in force and the output
    is that of an unrecorded forward; forwards of other threads during a capture do not fail, and only
    their module sites are recorded (as before the interceptor became per forward); a checkpointed block recomputed inside ``backward()`` is not recorded a second time
    (neither its functional nor its module sites).
    """
    import threading

    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            with torch.device("cpu"):
                return F.relu(self.lin(x)) + self.act(x) + torch.zeros(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Block(), Block()

        def forward(self, x):
            return F.relu(checkpoint(self.b, self.a(x), use_reentrant=False))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 4, requires_grad=True)
    expected = model(x)
    errors = []

    def other_thread():
        try:
            for _ in range(50):
                model(torch.randn(2, 4))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            out = model(x)
            out.sum().backward()
        assert torch._C._len_torch_function_stack() == 0
    assert errors == []
    assert torch.equal(out, expected)
    run = open_run(tmp_path)
    assert sorted(run.sites) == ["a.act", "a:relu#0", "b.act", "b:relu#0", "relu#0"]
    for site in ("a:relu#0", "b:relu#0", "relu#0"):  # functional: the capturing thread's forward of 3 samples only
        assert run.n_observations(site) == 3, site
    for site in ("a.act", "b.act"):  # module sites: every thread's forwards, but not b's recomputation in backward
        assert run.n_observations(site) == 3 + 50 * 2, site
    np.testing.assert_array_equal(run.read("relu#0", 0).unpack(), (out.detach() > 0).numpy())  # relu(z) > 0 iff z > 0


def test_an_activation_module_as_the_whole_model_is_a_site_named_by_its_type(tmp_path, no_global_hooks):
    model = nn.LeakyReLU()
    z = torch.randn(4, 3)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(z)
            model(z)
        assert rec._hooks.module_sites == ["LeakyReLU"]
    run = open_run(tmp_path)
    assert run.sites == ["LeakyReLU"]  # one call per forward: the two forwards' records of step 0
    np.testing.assert_array_equal(run.read("LeakyReLU", 0).unpack(), np.concatenate([(z > 0).numpy()] * 2))


def test_a_site_call_on_another_thread_in_flight_when_the_capture_ends_is_in_its_records(tmp_path, no_global_hooks):
    import threading

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    entered, release = threading.Event(), threading.Event()
    with ActivationRecorder(model, tmp_path) as rec:
        record = rec._record

        def slow_elsewhere(*args):  # the other thread's site call holds on until the capture is ending
            if threading.current_thread() is not threading.main_thread():
                entered.set()
                release.wait(10)
            return record(*args)

        rec._record = slow_elsewhere
        other = threading.Thread(target=lambda: model(torch.randn(5, 3)))
        with rec.capture(0):
            model(torch.randn(3, 3))
            other.start()
            assert entered.wait(10)
            threading.Timer(0.2, release.set).start()  # while the capture's end waits for that call
        other.join()
    assert open_run(tmp_path).n_observations("1") == 3 + 5


def test_a_global_forward_hook_of_the_user_keeps_its_functional_calls_recorded(tmp_path, no_global_hooks):
    """Global hooks of others run inside every layer's call: the interceptor does not pause for them."""
    handle = module_mod.register_module_forward_hook(
        lambda module, args, out: F.relu(out) if isinstance(module, nn.Linear) else None
    )
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        with ActivationRecorder(model, tmp_path) as rec:
            with rec.capture(0):
                model(torch.randn(5, 3))
    finally:
        handle.remove()
    assert sorted(open_run(tmp_path).sites) == ["0:relu#0", "1"]
    assert open_run(tmp_path).n_observations("0:relu#0") == 5


def test_forwards_on_another_thread_during_captures_leave_the_capturing_threads_records_exact(
    tmp_path, no_global_hooks, truth
):
    """Another thread's forwards of the same model, running while the capturing thread's forwards run,
    neither rename nor drop the capturing thread's functional sites (each thread keeps its own module
    stack); their module sites are recorded besides, named as in a forward of their own."""
    import copy
    import threading

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.act(F.relu(self.conv(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    twin = copy.deepcopy(model)  # the truth: the conv outputs of the capturing thread's inputs
    taps = [truth.Taps(twin[i].act) for i in (0, 1)]  # act's input is relu(conv(x)): same sign pattern
    xs = [torch.randn(3, 2, 5, 5) for _ in range(6)]
    stop, errors, others = threading.Event(), [], [0]

    def other_thread():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    model(torch.randn(1, 2, 5, 5))
                others[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    with ActivationRecorder(model, tmp_path) as rec:
        thread.start()
        try:
            for step, x in enumerate(xs):
                with rec.capture(step):
                    for _ in range(20):  # many forwards, so that the threads interleave
                        model(x)
                twin(x)
        finally:
            stop.set()
            thread.join()
    for tap in taps:
        tap.remove()
    assert errors == [] and others[0] > 0
    run = open_run(tmp_path)
    assert {s for s in run.sites if ":" in s} == {"0:relu#0", "1:relu#0"}  # no name made of another thread's stack
    assert {s.split("#")[0] for s in run.sites if ":" not in s} == {"0.act", "1.act"}
    for step in range(len(xs)):
        for i, site in enumerate(("0:relu#0", "1:relu#0")):
            bits = run.read(site, step).bits
            assert bits.shape[0] == 20 * 3 * 25, (site, step)  # the capturing thread's 20 forwards, all of them
            expected = truth.channel(taps[i].inputs[step])
            for k in range(20):
                np.testing.assert_array_equal(truth.unpack(bits[k * 75 : (k + 1) * 75], 2), expected)


def test_a_mode_left_open_by_a_forward_neither_doubles_later_records_nor_stays(tmp_path, no_global_hooks):
    # The forward enters a mode and leaves it open: the interceptor below it cannot be popped at the end of
    # the forward or of the capture. It must not record the next capture's calls a second time, and it goes
    # once it is on top again.
    opened = []

    class Leaky(nn.Module):
        def forward(self, x):
            if not opened:
                opened.append(torch.device("cpu"))
                opened[0].__enter__()
            return F.relu(x)

    model = Leaky()
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(torch.randn(3, 4))
        opened[0].__exit__(None, None, None)
        with rec.capture(1):
            model(torch.randn(3, 4))
        assert torch._C._len_torch_function_stack() == 0
    run = open_run(tmp_path)
    assert run.sites == ["relu#0"]
    assert [run.read("relu#0", step).bits.shape[0] for step in (0, 1)] == [3, 3]


def test_nested_capture_and_long_split_are_rejected(tmp_path, no_global_hooks):
    model = _net()
    with ActivationRecorder(model, tmp_path) as rec:
        with pytest.raises(ValueError, match="split"):
            with rec.capture(0, split="x" * 33):
                pass
        with rec.capture(0):
            with pytest.raises(RuntimeError, match="twice"):
                with rec.capture(1):
                    pass
            model(torch.randn(1, 1, 4, 4))
        assert rec.sites == ALL_SITES


def test_splits_epochs_and_mismatched_labels(tmp_path, caplog):
    model = _net()
    with ActivationRecorder(model, tmp_path, sites="act") as rec:
        with rec.capture(3, split="probe", epoch=1, labels=np.array([1, 2])):
            model(torch.randn(2, 1, 4, 4))
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                with rec.capture(4, labels=[1, 2, 3]):  # wrong length: stored as unknown, warned once
                    model(torch.randn(2, 1, 4, 4))
    assert sum("batch size" in r.getMessage() for r in caplog.records) == 1
    run = open_run(tmp_path)
    assert run.splits == ["probe", "train"]
    probe = run.read("act", 3, split="probe")
    assert probe.epoch == 1 and probe.split == "probe" and sorted(set(probe.labels)) == [1, 2]
    assert (run.read("act", 4, split="train").labels == -1).all()
    with pytest.raises(KeyError, match="recorded steps"):
        run.read("act", 4, split="probe")


def test_per_token_labels_are_refused_before_the_forward_and_a_wrong_length_drops_only_itself(tmp_path, caplog):
    model = _net()
    with ActivationRecorder(model, tmp_path, sites="act") as rec:
        with pytest.raises(ValueError, match=r"`labels` of shape \(N,\), one per sample, but got shape \(2, 7\)"):
            with rec.capture(0, labels=torch.zeros(2, 7, dtype=torch.long), sample_ids=torch.arange(2)):
                raise AssertionError("the forward must not run")
        with rec.capture(1, labels=torch.tensor([[1], [0]]), sample_ids=[5, 6]):  # (N, 1) is one per sample
            model(torch.randn(2, 1, 4, 4))
        with caplog.at_level(logging.WARNING):
            with rec.capture(2, labels=[1, 0, 1], sample_ids=[7, 8]):
                model(torch.randn(2, 1, 4, 4))
    assert [r.getMessage() for r in caplog.records if "batch size" in r.getMessage()] == [
        "actpat: site 'act' has batch size 2 but got labels 3; those are not stored for this site."]
    run = open_run(tmp_path)
    assert run.read("act", 1).labels[:: 16].tolist() == [1, 0]  # 16 positions per sample
    two = run.read("act", 2)
    assert (two.labels == -1).all() and two.sample_ids[:: 16].tolist() == [7, 8]  # the ids are kept


@pytest.mark.parametrize("name, values, match", [
    ("labels", [0.2, 0.9, 1.5, -1.7], r"`labels` to be integers, but got dtype float64.*0\.7 to 0"),
    ("labels", torch.tensor([0.0, 1.0, 2.0, 1.0]), r"`labels` to be integers, but got dtype torch.float32"),
    ("labels", torch.tensor([True, False, True, True]), r"`labels` to be integers, but got dtype torch.bool"),
    ("labels", np.array(["a", "b", "c", "d"]), r"`labels` to be integers, but got dtype <U1"),
    ("labels", [0, 1, -2, 3], r"`labels` of at least -1 \(-1: no label\), but got -2"),
    ("sample_ids", np.array([0.5, 1.5, 2.5, 3.5]), r"`sample_ids` to be integers, but got dtype float64"),
    ("labels", np.array([0, 1, 2**64 - 1, 2**63], dtype=np.uint64), r"uint64 values up to 18446744073709551615: they "
                                                                     r"would wrap.*2\*\*64 - 1 to -1"),
    ("sample_ids", np.array([0, 1, 2**63, 3], dtype=np.uint64), r"`sample_ids` that int64 holds"),
    ("labels", torch.tensor([0, 1, 2, 3], dtype=torch.uint64), r"`labels` of a signed integer dtype \(or uint8\), "
                                                               r"but got torch.uint64.*`labels.long\(\)`"),
    ("sample_ids", torch.tensor([0, 1, 2, 3], dtype=torch.uint32), r"`sample_ids` of a signed.*torch.uint32"),
])
def test_labels_and_sample_ids_that_are_no_integers_are_refused_before_the_forward(tmp_path, name, values, match):
    """They were cut to integers, silently: -1.7 became -1 (no label), 0.2 and 0.9 class 0."""
    model = _net()
    with ActivationRecorder(model, tmp_path, sites="act") as rec:
        with rec.capture(0, labels=np.array([0, 1, -1, 2])):
            model(torch.randn(4, 1, 4, 4))
        forwards = []
        with pytest.raises(ValueError, match=match):
            with rec.capture(1, **{name: values}):
                forwards.append(model(torch.randn(4, 1, 4, 4)))
        assert forwards == []
    run = open_run(tmp_path)  # what was recorded before stays
    assert run.steps("act").tolist() == [0] and run.read("act", 0).labels.tolist().count(-1) >= 1


def test_site_changing_width_is_skipped_with_one_warning(tmp_path, caplog):
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with caplog.at_level(logging.WARNING):
        with ActivationRecorder(model, tmp_path) as rec:
            for step, width in enumerate([4, 6, 6, 4]):
                with rec.capture(step):
                    model(torch.randn(2, width))
    assert sum("changed width" in r.getMessage() for r in caplog.records) == 1
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [0, 3]
    # On disk too, for whoever reads the run later: why steps 1 and 2 of the site are missing.
    assert [stop.reason for stop in run.stop_reasons] == [
        "site '1' changed width from 4 to 6 units at step 1 ('train'): its calls of another width are not recorded"]



def test_a_width_change_in_each_split_of_a_shared_writer_is_stored_for_each(tmp_path):
    # The callback's probe and batch recorders share one writer: one warning per split and site, not per run.
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    train = ActivationRecorder(model, tmp_path)
    train.open()
    probe = ActivationRecorder(model, tmp_path, writer=train.writer)
    for step in range(2):
        for rec, split in ((probe, "probe"), (train, "train")):
            with rec.capture(step, split=split):
                model(torch.randn(2, 4 + 2 * step))
    train.close()
    assert sorted(stop.reason for stop in open_run(tmp_path).stop_reasons) == [
        f"site '1' changed width from 4 to 6 units at step 1 ({split!r}): its calls of another width are not recorded"
        for split in ("probe", "train")]


# ---------------------------------------------------------------------------- subsampling
def _subsampled(tmp_path, name, steps, seed=0, max_observations=10):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU())
    taps_inputs = []
    handle = model[1].register_forward_pre_hook(lambda m, a: taps_inputs.append(a[0].detach().clone()))
    x = torch.randn(3, 2, 6, 6)  # 3 samples x 16 positions = 48 observations
    out = tmp_path / name
    with ActivationRecorder(model, out, max_observations=max_observations, seed=seed) as rec:
        for step in steps:
            with rec.capture(step, sample_ids=torch.tensor([10, 11, 12]), labels=torch.tensor([0, 1, 2])):
                model(x)
    handle.remove()
    return open_run(out), taps_inputs


def test_max_observations_is_reproducible_and_consistent_with_truth(tmp_path, truth):
    run_a, inputs = _subsampled(tmp_path, "a", [0, 1])
    run_b, _ = _subsampled(tmp_path, "b", [0, 1])
    run_c, _ = _subsampled(tmp_path, "c", [0], seed=1)

    a0, a1, b0, c0 = run_a.read("1", 0), run_a.read("1", 1), run_b.read("1", 0), run_c.read("1", 0)
    assert len(a0) == len(a1) == 10
    rows = lambda p: (p.sample_ids - 10) * 16 + p.positions  # noqa: E731 - index into the full grid
    np.testing.assert_array_equal(rows(a0), rows(b0))  # same seed and step: same rows
    np.testing.assert_array_equal(a0.bits, b0.bits)
    assert not np.array_equal(rows(a0), rows(a1))  # another step: other rows
    assert not np.array_equal(rows(a0), rows(c0))  # another seed: other rows
    for got, z in ((a0, inputs[0]), (a1, inputs[1])):
        r = rows(got)
        assert len(np.unique(r)) == 10 and np.all(np.diff(r) > 0)  # without replacement, in grid order
        full = truth.channel(z)
        np.testing.assert_array_equal(truth.unpack(got.bits, 6), full[r])
        np.testing.assert_array_equal(got.labels, got.sample_ids - 10)


def test_subsampling_never_touches_torch_rng(tmp_path):
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU())
    x = torch.randn(64, 4)
    with ActivationRecorder(model, tmp_path, max_observations=5, pattern="channel") as rec:
        state = torch.get_rng_state()
        with rec.capture(0):
            model(x)
        assert torch.equal(torch.get_rng_state(), state)
    assert len(open_run(tmp_path).read("1", 0)) == 5


def test_max_observations_above_count_keeps_all_rows(tmp_path, truth):
    model = nn.Sequential(nn.Linear(4, 9), nn.ReLU())
    taps = truth.Taps(model[1])
    with ActivationRecorder(model, tmp_path, max_observations=100) as rec:
        with rec.capture(0):
            model(torch.randn(7, 4))
    taps.remove()
    got = open_run(tmp_path).read("1", 0)
    np.testing.assert_array_equal(truth.unpack(got.bits, 9), truth.channel(taps.inputs[0]))


# ---------------------------------------------------------------------------- failure safety
def _no_partial(path):
    return not list(path.glob("*.partial"))


def test_exception_inside_capture_leaves_finalized_readable_shards(tmp_path, truth, no_global_hooks):
    model = nn.Sequential(nn.Linear(3, 10), nn.ReLU())
    taps = truth.Taps(model[1])
    with pytest.raises(KeyError, match="boom"):
        with ActivationRecorder(model, tmp_path) as rec:
            for step in range(3):
                with rec.capture(step):
                    model(torch.randn(4, 3))
            with rec.capture(3):
                model(torch.randn(4, 3))
                raise KeyError("boom")
    taps.remove()
    assert _no_partial(tmp_path) and list(tmp_path.glob("*.h5"))
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [0, 1, 2, 3]  # the forward before the error was recorded
    for step, z in enumerate(taps.inputs):
        np.testing.assert_array_equal(truth.unpack(run.read("1", step).bits, 10), truth.channel(z))


def test_a_failing_check_writes_none_of_its_capture(tmp_path, truth):
    """``check=`` runs before the capture's records are queued: raising there writes none of them."""
    model = nn.Sequential(nn.Linear(3, 10), nn.ReLU())
    taps = truth.Taps(model[1])
    calls = []

    def refuse():
        calls.append("refused")
        raise ValueError("not these sites")

    with ActivationRecorder(model, tmp_path) as rec:
        with pytest.raises(ValueError, match="not these sites"):
            with rec.capture(0, check=refuse):
                model(torch.randn(4, 3))
        with rec.capture(0, check=lambda: calls.append("passed")):  # the same step again: nothing was written
            model(torch.randn(4, 3))
        with rec.capture(0, check=lambda: calls.append("checked only"), record=False):  # step 0 is recorded
            model(torch.randn(4, 3))
    taps.remove()
    assert calls == ["refused", "passed", "checked only"]
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [0]
    np.testing.assert_array_equal(truth.unpack(run.read("1", 0).bits, 10), truth.channel(taps.inputs[1]))


def test_exception_in_training_after_captures(tmp_path, truth):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    taps = truth.Taps(model[1])
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    with pytest.raises(FloatingPointError):
        with ActivationRecorder(model, tmp_path, max_shard_bytes=64) as rec:
            for step in range(10):
                with rec.capture(step, labels=y):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 6:
                    raise FloatingPointError("loss diverged")
    taps.remove()
    assert _no_partial(tmp_path) and len(list(tmp_path.glob("*.h5"))) >= 7  # 64-byte shards roll over
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == list(range(7))
    for step, z in enumerate(taps.inputs):
        got = run.read("1", step)
        np.testing.assert_array_equal(truth.unpack(got.bits, 16), truth.channel(z))
        np.testing.assert_array_equal(got.labels, y.numpy())


def test_writer_failure_surfaces_as_recorder_error(tmp_path, monkeypatch, truth):
    from actpat.recorder.shards import ShardWriter

    original = ShardWriter._buffer
    calls = []

    def failing_write(self, record):
        calls.append(record.step)
        if record.step == 2:
            raise OSError("disk full")
        original(self, record)

    monkeypatch.setattr(ShardWriter, "_buffer", failing_write)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    rec = ActivationRecorder(model, tmp_path)
    with pytest.raises(RecorderError, match="disk full"):
        with rec:
            for step in range(50):
                with rec.capture(step):
                    model(torch.randn(2, 3))
    assert _no_partial(tmp_path)
    run = open_run(tmp_path)
    assert run.steps("1").tolist() == [0, 1]


def test_recorder_can_be_reopened_and_resumes_numbering(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    rec = ActivationRecorder(model, tmp_path)
    for step in range(2):
        with rec.capture(step):  # capture() opens the writer itself
            model(torch.randn(2, 3))
        rec.close()
    names = sorted(p.name for p in tmp_path.glob("*.h5"))
    assert names == ["patterns-rank000-00000.h5", "patterns-rank000-00001.h5"]
    assert open_run(tmp_path).steps("1").tolist() == [0, 1]


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_observations", [300, None])
@pytest.mark.parametrize("side_copy", [False, True])
def test_cuda_pinned_non_blocking_path_gives_cpu_bits(tmp_path, truth, max_observations, side_copy, monkeypatch):
    """Small integers make every pre-activation exact on both devices (TF32 included): bits must match.
    Subsampled (the bits a new tensor on the device) and whole (the bits and NaN count in the one buffer of
    the Triton packing, copied to the host as it is); copied on the stream that computed them, or on the side
    stream that large copies take."""
    from actpat.recorder import recorder

    monkeypatch.setattr(recorder, "_SIDE_COPY_BYTES", 0 if side_copy else recorder._SIDE_COPY_BYTES)
    model, x = truth.exact_conv_net(12, 8, 9)
    labels = torch.arange(8)
    taps = truth.Taps(model[1], model[3])
    runs = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        with ActivationRecorder(m, tmp_path / device, max_observations=max_observations) as rec:
            for step in range(3):
                with rec.capture(step, labels=labels.to(device), sample_ids=labels.to(device) + 50):
                    m(x.to(device))
        runs[device] = open_run(tmp_path / device)
    taps.remove()
    cpu, cuda = runs["cpu"], runs["cuda"]
    assert cpu.sites == cuda.sites == ["1", "3"]
    for i, site in enumerate(cpu.sites):
        for step in range(3):
            a, b = cpu.read(site, step), cuda.read(site, step)
            np.testing.assert_array_equal(a.bits, b.bits)
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
            assert a.nan_count == b.nan_count > 0
            full = truth.channel(taps.inputs[2 * step + i])  # the CPU forwards come first
            np.testing.assert_array_equal(truth.unpack(b.bits, b.n_units), full[(b.sample_ids - 50) * 81 + b.positions])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_observations", [300, None])
@pytest.mark.parametrize("side_copy", [False, True])
def test_cuda_forward_on_a_side_stream_is_copied_after_it_labels_too(tmp_path, truth, max_observations, side_copy,
                                                                      monkeypatch):
    """A forward on a side stream inside a capture that ends on the default stream: the hand-off copies
    on the stream that computed the records, or after it on the copy stream of large copies (a copy on the
    default one would race the side stream's work, here held back by a sleep kernel), the labels in the
    same copy."""
    from actpat.recorder import recorder

    monkeypatch.setattr(recorder, "_SIDE_COPY_BYTES", 0 if side_copy else recorder._SIDE_COPY_BYTES)
    model, x = truth.exact_conv_net(12, 8, 9)
    model, x = model.cuda(), x.cuda()
    labels = torch.arange(8, device="cuda") * 3
    taps = truth.Taps(model[1], model[3])
    side = torch.cuda.Stream()
    with ActivationRecorder(model, tmp_path, max_observations=max_observations) as rec:
        for step in range(3):
            side.wait_stream(torch.cuda.current_stream())
            with rec.capture(step, labels=labels, sample_ids=labels // 3 + 50):
                with torch.cuda.stream(side):
                    torch.cuda._sleep(50_000_000)
                    model(x)
            torch.cuda.current_stream().wait_stream(side)
    taps.remove()
    run = open_run(tmp_path)
    for step in range(3):
        for i, site in enumerate(run.sites):
            got = run.read(site, step)
            rows = (got.sample_ids - 50) * 81 + got.positions
            np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), truth.channel(taps.inputs[2 * step + i])[rows])
            np.testing.assert_array_equal(got.labels, (got.sample_ids - 50) * 3)


class _ShiftedRelu(nn.Module):
    """A net and a functional site after it, ``F.relu(net(x) - 1)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.relu(self.net(x) - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side_copy", [False, True])
def test_cuda_hooks_never_wait_for_the_device(tmp_path, truth, side_copy, monkeypatch):
    """Every path of a hook on a GPU (packing, NaN count, subsampling, stored values, labels, a functional
    site) and the hand-off to the host at the capture's end queue their work and copies without a
    synchronization: torch's sync debug mode raises on one (the writer thread's event wait is not one).
    The first capture on a device may wait once, for the constants the packing keeps per device (copied
    synchronously so that every stream sees them complete); it runs first, in a process where it may be
    the first. The copy to the host on the capture's stream, or on the side stream of large copies."""
    from actpat.recorder import recorder

    monkeypatch.setattr(recorder, "_SIDE_COPY_BYTES", 0 if side_copy else recorder._SIDE_COPY_BYTES)
    net, x = truth.exact_conv_net(12, 8, 9)  # integer pre-activations: exact on any device
    model, x = _ShiftedRelu(net).cuda(), x.cuda()
    labels = torch.arange(8, device="cuda")
    taps = truth.Taps(net[1], net[3])
    with ActivationRecorder(model, tmp_path, max_observations=300, store_values="all") as rec:
        for step in range(3):
            torch.cuda.set_sync_debug_mode("error" if step else "default")
            try:
                with rec.capture(step, labels=labels, sample_ids=labels + 50):
                    model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    taps.remove()
    run = open_run(tmp_path)
    assert run.sites == ["net.1", "net.3", "relu#0"]
    for step in range(3):
        z_first, z_second = taps.inputs[2 * step], taps.inputs[2 * step + 1]
        for site, z in zip(run.sites, (z_first, z_second, torch.relu(z_second) - 1)):
            got = run.read(site, step)
            assert len(got.bits) == 300 and got.nan_count == int(torch.isnan(z).sum())
            rows = (got.sample_ids - 50) * 81 + got.positions
            np.testing.assert_array_equal(truth.unpack(got.bits, got.n_units), truth.channel(z)[rows])
            np.testing.assert_array_equal(got.labels, got.sample_ids - 50)
            values = z.movedim(1, -1).reshape(-1, z.shape[1]).cpu().half().numpy()
            np.testing.assert_array_equal(got.values, values[rows])
    assert run.read("net.1", 0).nan_count > 0  # the NaN path is taken


def test_error_inside_a_hook_never_raises_inside_the_forward(tmp_path, monkeypatch):
    from actpat.recorder import packing, recorder

    def broken_pack(z, pattern):
        raise RuntimeError("packing broke")

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    expected = model(x)
    with ActivationRecorder(model, tmp_path) as rec:
        with rec.capture(0):
            model(x)
        monkeypatch.setattr(recorder, "pack_and_count_nans", broken_pack)
        outputs = []
        with pytest.raises(RecorderError, match="packing broke"):
            with rec.capture(1):
                outputs.append(model(x))  # the forward itself completes
        monkeypatch.setattr(recorder, "pack_and_count_nans", packing.pack_and_count_nans)
    assert torch.equal(outputs[0], expected)
    assert open_run(tmp_path).steps("1").tolist() == [0]


def test_idle_shard_is_finalized_after_max_shard_seconds(tmp_path):
    import time

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    with ActivationRecorder(model, tmp_path, max_shard_seconds=0.2) as rec:
        with rec.capture(0):
            model(torch.randn(2, 3))
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("*.h5")) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Finalized while the recorder is still open and no further record has arrived.
        assert [p.name for p in tmp_path.glob("*.h5")] == ["patterns-rank000-00000.h5"]
        assert not list(tmp_path.glob("*.partial"))
        with rec.capture(1):
            model(torch.randn(2, 3))
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["patterns-rank000-00000.h5", "patterns-rank000-00001.h5"]
    assert open_run(tmp_path).steps("1").tolist() == [0, 1]


def test_hooks_never_read_a_device_tensor_on_the_host(tmp_path, monkeypatch):
    """On the meta device every host read (.item(), bool(), int(), .numpy(), .tolist()) raises.

    The path a CUDA tensor takes (torch packing, NaN count left on the device) runs on meta tensors;
    a host read there would be a device synchronization on CUDA. The copy to the host at the hand-off
    needs data (tested below, and on CUDA where it is available): here the records keep their tensors.
    """
    from actpat.recorder import recorder

    monkeypatch.setattr(recorder, "to_host", lambda records: None)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))
    model = model.to("meta")
    model[3].register_forward_pre_hook(lambda module, args: (F.relu(args[0]),))  # a functional site
    records = []
    with ActivationRecorder(model, tmp_path, max_observations=50, store_values=4) as rec:
        rec.writer.put_many = records.extend  # meta tensors cannot be written: keep the records
        with rec.capture(0, labels=torch.arange(8)):
            model(torch.randn(8, 3, 6, 6, device="meta"))
    assert [r.meta.site for r in records] == ["1", "3:relu#0"]
    first = records[0]
    assert first.bits.device.type == "meta" and first.bits.shape == (50, 2)
    assert isinstance(first.nan_count, torch.Tensor) and first.nan_count.device.type == "meta"
    assert first.values.shape == (50, 4) and first.values.dtype == torch.float16


def test_the_torch_ops_of_a_site_on_an_accelerator_are_five_kernel_launches_six_with_pad_bits(tmp_path, monkeypatch):
    """On a GPU every op the hook runs is a launch from the training thread, tens of us each (bench/gpu.sh).
    With the torch ops (other accelerators; CUDA without Triton, or after a failed launch)
    a site whose width is whole bytes takes five: the comparison (written straight into the unit-last
    layout), the shift and sum that pack, the NaN test and its sum; a width off whole bytes one more, the
    fill of its pad bits. Counted on the meta device, which runs the accelerator path; ops that only make
    views are free."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from actpat.recorder import recorder

    class Launches(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.detach):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(recorder, "to_host", lambda records: None)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 13, 3), nn.ReLU(), nn.Flatten(), nn.Linear(13 * 16, 24), nn.ReLU()
    ).to("meta")
    x = torch.randn(8, 3, 8, 8, device="meta")
    with Launches() as plain:
        model(x)
    with ActivationRecorder(model, tmp_path) as rec:
        rec.writer.put_many = len
        with rec.capture(0):
            model(x)  # the first capture makes what later ones reuse
        with Launches() as recorded, rec.capture(1):
            model(x)
    added = list(recorded.ops)
    for op in plain.ops:
        added.remove(op)
    assert len(rec.sites) == 3
    assert sorted(added) == sorted(["gt", "__lshift__", "sum", "isnan", "sum"] * 3 + ["fill_"])


def test_device_tensors_of_a_capture_reach_the_host_in_one_copy_each_field_intact():
    """``to_host`` on CPU tensors standing in for a device's (``stream``: a device that is not CUDA):
    fields of three element sizes, non-contiguous and 0-d, from records of two streams; the capture's
    labels, one tensor shared by two records of a stream, in that stream's copy once."""
    from actpat.recorder.recorder import to_host
    from actpat.recorder.shards import Record, SiteMeta

    meta = SiteMeta(site="s", site_index=0, module_type="ReLU", shape=(3,), n_units=3, pattern="channel")
    g = torch.Generator().manual_seed(0)
    records, expected = [], []
    labels = torch.arange(20, 40)[::2]  # what `_Capture.per_sample` leaves on a GPU: int64, here strided
    for i, stream in enumerate([torch.device("cpu"), torch.device("cpu"), torch.device("cpu", 1), None]):
        bits = torch.randint(0, 256, (7 + i, 5), dtype=torch.uint8, generator=g)[:, 1:4]  # odd sizes, strided
        nan_count = torch.tensor(1000 + i) if i != 1 else 0  # a 0-d int64, or a plain int
        values = torch.randn(3 + i, 2, generator=g).half().t() if i != 2 else None
        expected.append((bits.clone(), nan_count, None if values is None else values.clone()))
        records.append(Record(meta=meta, step=i, epoch=0, split="train", bits=bits, n_positions=1, n_samples=7 + i,
                              nan_count=nan_count, values=values, stream=stream, labels=labels))
    no_tensor = Record(meta=meta, step=9, epoch=0, split="train", bits=np.zeros((2, 1), np.uint8), n_positions=1,
                       n_samples=2, nan_count=0, stream=torch.device("cpu", 2))
    cat = torch.cat
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "cat", lambda tensors, *a, **k: calls.append(len(tensors)) or cat(tensors, *a, **k))
        to_host(records + [no_tensor])
    # one copy per stream: records 0 and 1 (3 + 2 tensors and their labels once), record 2; not record 3;
    # the labels of records 2 and 3 (on another device than their stream's, or of a CPU model) copied alone
    assert calls == [6, 2]
    assert records[0].labels is records[1].labels and records[0].labels.tolist() == list(range(20, 40, 2))
    assert all(np.array_equal(record.labels, labels.numpy()) for record in records)
    assert no_tensor.stream is None and no_tensor.bits.shape == (2, 1)  # a stream with nothing to copy
    for i, (record, (bits, nan_count, values)) in enumerate(zip(records, expected)):
        assert record.stream is None and record.ready is None
        host = torch.Tensor if i == 3 else np.ndarray  # record 3's model ran on the CPU: its tensors stay
        assert isinstance(record.bits, host) and record.bits.dtype in (np.uint8, torch.uint8)
        np.testing.assert_array_equal(np.asarray(record.bits), bits.numpy())
        if isinstance(nan_count, int):
            assert record.nan_count == nan_count
        else:
            assert record.nan_count.shape == () and int(record.nan_count) == int(nan_count)
        assert (record.values is None) == (values is None)
        if values is not None:
            assert isinstance(record.values, host) and record.values.dtype in (np.float16, torch.float16)
            np.testing.assert_array_equal(np.asarray(record.values), values.numpy())


def test_bits_and_nan_count_in_one_packed_buffer_reach_the_host_in_it_once():
    """The Triton packing leaves a site's bits and NaN count in one byte buffer (the count 8-aligned after
    the bits): ``to_host`` copies that buffer whole, once, beside the capture's other tensors, and every
    field reads back exactly, bfloat16 values (which numpy lacks) as a torch tensor. Where the bits were
    subsampled (a new tensor) the count alone is copied."""
    from actpat.recorder.recorder import to_host
    from actpat.recorder.shards import Record, SiteMeta

    meta = SiteMeta(site="s", site_index=0, module_type="ReLU", shape=(3,), n_units=20, pattern="channel")
    g = torch.Generator().manual_seed(1)
    records, expected = [], []
    for i, rows in enumerate((5, 9, 3)):
        buffer = torch.zeros(-(-rows * 3 // 8) * 8 + 8, dtype=torch.uint8)  # bits, padding to 8, the count
        buffer[: rows * 3] = torch.randint(0, 256, (rows * 3,), dtype=torch.uint8, generator=g)
        count = buffer.view(torch.int64)[-1]
        count.fill_(100 + i)
        bits = buffer[: rows * 3].view(rows, 3)
        if i == 2:
            bits = bits.index_select(0, torch.tensor([2, 0]))  # subsampled: its own tensor
        values = torch.randn(rows, 2, generator=g).to(torch.bfloat16 if i == 1 else torch.float16)
        expected.append((bits.clone(), 100 + i, values.clone()))
        records.append(Record(meta=meta, step=i, epoch=0, split="train", bits=bits, n_positions=1, n_samples=rows,
                              nan_count=count, values=values, stream=torch.device("cpu", 1)))
    cat = torch.cat
    pieces = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "cat", lambda tensors, *a, **k: pieces.append([len(t) for t in tensors]) or cat(tensors, *a, **k))
        to_host(records)
    # two whole buffers (records 0 and 1: 24 and 40 bytes), the count of record 2, 8-byte-aligned ones first;
    # then the values (10, 18 and 6 elements) and record 2's subsampled bits (2 rows of 3 bytes)
    assert pieces == [[24, 40, 8, 20, 36, 12, 6]]
    for record, (bits, count, values) in zip(records, expected):
        assert isinstance(record.bits, np.ndarray) and record.bits.shape == bits.shape
        np.testing.assert_array_equal(record.bits, bits.numpy())
        assert record.nan_count.shape == () and int(record.nan_count) == count
        if values.dtype == torch.bfloat16:
            assert isinstance(record.values, torch.Tensor) and torch.equal(record.values, values)
        else:
            np.testing.assert_array_equal(record.values, values.numpy())


@pytest.mark.parametrize("rows", [16, 1 << 21], ids=["copy on the records' stream", "copy on the side stream"])
def test_the_hand_off_of_records_on_a_device_that_is_not_current_waits_for_their_own_stream(rows, monkeypatch):
    """A model on cuda:1 while cuda:0 is current (``model.to("cuda:1")`` without ``set_device``): the event in
    ``ready``, and the side stream's wait before a large copy, must be recorded on the stream of cuda:1 that
    computed the records, not on cuda:0's current stream (where ``Event.record()`` without a stream records).
    No two GPUs here: torch's stream rules are emulated (``torch.cuda.stream(s)`` makes ``s`` and its device
    current; an event recorded without a stream takes the current device's current stream)."""
    from actpat.recorder import recorder
    from actpat.recorder.shards import Record, SiteMeta

    state = {"device": 0, "current": {0: (0, 0, 1), 1: (3, 1, 1)}}  # cuda:1's current stream computed the records
    waits = []

    class Stream:
        def __init__(self, device=None, stream_id=None, device_index=None, device_type=None):
            self.key = (stream_id, device_index, device_type) if stream_id is not None else (99, device, 1)

        def wait_event(self, event):
            waits.append(event.stream)

    class Event:
        def record(self, stream=None):
            self.stream = stream.key if stream is not None else state["current"][state["device"]]

    @contextlib.contextmanager
    def on(stream):
        saved = dict(state["current"]), state["device"]
        state["current"][stream.key[1]], state["device"] = stream.key, stream.key[1]
        yield
        state["current"], state["device"] = saved

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentStream", lambda device: state["current"][device], raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: state["device"], raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)
    monkeypatch.setattr(recorder, "_side_streams", {})
    meta = SiteMeta(site="s", site_index=0, module_type="ReLU", shape=(8,), n_units=8, pattern="channel")
    record = Record(meta=meta, step=0, epoch=0, split="train", bits=torch.ones(rows, 1, dtype=torch.uint8),
                    n_positions=1, n_samples=rows, nan_count=torch.tensor(0), stream=(3, 1, 1))
    recorder.to_host([record])
    if rows < recorder._SIDE_COPY_BYTES:
        assert record.ready.stream == (3, 1, 1) and waits == []
    else:
        assert waits == [(3, 1, 1)] and record.ready.stream == (99, 1, 1)
    assert state["device"] == 0 and record.bits.shape == (rows, 1) and int(record.bits.min()) == 1


def test_pre_activations_without_units_or_positions_are_skipped_not_recorded_broken(tmp_path, caplog):
    class Degenerate(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.relu, self.other = shape, nn.ReLU(), nn.ReLU()

        def forward(self, x):
            self.other(x)
            return self.relu(torch.zeros(self.shape))

    for k, shape in enumerate([(3, 10, 0, 9), (3, 0, 9)]):
        model, x = Degenerate(shape), torch.randn(3, 5, 9)
        out = tmp_path / str(k)
        with caplog.at_level(logging.WARNING), ActivationRecorder(model, out) as rec:
            for step in range(2):
                with rec.capture(step):
                    model(x)
        assert f"shape {shape}" in caplog.text and "not recorded" in caplog.text
        run = open_run(out)
        assert run.sites == ["other"] and run.corrupt_records == 0
        expected = np.packbits(np.moveaxis((x > 0).numpy(), 1, -1).reshape(-1, 5), axis=-1, bitorder="little")
        for step in range(2):
            np.testing.assert_array_equal(run.read("other", step).bits, expected)


def test_a_site_inside_a_torch_func_transform_fails_with_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with ActivationRecorder(model, tmp_path) as rec:
        with pytest.raises(RecorderError, match=r"torch\.func transform.*outside `capture\(\)`"):
            with rec.capture(0):
                torch.func.vmap(model)(x)
        with rec.capture(1):
            model(x)
    assert open_run(tmp_path).steps("1").tolist() == [1]


def test_a_sites_filter_that_selects_nothing_names_the_module_sites(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    with ActivationRecorder(model, tmp_path, sites="layer*") as rec:
        with pytest.raises(ValueError, match=r"widen `sites=`\. The model's module sites: \['1', '3'\]"):
            with rec.capture(0):
                model(torch.randn(2, 3, 8, 8))


class _Encoder(nn.Module):
    """A transformer block as users write it: its FFN's ReLU sees (N, L, C) tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.block(self.embed(x)).mean(1)


def test_channel_last_patterns_of_a_transformer_are_the_ffn_units_of_each_token(tmp_path, caplog):
    torch.manual_seed(0)
    model = _Encoder()
    seen = []  # the FFN's pre-activations, by an independent hook on the layer before the ReLU
    model.block.linear1.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    lengths = [5, 9, 2]  # sequences of another length at every step
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path, pattern="channel_last") as rec:
        for step, length in enumerate(lengths):
            with rec.capture(step, sample_ids=torch.arange(4) + 4 * step):
                model(torch.randn(4, length, 3))
    assert not [r for r in caplog.records if "actpat" in r.getMessage()]
    run = open_run(tmp_path)
    assert run.sites == ["block:relu#0"]
    assert run.steps("block:relu#0").tolist() == [0, 1, 2]
    for step, z in enumerate(seen):
        p = run.read("block:relu#0", step)
        assert p.n_units == 24
        expected = np.packbits((z > 0).reshape(-1, 24).numpy(), axis=1, bitorder="little")  # token by token
        np.testing.assert_array_equal(p.bits, expected)
        np.testing.assert_array_equal(p.sample_ids, np.repeat(np.arange(4) + 4 * step, lengths[step]))
        np.testing.assert_array_equal(p.positions, np.tile(np.arange(lengths[step]), 4))
    info = run.site_info("block:relu#0")
    assert (info["pattern"], info["shape"], info["n_units"]) == ("channel_last", (5, 24), 24)


@pytest.mark.parametrize("pattern", [None, "channel"])
def test_a_3d_site_left_at_the_default_pattern_is_warned_of_once(tmp_path, caplog, pattern):
    # (N, C, L) of a Conv1d and (N, L, C) of a Linear on tokens look alike: the default cannot know which it is.
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5), nn.ReLU())
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path, pattern=pattern) as rec:
        for step in range(3):
            with rec.capture(step):
                model(torch.randn(2, 2, 8))
    warned = [r.getMessage() for r in caplog.records if "3-d pre-activations" in r.getMessage()]
    if pattern is None:
        assert len(warned) == 1 and "'1'" in warned[0] and "pattern='channel_last'" in warned[0]
        assert "(N, 4, 6)" in warned[0]
    else:
        assert warned == []
    assert open_run(tmp_path).site_info("1")["n_units"] == 4


def test_a_model_of_convolutions_and_tokens_is_recorded_by_two_recorders_each_with_its_pattern(tmp_path):
    class ConvThenTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv1d(3, 8, 3), nn.ReLU()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.enc(self.act(self.conv(x)).transpose(1, 2))  # (N, 8, L) channels, then (N, L, 8) tokens

    torch.manual_seed(0)
    model, seen = ConvThenTokens(), {}
    model.conv.register_forward_hook(lambda m, a, out: seen.__setitem__("act", out.detach().clone()))
    model.enc.linear1.register_forward_hook(lambda m, a, out: seen.__setitem__("enc:relu#0", out.detach().clone()))
    convs = ActivationRecorder(model, tmp_path / "conv", sites="act", pattern="channel")
    tokens = ActivationRecorder(model, tmp_path / "tokens", sites="enc*", pattern="channel_last")
    with convs, tokens, convs.capture(0), tokens.capture(0):
        model(torch.randn(4, 3, 10))
    by_units = {"act": seen["act"].movedim(1, -1), "enc:relu#0": seen["enc:relu#0"]}
    for directory, site in (("conv", "act"), ("tokens", "enc:relu#0")):
        run = open_run(tmp_path / directory)
        assert run.sites == [site]
        z = by_units[site]
        expected = np.packbits((z > 0).reshape(-1, z.shape[-1]).numpy(), axis=1, bitorder="little")
        np.testing.assert_array_equal(run.read(site, 0).bits, expected)


@pytest.mark.parametrize("layer", [nn.RNN, nn.Linear, nn.MultiheadAttention, nn.Softmax, torch.ao.nn.intrinsic.LinearReLU])
def test_module_types_refuse_torch_layers_that_are_no_activation(tmp_path, layer):
    # Their input is no pre-activation (an RNN's is the sequence): its signs would be recorded as a site, silently.
    with pytest.raises(ValueError, match=rf"`module_types`.*torch's {layer.__name__}, which is no elementwise"):
        ActivationRecorder(nn.Sequential(nn.Linear(3, 3)), tmp_path, module_types=[layer])
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("activation", [nn.Tanh, nn.GELU, nn.SiLU, nn.Hardtanh, nn.ELU])
def test_module_types_take_torchs_elementwise_activations(tmp_path, activation):
    model = nn.Sequential(nn.Linear(3, 4), activation())
    with ActivationRecorder(model, tmp_path, module_types=[activation]) as rec, rec.capture(0):
        model(torch.randn(2, 3))
    assert open_run(tmp_path).sites == ["1"]


def test_an_rnn_whose_relu_no_hook_sees_is_warned_of(tmp_path, caplog):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head, self.act = nn.RNN(3, 8, nonlinearity="relu", batch_first=True), nn.Linear(8, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.head(self.rnn(x)[0][:, -1]))

    with caplog.at_level(logging.WARNING):
        with ActivationRecorder(Recurrent(), tmp_path) as rec, rec.capture(0):
            rec.model(torch.randn(2, 5, 3))
    warned = [r.getMessage() for r in caplog.records if "fused recurrent kernel" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("actpat: rnn (RNN with nonlinearity='relu')")
    assert open_run(tmp_path).sites == ["act"]


@pytest.mark.parametrize("functional", [False, True])
def test_a_transformer_layers_activation_module_left_to_torchs_fast_path_is_warned_of(tmp_path, caplog, functional):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.ReLU(), batch_first=True)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    with caplog.at_level(logging.WARNING):
        rec = ActivationRecorder(model, tmp_path, functional=functional, pattern="channel_last")
        with rec, torch.no_grad(), rec.capture(0):
            model(torch.randn(2, 5, 8))
    warned = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    sites = open_run(tmp_path).sites
    if functional:  # the interceptor turns the fast path off: the activation is recorded, nothing to warn of
        assert warned == [] and sites == ["0.activation", "1"]
    else:  # the fast path skipped the activation module: said when the recorder was made
        assert len(warned) == 1 and "functional=False" in warned[0] and sites == ["1"]


def test_a_fabric_wrapped_module_names_its_sites_as_the_module_does(tmp_path):
    fabric_module = pytest.importorskip("lightning.fabric")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    wrapped = fabric_module.Fabric(accelerator="cpu", devices=1).setup_module(model)
    with ActivationRecorder(wrapped, tmp_path) as rec:
        for step in range(2):
            with rec.capture(step):
                wrapped(torch.randn(5, 3))
    run = open_run(tmp_path)
    assert run.sites == ["1"]  # not "_forward_module.1": the same names as the module's own recorder gives
    for step in range(2):
        np.testing.assert_array_equal(run.read("1", step).bits,
                                      np.packbits((seen[step] > 0).numpy(), axis=1, bitorder="little"))


def test_a_token_site_changing_width_at_the_default_pattern_names_channel_last(tmp_path, caplog):
    model = _Encoder()
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path) as rec:
        for step, length in enumerate((5, 7)):
            with rec.capture(step):
                model(torch.randn(2, length, 3))
    changed = [r.getMessage() for r in caplog.records if "changed width" in r.getMessage()]
    assert len(changed) == 1 and "from 5 to 7 units" in changed[0] and "pattern='channel_last'" in changed[0]


def _padded(lengths, width=3, seed=0):
    """A batch of sequences padded to the longest, with the mask of its real tokens (True)."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    x = torch.randn(len(lengths), longest, width, generator=g)
    real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    return x.masked_fill(~real[..., None], 0.0), real


class _PooledEncoder(_Encoder):
    """The token block, then a per-sequence head: a site of another shape than the tokens'."""

    def __init__(self):
        super().__init__()
        self.head, self.act = nn.Linear(16, 5), nn.ReLU()

    def forward(self, x, real=None):
        return self.act(self.head(self.block(self.embed(x), src_key_padding_mask=None if real is None else ~real).mean(1)))


@pytest.mark.parametrize("max_observations", [None, 6])
def test_a_mask_leaves_the_padding_of_token_sites_out_and_records_other_sites_whole(tmp_path, max_observations):
    torch.manual_seed(0)
    model = _PooledEncoder()
    seen = {}
    model.block.linear1.register_forward_hook(lambda m, a, out: seen.__setitem__("tokens", out.detach().clone()))
    model.head.register_forward_hook(lambda m, a, out: seen.__setitem__("head", out.detach().clone()))
    x, real = _padded([2, 5, 3])
    with ActivationRecorder(model, tmp_path, pattern="channel_last", max_observations=max_observations) as rec:
        with rec.capture(0, sample_ids=torch.tensor([10, 11, 12]), labels=torch.tensor([0, 1, 0]), mask=real):
            model(x, real)
    run = open_run(tmp_path)
    p = run.read("block:relu#0", 0)
    # Brute force: the (sample, token) pairs of real tokens, in sample-major order, and their 24-unit patterns.
    pairs = [(i, t) for i in range(3) for t in range(5) if real[i, t]]
    if max_observations is not None:
        assert len(p) == max_observations and set(zip(p.sample_ids.tolist(), p.positions.tolist())) <= {
            (10 + i, t) for i, t in pairs}
    else:
        assert list(zip(p.sample_ids.tolist(), p.positions.tolist())) == [(10 + i, t) for i, t in pairs]
    for row, (sample, token) in enumerate(zip(p.sample_ids.tolist(), p.positions.tolist())):
        expected = np.packbits((seen["tokens"][sample - 10, token] > 0).numpy(), bitorder="little")
        np.testing.assert_array_equal(p.bits[row], expected)
    head = run.read("act", 0)  # (N, 5): not token-shaped, recorded whole
    np.testing.assert_array_equal(head.bits, np.packbits((seen["head"] > 0).numpy(), axis=1, bitorder="little"))
    assert head.labels.tolist() == [0, 1, 0]


def test_a_mask_must_be_bool(tmp_path):
    model = _Encoder()
    with ActivationRecorder(model, tmp_path, pattern="channel_last") as rec:
        with pytest.raises(ValueError, match=r"`mask` to be a bool.*~padding_mask"):
            with rec.capture(0, mask=torch.ones(2, 4)):
                raise AssertionError("the forward must not run")


def test_a_mask_that_fits_no_site_is_an_error_before_the_capture_is_queued(tmp_path):
    model = _PooledEncoder()
    x, real = _padded([2, 5, 3])
    with ActivationRecorder(model, tmp_path, pattern="channel_last") as rec:
        with pytest.raises(ValueError, match=r"`mask` of shape \(5, 3\) to fit.*block:relu#0 \(N, 5\).*act \(N\)"):
            with rec.capture(0, mask=real.T.contiguous()):  # transposed: (L, N)
                model(x, real)
        with rec.capture(1, mask=real):  # the right one still works after the refusal
            model(x, real)
    run = open_run(tmp_path)
    assert run.steps("block:relu#0").tolist() == [1]  # the refused capture queued nothing


def test_a_mask_selects_the_same_rows_of_stored_values_and_an_all_false_mask_records_no_row(tmp_path):
    torch.manual_seed(0)
    model = _PooledEncoder()
    seen = []
    model.block.linear1.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    x, real = _padded([2, 5, 3])
    with ActivationRecorder(model, tmp_path, pattern="channel_last", store_values="all", max_observations=7) as rec:
        with rec.capture(0, sample_ids=torch.arange(3), mask=real):
            model(x, real)
        with rec.capture(1, sample_ids=torch.arange(3), mask=torch.zeros_like(real)):
            model(x, real)
    run = open_run(tmp_path)
    p = run.read("block:relu#0", 0)
    z = seen[0]
    expected = torch.stack([z[s, t] for s, t in zip(p.sample_ids.tolist(), p.positions.tolist())])
    np.testing.assert_array_equal(p.values, expected.to(torch.float16).numpy())  # the rows of the bits
    assert all(real[s, t] for s, t in zip(p.sample_ids.tolist(), p.positions.tolist()))
    assert len(run.read("block:relu#0", 1)) == 0


def test_a_transformer_layers_functional_relu_with_functional_false_is_warned_of(tmp_path, caplog):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)  # activation="relu": F.relu
    with caplog.at_level(logging.WARNING):
        ActivationRecorder(nn.Sequential(layer, nn.ReLU()), tmp_path, functional=False)
    warned = [r.getMessage() for r in caplog.records if "functional call" in r.getMessage()]
    assert len(warned) == 1 and "0 (TransformerEncoderLayer) applies relu" in warned[0]


def test_a_mask_of_the_wrong_shape_is_refused_even_when_it_keeps_everything(tmp_path):
    model = _PooledEncoder()
    x, _ = _padded([5, 5, 5])
    with ActivationRecorder(model, tmp_path, pattern="channel_last") as rec:
        with pytest.raises(ValueError, match=r"`mask` of shape \(5, 3\) to fit"):
            with rec.capture(0, mask=torch.ones(5, 3, dtype=torch.bool)):
                model(x)


def test_a_torchscript_part_whose_relus_no_hook_sees_is_warned_of(tmp_path, caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(x))

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), torch.jit.script(Block()), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING):
        with ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
            model(torch.randn(2, 3))
    warned = [r.getMessage() for r in caplog.records if "TorchScript" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("actpat: 2 is a TorchScript module")  # once, not per child
    assert open_run(tmp_path).sites == ["1"]  # what the warning says: the scripted block's ReLU is not recorded


def test_an_inverted_mask_that_keeps_nothing_of_the_longest_sample_is_warned_of(tmp_path, caplog):
    model = _PooledEncoder()
    x, real = _padded([2, 5, 3])
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path, pattern="channel_last") as rec:
        for step in range(2):
            with rec.capture(step, mask=~real):  # the padding mask itself, not its inverse
                model(x, real)
    warned = [r.getMessage() for r in caplog.records if "keeps no observation" in r.getMessage()]
    assert len(warned) == 1 and "sample 1" in warned[0] and "~src_key_padding_mask" in warned[0]
    assert len(open_run(tmp_path).read("block:relu#0", 0)) == int((~real).sum())  # recorded as asked, but said


class _ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as timm writes it: depthwise conv, then (N, H, W, C) for the norm and the pointwise Linears."""

    def __init__(self, c: int = 6, functional: bool = False):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm, self.pwconv1, self.pwconv2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.act = None if functional else nn.ReLU()

    def forward(self, x):
        h = self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))
        h = F.relu(h) if self.act is None else self.act(h)
        return x + self.pwconv2(h).permute(0, 3, 1, 2)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("pattern", [None, "channel", "channel_last"])
def test_a_channels_last_site_beside_a_linear_is_warned_of_at_the_default_pattern(tmp_path, caplog, functional, pattern):
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), _ConvNeXtBlock(functional=functional))
    x = torch.randn(2, 3, 5, 7)
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path, pattern=pattern) as rec:
        for step in range(2):
            with rec.capture(step):
                model(x)
    site = "3:relu#0" if functional else "3.act"
    warned = [r.getMessage() for r in caplog.records if "channels-last" in r.getMessage()]
    run = open_run(tmp_path)
    if pattern is None:  # only the block's site: the stem's (N, 6, 5, 7) has a Conv2d of 6 channels beside it
        assert len(warned) == 1 and repr(site) in warned[0] and "(N, 5, 7, 24)" in warned[0]
        assert "pattern='channel_last'" in warned[0] and "(24 features)" in warned[0]
    else:
        assert warned == []
    assert run.site_info(site)["n_units"] == (24 if pattern == "channel_last" else 5)
    assert run.site_info("2")["n_units"] == (7 if pattern == "channel_last" else 6)


def test_a_1d_site_is_warned_of_as_one_unbatched_sample(tmp_path, caplog):
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            return F.relu(self.fc(x).squeeze(1))  # (N,): a score per sample

    model = Scores()
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path) as rec:
        for step in range(2):
            with rec.capture(step, labels=torch.arange(6) % 2):
                model(torch.randn(6, 4))
    warned = [r.getMessage() for r in caplog.records if "1-d pre-activations" in r.getMessage()]
    assert len(warned) == 1 and "'relu#0'" in warned[0] and "(6,)" in warned[0] and "(N, 1)" in warned[0]
    assert open_run(tmp_path).site_info("relu#0")["n_units"] == 6


class _Features(nn.Module):
    """DenseNet's tail as torchvision writes it: features ending in a BatchNorm, a functional ReLU in the root's
    forward, a classifier whose width (7 classes) equals the 7x7 map's."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 8, 1), nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, 7)

    def forward(self, x):
        return self.classifier(F.relu(self.features(x)).mean((2, 3)))


class _PreActBlock(nn.Module):
    """A diffusion model's block: act(norm(x)) first, a time embedding Linear as wide as the map."""

    def __init__(self):
        super().__init__()
        self.norm, self.act, self.conv = nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
        self.time = nn.Linear(3, 7)

    def forward(self, x):
        return self.conv(self.act(self.norm(x))) + self.time(torch.ones(len(x), 3))[:, :4, None, None]


class _RootTokens(nn.Module):
    """A Linear on (N, H, W, C) and a functional ReLU in the root module's own forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return F.relu(self.fc(x.permute(0, 2, 3, 1)))


class _Held(nn.Module):
    """A network kept as ``self.net``, as a LightningModule holds it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model, site, warned", [
    (_Held(_Features()), "net:relu#0", False),
    (_PreActBlock(), "act", False),
    (_RootTokens(), "relu#0", True),
])
def test_the_channels_last_rule_on_models_as_others_write_them(tmp_path, caplog, model, site, warned):
    with caplog.at_level(logging.WARNING), ActivationRecorder(model, tmp_path) as rec, rec.capture(0):
        model(torch.randn(2, 3, 7, 7) if not isinstance(model, _PreActBlock) else torch.randn(2, 6, 7, 7))
    told = [r.getMessage() for r in caplog.records if "channels-last" in r.getMessage()]
    assert open_run(tmp_path).sites == [site]
    assert (told != []) == warned and all(repr(site) in message for message in told)

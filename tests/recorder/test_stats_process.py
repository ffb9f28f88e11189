"""Live statistics in a child process: same numbers as on a thread, failures reported, never a hang."""

import functools
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from actpat.analysis.live import live_measures
from actpat.recorder.live_stats import LiveStats, LiveStatsError, probe_rows, site_patterns
from actpat.recorder.shards import Record, SiteMeta
from actpat.recorder.stats_process import StatsProcess, StatsProcessError

META = SiteMeta("fc.relu", 0, "ReLU", (12,), 12, "flat")


def record(step, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 16, (40, 2), dtype=np.uint8)
    return Record(META, step, 0, "probe", bits, 1, 40, 0, sample_ids=np.arange(40), labels=np.arange(40) % 3)


def wait_ready(live):
    """Until the child has imported everything (probes before that run on the parent's thread)."""
    deadline = time.monotonic() + 30
    while live._process is not None and not live._process.ready() and time.monotonic() < deadline:
        time.sleep(0.05)


def one_probe_on_a_thread(stats):
    """Run one probe's statistics, checking they ran on a thread of this process; returns the notes given."""
    notes = []
    live = LiveStats(stats, None, lambda key, message: notes.append(message))
    try:
        assert live.worker_pid is None
        assert live.submit(0, 0, "probe", [record(0, 0)])
        assert [step for step, _ in live.results(wait=True)] == [0]
    finally:
        live.close(wait=True)
    return notes


def collect(stats, n_probes=4):
    notes = []
    live = LiveStats(stats, None, lambda key, message: notes.append(key))
    results = {}
    try:
        wait_ready(live)
        for step in range(n_probes):
            assert live.submit(step, 0, "probe", [record(step, step % 2)])
            results.update(live.results(wait=True))
    finally:
        live.close(wait=True)
    return live, results, notes


def test_a_picklable_function_runs_in_a_child_process_with_the_numbers_of_a_thread():
    in_process, threaded, _ = collect(lambda patterns, references: live_measures(patterns, references))
    assert in_process.worker_pid is None  # a lambda cannot be pickled: a thread of this process
    child, processed, notes = collect(functools.partial(live_measures, n_classes=None))
    assert child.worker_pid not in (None, os.getpid())
    assert notes == []
    assert processed == threaded  # exactly: the same function on the same patterns and references
    assert sorted(processed) == [0, 1, 2, 3]
    # The child kept the references: probe 2 repeats probe 0's patterns, so it equals init exactly.
    assert processed[2]["fc.relu"]["jaccard_init"] == 1.0
    assert processed[1]["fc.relu"]["jaccard_last"] < 1.0
    with pytest.raises(ProcessLookupError):  # closed: the child has exited
        os.kill(child.worker_pid, 0)


def test_a_failing_statistics_function_is_reported_with_its_traceback_and_printing_does_not_break_the_pipe(capfd, monkeypatch):
    # print() writes to the child's stdout (the pipe, were it not redirected) and returns None, which the
    # worker cannot unpack: an error from the child, not a garbled frame.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the child's stdout buffered, as it is by default
    notes = []
    live = LiveStats(print, None, lambda key, message: notes.append(message))
    try:
        wait_ready(live)
        assert live.submit(0, 0, "probe", [record(0, 0)])
        with pytest.raises(LiveStatsError, match="cannot unpack"):
            list(live.results(wait=True))
        assert live.submit(1, 0, "probe", [record(1, 1)])  # the process still answers
        with pytest.raises(LiveStatsError, match="cannot unpack"):
            list(live.results(wait=True))
        assert live.worker_pid is not None and notes == []  # the function failed, not the process
    finally:
        live.close(wait=True)
    # What it printed reached standard error, also what was still buffered when the child ended.
    assert capfd.readouterr().err.count("Patterns(site='fc.relu'") == 2


def test_a_killed_child_hands_over_to_a_thread_without_losing_a_probe():
    notes = []
    live = LiveStats(functools.partial(live_measures), None, lambda key, message: notes.append(message))
    results = {}
    try:
        wait_ready(live)
        for step in range(4):
            if step == 2:
                os.kill(live.worker_pid, signal.SIGKILL)  # killed for memory, say
            assert live.submit(step, 0, "probe", [record(step, step % 2)])
            results.update(live.results(wait=True))
        assert live.worker_pid is None
    finally:
        live.close(wait=True)
    assert sorted(results) == [0, 1, 2, 3]
    assert len(notes) == 1 and "thread" in notes[0] and "init" in notes[0]
    # init was computed in the child and died with it; last resumes one probe after the death.
    assert "jaccard_init" in results[1]["fc.relu"] and "jaccard_last" in results[1]["fc.relu"]
    assert not {"jaccard_init", "jaccard_last"} & set(results[2]["fc.relu"])
    assert "jaccard_last" in results[3]["fc.relu"] and "jaccard_init" not in results[3]["fc.relu"]
    expected = live_measures(site_patterns(probe_rows([record(3, 1)]), 3, 0, "probe")["fc.relu"],
                             {"last": live_measures(site_patterns(probe_rows([record(2, 0)]), 2, 0, "probe")["fc.relu"])[0]})[1]
    assert results[3]["fc.relu"] == expected


def test_close_without_waiting_kills_a_busy_child_and_frees_the_waiting_thread(tmp_path, monkeypatch):
    # A statistics function the child can import (it gets this sys.path) that sleeps for half a minute.
    (tmp_path / "slow_statistics.py").write_text("import time\n\ndef stats(patterns, references):\n    time.sleep(30)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from slow_statistics import stats

    process = StatsProcess(stats)
    errors = []

    def wait_for_answer():
        try:
            process.compute(probe_rows([record(0, 0)]), (0, 0, "probe"), True)
        except StatsProcessError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_answer)
    waiter.start()
    time.sleep(1.0)  # the child is importing or sleeping: busy either way
    start = time.monotonic()
    process.close(wait=False)
    waiter.join(timeout=10)
    assert not waiter.is_alive() and time.monotonic() - start < 10
    assert len(errors) == 1 and "ended" in str(errors[0])
    with pytest.raises(StatsProcessError, match="ended"):
        process.compute([], (1, 0, "probe"), True)


def test_a_child_that_cannot_start_falls_back_to_a_thread_and_says_so(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr("actpat.recorder.live_stats.StatsProcess", refuse)
    notes = one_probe_on_a_thread(functools.partial(live_measures))
    assert len(notes) == 1 and "no processes here" in notes[0] and "thread" in notes[0]


def test_probes_before_the_child_is_ready_run_here_and_the_child_continues_from_their_references():
    _, threaded, _ = collect(lambda patterns, references: live_measures(patterns, references), n_probes=6)
    live = LiveStats(functools.partial(live_measures), None, lambda key, message: None)
    results = {}
    try:
        for step in range(6):
            if step == 3:  # probes 0-2 ran while the child imported; from here it answers
                wait_ready(live)
            assert live.submit(step, 0, "probe", [record(step, step % 2)])
            results.update(live.results(wait=True))
        assert live._handed_over and live.worker_pid is not None
    finally:
        live.close(wait=True)
    assert results == threaded  # init from probe 0 and last from probe 2 reached the child intact


def test_a_child_that_dies_before_its_first_answer_hands_over_to_a_thread(monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")  # starts, reads nothing, exits
    notes = []
    live = LiveStats(functools.partial(live_measures), None, lambda key, message: notes.append(message))
    try:
        # Probes that come before the child is seen dead are computed on this thread, as before it is ready: how many
        # depends on the machine's load, so probes go on until it is (every one of them answered, in order).
        deadline, step = time.monotonic() + 60, 0
        while step == 0 or (live.worker_pid is not None and time.monotonic() < deadline):
            assert live.submit(step, 0, "probe", [record(step, step % 2)])
            assert [s for s, _ in live.results(wait=True)] == [step]
            step += 1
        assert live.worker_pid is None
    finally:
        live.close(wait=True)
    assert len(notes) == 1 and "thread" in notes[0]


def test_a_function_of_the_main_script_runs_on_a_thread_without_a_warning(monkeypatch):
    def stats(patterns, references):
        return live_measures(patterns, references)

    monkeypatch.setattr(stats, "__module__", "__main__")  # what a function of a script or notebook has
    monkeypatch.setattr(stats, "__qualname__", "stats")
    monkeypatch.setattr(sys.modules["__main__"], "stats", stats, raising=False)  # so that it pickles
    assert one_probe_on_a_thread(stats) == []


def test_close_does_not_wait_for_forked_processes_that_hold_the_pipe():
    # Data loader workers forked after the child started hold copies of its input pipe: closing it
    # here is then no end of input for the child, so close tells it to stop.
    live = LiveStats(functools.partial(live_measures), None, lambda key, message: None)
    wait_ready(live)
    assert live.submit(0, 0, "probe", [record(0, 0)])
    assert len(list(live.results(wait=True))) == 1 and live._handed_over
    worker = os.fork()
    if worker == 0:  # pragma: no cover - the forked copy only holds the descriptors
        time.sleep(60)
        os._exit(0)
    try:
        start = time.monotonic()
        pid = live.worker_pid
        live.close(wait=True)
        assert time.monotonic() - start < 5
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)


def test_the_child_gets_the_parents_import_path_and_a_process_group_of_its_own(tmp_path, monkeypatch):
    # A module importable here only through sys.path (as actpat itself may be): the child finds it.
    (tmp_path / "my_site_stats.py").write_text(
        "from actpat.analysis.live import live_measures\n\n\ndef stats(patterns, references):\n"
        "    return live_measures(patterns, references)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_site_stats

    live = LiveStats(my_site_stats.stats, None, lambda key, message: None)
    try:
        wait_ready(live)
        assert live.submit(0, 0, "probe", [record(0, 0)])
        assert [step for step, _ in live.results(wait=True)] == [0]
        assert live._handed_over  # computed in the child, which imported the module
        # Its own process group: a Ctrl-C at the terminal (to the foreground process group) does not reach it.
        assert os.getpgid(live.worker_pid) != os.getpgid(0)
        if sys.version_info >= (3, 11):  # in this session: under Linux's autogroups, one scheduling group with training
            assert os.getsid(live.worker_pid) == os.getsid(0)
    finally:
        live.close(wait=True)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the child's threads from /proc (Linux)")
def test_the_child_runs_numpy_on_one_thread_whatever_training_uses(monkeypatch):
    # A BLAS thread pool started at numpy's import spins on the cores that train; the statistics need none.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    live = LiveStats(functools.partial(live_measures, n_classes=None), None, lambda key, message: None)
    try:
        wait_ready(live)
        assert live._process.ready()
        assert os.listdir(f"/proc/{live.worker_pid}/task") == [str(live.worker_pid)]  # its main thread alone
    finally:
        live.close(wait=True)


def big_record(step, seed):
    """A probe whose pickle (200 kB) does not fit a pipe's buffer (64 kB on Linux): its sending blocks."""
    rng = np.random.default_rng(seed)
    meta = SiteMeta("fc.relu", 0, "ReLU", (8192,), 8192, "flat")
    bits = rng.integers(0, 256, (200, 1024), dtype=np.uint8)
    return Record(meta, step, 0, "probe", bits, 1, 200, 0, sample_ids=np.arange(200), labels=np.arange(200) % 3)


@pytest.mark.parametrize("size", ["small", "bigger than the pipe"])
@pytest.mark.parametrize("how", ["results", "close"])
def test_the_wait_for_the_last_statistics_is_bounded_when_the_child_is_stuck(monkeypatch, how, size):
    # A child that never answers (stopped here; swapped out or deadlocked elsewhere): waiting for it at the
    # end of training takes FINAL_WAIT_SECONDS, then its statistics are dropped with a note and it is ended.
    monkeypatch.setattr("actpat.recorder.live_stats.FINAL_WAIT_SECONDS", 1.0)
    notes = []
    live = LiveStats(functools.partial(live_measures), None, lambda key, message: notes.append(message))
    wait_ready(live)
    pid = live.worker_pid
    assert live.submit(0, 0, "probe", [record(0, 0)])
    assert dict(live.results(wait=True))[0]["fc.relu"]["jaccard_init"] == 1.0  # it answered while running
    os.kill(pid, signal.SIGSTOP)
    assert live.submit(1, 0, "probe", [record(1, 1) if size == "small" else big_record(1, 1)])
    got, done = [], threading.Event()

    def finish():
        if how == "results":
            got.extend(live.results(wait=True))
        live.close(wait=True)
        done.set()

    waiter = threading.Thread(target=finish, daemon=True)
    waiter.start()
    bounded = done.wait(20)
    if not bounded:
        os.kill(pid, signal.SIGKILL)  # frees a wait without bound, so that the failure below is reported
    waiter.join(30)
    assert bounded, "the wait for the statistics of a stuck child had no bound"
    assert got == []
    assert len(notes) == 1 and "steps [1] were not done after a wait of 1 s" in notes[0] and "dropped" in notes[0]
    with pytest.raises(ProcessLookupError):  # ended
        os.kill(pid, 0)
    assert not live.submit(2, 0, "probe", [record(2, 0)])  # nothing more is computed


def test_a_timeout_error_of_the_statistics_is_their_failure_not_a_late_answer():
    # concurrent.futures.TimeoutError is the builtin TimeoutError: raised by the function, it is the probe's
    # failure (LiveStatsError), not the end of the wait for late statistics.
    def stats(patterns, references):
        raise TimeoutError("a statistic timed out")

    notes = []
    live = LiveStats(stats, None, lambda key, message: notes.append(message))
    try:
        assert live.submit(0, 0, "probe", [record(0, 0)])
        with pytest.raises(LiveStatsError, match="failed with TimeoutError: a statistic timed out"):
            list(live.results(wait=True))
        assert live.submit(1, 0, "probe", [record(1, 1)])  # live statistics go on
        with pytest.raises(LiveStatsError):
            list(live.results(wait=True))
    finally:
        live.close(wait=True)
    assert notes == []


def test_the_child_imports_neither_h5py_nor_torch():
    # What the child imports to serve live_measures: h5py and the reader would add a third to its start
    # at every fit, torch several times its whole start.
    code = (
        "import sys; import actpat.recorder.stats_process; "
        "from actpat.recorder.live_stats import probe_statistics, site_patterns; import actpat.analysis.live; "
        "print(sorted(m for m in ('h5py', 'torch', 'actpat.recorder.reader') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

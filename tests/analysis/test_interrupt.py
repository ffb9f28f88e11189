"""Ctrl-C during `actpat analyze`: the command exits with 130 and a message, and leaves no process behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from actpat.recorder.shards import Record, ShardWriter, SiteMeta

pytestmark = pytest.mark.slow

# The run reads slowly (each record after a pause) so that the interrupt lands mid-pass; the Run subclass
# lives in an importable module so that worker processes read through it too.
SLOW_RUN = """
import time
from actpat.recorder import reader

class SlowRun(reader.Run):
    def read(self, site, step, split):
        time.sleep(0.5)
        return super().read(site, step, split)
"""

COMMAND = """
import sys
import actpat.recorder
from actpat.analysis import cli
import slow_run

actpat.recorder.open_run = slow_run.SlowRun
sys.exit(cli.main(sys.argv[1:]))
"""


def write_run(path):
    writer = ShardWriter(path)
    writer.start()
    for site_index in range(4):
        meta = SiteMeta(f"fc{site_index}", site_index, "ReLU", (8,), 8, "flat")
        for step in range(40):
            writer.put(Record(meta, step, 0, "probe", np.arange(16, dtype=np.uint8)[:, None], 1, 16, 0))
    writer.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_stops_analyze_cleanly(tmp_path, jobs):
    write_run(tmp_path / "run")
    (tmp_path / "slow_run.py").write_text(textwrap.dedent(SLOW_RUN))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "metrics.csv"
    # A terminal's Ctrl-C signals the whole foreground process group: the command, its workers and their server.
    proc = subprocess.Popen(
        [sys.executable, "-c", COMMAND, "analyze", str(tmp_path / "run"), "-o", str(out), "--jobs", jobs],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        seen = b""
        while b"record" not in seen:  # the progress bar is up: the pass has started
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += os.read(proc.stderr.fileno(), 4096)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stop_seconds = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (seen + err).decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".metrics.csv*"))
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid), "worker processes outlived the interrupted command"
    # 160 reads of 0.5 s each: had the command waited for the running and queued work, it would take >= 40 s.
    assert stop_seconds < 30, stop_seconds


LOST = """
import os, signal, sys
from actpat.analysis import cli

command = cli._cmd_info


class Finalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):  # the handler runs here, inside __del__, which only prints its KeyboardInterrupt
            pass


def info(args):
    Finalizer()  # collected at once
    return command(args)


cli._cmd_info = info
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_ctrl_c_lost_inside_a_finalizer_still_ends_the_command_as_interrupted(tmp_path):
    # Python prints an exception raised inside a finalizer and goes on: the command's KeyboardInterrupt is lost
    # there. The command must not then finish as if Ctrl-C had never been pressed (exit status 0).
    write_run(tmp_path / "run")
    done = subprocess.run([sys.executable, "-c", LOST, "info", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert "Exception ignored" in done.stderr, done.stderr  # the interrupt was lost where the test put it
    assert done.returncode == 130, done.stdout + done.stderr
    assert "interrupted" in done.stderr

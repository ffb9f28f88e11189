"""A child Python that computes the live statistics, so that they never hold training's interpreter lock.

Live statistics are many small numpy calls: on a thread of the training process they hold the
interpreter lock for most of their time, and the training thread waits for it (measured on the digits
CNN: about twice the statistics' own time per probe). :class:`StatsProcess` runs them in a child
interpreter instead (``python -m actpat.recorder.stats_process``, started once per prober), which
keeps the ``init``/``last`` references itself; each probe's patterns go to it as one pickle over a pipe.

The child is a plain subprocess, not :mod:`multiprocessing`: it never re-imports the training script
(which ``spawn`` and ``forkserver`` do, and which reruns a script without a ``__main__`` guard), and it
does not fork a process that holds CUDA contexts or threads. What the statistics function prints
goes to the child's standard error, never into the pipe.

The child gets the parent's ``sys.path`` (as ``PYTHONPATH``) and a process group of its own in the
parent's session: a Ctrl-C at the terminal reaches the parent only, which ends the child when it closes.

Frames are pickles. To the child: the statistics function, then per probe
``("probe", rows, (step, epoch, split), use_last, references or None)`` (``rows``: the probe's
:class:`~actpat.recorder.live_stats.ProbeRows`, from which the child makes each site's ``Patterns``),
and ``("stop",)`` at the end. From the child: ``("ok", "ready")`` once it has imported everything, then
``("ok", metrics)`` per probe; ``("error", traceback text)`` instead of either when something failed.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import threading
import traceback
from typing import Any, BinaryIO, Optional

__all__ = ["SUPPORTED", "StatsFunctionError", "StatsProcess", "StatsProcessError"]

_CLOSE_SECONDS = 10.0
# The child's numpy runs single-threaded: a BLAS thread pool started at import spins on the cores that train
# (0.1 s of CPU per start on two cores, 60% of the child's start), and the live statistics use no BLAS.
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
#: Whether the child can be used here: its readiness is polled with select(), which takes pipes on POSIX only.
SUPPORTED = os.name == "posix"


class StatsProcessError(RuntimeError):
    """The statistics process could not start, or ended."""


class StatsFunctionError(StatsProcessError):
    """The statistics function raised in the process (the traceback is in the message)."""


class StatsProcess:
    """The parent's side of the child: start it, hand it one probe at a time, stop it.

    The child imports numpy and the statistics function first (a fraction of a second) and then says
    it is ready; until :meth:`ready`, the caller computes on its own thread and hands its references
    over with the child's first probe.

    Parameters
    ----------
    stats : StatsFunction
        Picklable (a module-level function, or a ``functools.partial`` of one).

    Raises
    ------
    OSError, StatsProcessError
        If the child cannot be started.
    """

    def __init__(self, stats: Any) -> None:
        # The parent's import path (actpat itself may be on it only here); a process group of its own, so that
        # a Ctrl-C at the terminal reaches the parent alone, which then decides when the child ends. In the
        # parent's session: Linux schedules each session as a group (autogroup), so a session of its own
        # would get as much CPU as all of training (Python 3.10 has no `process_group`: a session).
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        path = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "actpat.recorder.stats_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path, **_ONE_THREAD}, **group,
        )
        self._ready = False
        self._ready_lock = threading.Lock()  # the worker thread and another thread may both ask
        self._send(stats)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def ready(self) -> bool:
        """Whether the child has started (never waits; POSIX only, see :data:`SUPPORTED`).

        Raises :class:`StatsProcessError` if it could not start (its statistics function not
        importable there, say)."""
        with self._ready_lock:
            if not self._ready and select.select([self._proc.stdout], [], [], 0)[0]:
                self._start()
            return self._ready

    def _start(self) -> None:
        try:
            self._receive()  # "ready"
        except StatsFunctionError as exc:
            raise StatsProcessError(f"the live-statistics process could not start: {exc}") from exc
        self._ready = True

    def compute(
        self, rows: list[Any], where: tuple[int, int, str], use_last: bool,
        references: Optional[dict[str, dict[str, Any]]] = None,
    ) -> dict[str, dict[str, float]]:
        """The metrics of one probe (blocks the calling thread, not the interpreter lock, while it waits).

        ``rows`` are the probe's :class:`~actpat.recorder.live_stats.ProbeRows`, ``where`` its ``(step,
        epoch, split)``. ``references`` (``{"init" | "last": {site: summary}}``) replace the child's own
        before this probe: the state to continue from after probes computed elsewhere.
        """
        if not self._ready:
            self._start()
        self._send(("probe", rows, where, use_last, references))
        return self._receive()

    def _receive(self) -> Any:
        try:
            status, payload = pickle.load(self._proc.stdout)
        except (EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:  # ValueError: closed here
            raise StatsProcessError(
                f"the live-statistics process ended (exit code {self._proc.poll()}) before answering ({exc!r})"
            ) from exc
        if status != "ok":
            raise StatsFunctionError(f"the live statistics failed in their process:\n{payload}")
        return payload

    def close(self, wait: bool) -> None:
        """End the child: let it finish (``wait``) or kill it."""
        if not wait and self._proc.poll() is None:
            # First: a thread blocked writing a probe to a child that does not read (stopped) holds the pipe's
            # lock, which closing the pipe below waits for; the kill frees that thread (EPIPE; EOF for a reader).
            self._proc.kill()
        if wait:  # a frame, not only the end of input: forked processes (loader workers) may hold the pipe too
            try:
                self._send(("stop",))
            except StatsProcessError:
                pass
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if wait:
            try:
                self._proc.wait(timeout=_CLOSE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()

    def _send(self, message: tuple) -> None:
        try:
            pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:  # ValueError: closed here
            raise StatsProcessError(
                f"the live-statistics process ended (exit code {self._proc.poll()}) and takes no more probes"
            ) from exc


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    def reply(status: str, payload: Any) -> None:
        pickle.dump((status, payload), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    try:
        from actpat.recorder.live_stats import probe_statistics, site_patterns

        stats = pickle.load(inp)
    except EOFError:
        return
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it there
        reply("error", traceback.format_exc())
        return
    reply("ok", "ready")
    references: dict = {}
    while True:
        try:
            message = pickle.load(inp)
        except EOFError:  # the parent died
            return
        if message[0] == "stop":
            return
        _, rows, where, use_last, handed_over = message
        try:
            if handed_over is not None:
                references = handed_over
            reply("ok", probe_statistics(stats, references, site_patterns(rows, *where), use_last))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it there
            reply("error", traceback.format_exc())


def main() -> None:
    # Frames go to a private copy of the pipe; anything printed goes to standard error.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()

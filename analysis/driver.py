"""One pass over a run: every (site, step) record read once and handed to each analysis that wants it.

:func:`run_pass` is the engine behind :func:`~actpat.analysis.summarize`,
:func:`~actpat.analysis.information_plane`, :func:`~actpat.analysis.firing_rates` and
:func:`~actpat.analysis.analyze_run` (all three in one pass). An analysis plugs in as a
:class:`Consumer`: it sees the records of one site in step order and returns a small result per step
(a dict of numbers, per-unit counts), never the records themselves.

Work is cut into *blocks*, runs of consecutive steps of one site. Where blocks run:

- ``n_jobs=1``: in this process, one block per site.
- ``n_jobs > 1``: local worker processes forked from a server that has imported the analysis modules
  once (no interpreter start-up and no imports per worker), each given the run's index once at start.
  A site larger than a fair share of the run is cut into blocks of steps; the largest blocks go first.
  As with any ``multiprocessing`` code that does not fork, a script that calls it must guard its entry
  point with ``if __name__ == "__main__":`` (notebooks and the ``actpat`` command need nothing).
- ``client=``, a :class:`distributed.Client`: blocks run as tasks on a Dask cluster, the run's index is
  scattered to every worker once, and each worker opens the shards at ``run.path`` itself. The run
  directory must therefore be readable at the same path on every worker (a shared filesystem: NFS,
  Lustre, GPFS, or one machine), and actpat installed in the workers' environment.

Results come back to the calling process and are merged there in plan order (sites in forward order,
steps ascending), so a table is identical wherever its blocks ran. Messages that workers log are sent
back with their results and logged here, each once.

Memory: a worker holds only what its consumers keep of one site (for summarize at most four records:
the current step, the previous one, ``init`` and ``final``), whatever the size of the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import forkserver
from typing import Any, Protocol

import numpy as np

from actpat.recorder.reader import Patterns, Run, open_run

__all__ = ["Block", "Consumer", "plan_blocks", "run_pass", "tidy_table"]

log = logging.getLogger(__name__)

# Blocks per worker a run is cut into when it runs in parallel (load balance against the records read
# again at the start of each block), and the fewest steps a site is cut into.
_BLOCKS_PER_WORKER = 4
_MIN_BLOCK_STEPS = 16
# Bytes per observation besides its packed pattern: label, sample id and position (int64 each).
_ROW_OVERHEAD = 24


class Consumer(Protocol):
    """An analysis fed by :func:`run_pass`. It must pickle: it travels to the worker processes."""

    def open_block(
        self, site: str, info: dict, steps: np.ndarray, start: int, load: Callable[[int], Patterns]
    ) -> Callable[[Patterns], Any]:
        """Start a block of ``site`` whose first step is ``steps[start]``.

        ``info`` is :meth:`Run.site_info`, ``steps`` all recorded steps of the site in the split, and
        ``load(step)`` reads any other of them (a reference point). Returns the function applied to each
        record of the block in step order; it returns the step's result, or None to leave the step out.
        """

    def merge(self, results: list[tuple[str, int, Any]], split: str, infos: dict[str, dict]) -> Any:
        """Combine the ``(site, step, result)`` of the whole pass, in plan order, in the calling process."""


def _prepared(consumer: Any, run: Run, split: str, sites: Sequence[str]) -> Any:
    """A consumer may look at the run before the pass, in the calling process: ``prepare(run, split, sites)``
    (optional) returns the consumer to use (e.g. one told which sites lost their first record)."""
    prepare = getattr(consumer, "prepare", None)
    return consumer if prepare is None else prepare(run, split, sites)


@dataclass(frozen=True)
class Block:
    """Steps ``steps[start:stop]`` of one site; ``steps`` are all its recorded steps in the split."""

    site: str
    steps: tuple[int, ...]
    start: int
    stop: int
    cost: int

    @property
    def n_steps(self) -> int:
        return self.stop - self.start


def plan_blocks(run: Run, split: str, sites: Sequence[str], workers: int) -> list[Block]:
    """Blocks of a pass over ``sites``, in forward site order and ascending steps.

    With one worker every site is one block. With more, a site whose estimated cost (bytes of its
    records) exceeds ``1 / (4 * workers)`` of the run is cut into blocks of at least 16 steps, so that
    workers finish together; each block after a site's first reads its few reference records again.
    """
    per_site = []
    for site in sites:
        steps = tuple(int(s) for s in run.steps(site, split))
        if steps:
            row_bytes = (run.site_info(site)["n_units"] + 7) // 8 + _ROW_OVERHEAD
            per_site.append((site, steps, run.n_observations(site, split) * row_bytes))
    total = sum(cost for *_, cost in per_site)
    share = total / (workers * _BLOCKS_PER_WORKER) if workers > 1 else math.inf
    blocks = []
    for site, steps, cost in per_site:
        pieces = max(1, min(math.ceil(cost / share) if share > 0 else 1, len(steps) // _MIN_BLOCK_STEPS))
        bounds = np.linspace(0, len(steps), pieces + 1).round().astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            blocks.append(Block(site, steps, int(start), int(stop), cost * int(stop - start) // len(steps)))
    return blocks


def _read_block(
    run: Run, split: str, block: Block, consumers: Mapping[str, Consumer], tick: Callable[[int], None] | None = None
) -> dict[str, list[tuple[int, Any]]]:
    """Read the records of one block once and feed them to every consumer."""
    steps = np.asarray(block.steps, dtype=np.int64)
    ahead = set(block.steps[block.start : block.stop])
    kept: dict[int, Patterns] = {}

    def load(step: int) -> Patterns:
        step = int(step)
        if step in kept:
            return kept[step]
        p = run.read(block.site, step, split)
        if step in ahead:  # read again below otherwise
            kept[step] = p
        return p

    info = run.site_info(block.site)
    feeds = {name: c.open_block(block.site, info, steps, block.start, load) for name, c in consumers.items()}
    out: dict[str, list[tuple[int, Any]]] = {name: [] for name in consumers}
    for step in block.steps[block.start : block.stop]:
        ahead.discard(step)
        p = kept.pop(step) if step in kept else run.read(block.site, step, split)
        for name, feed in feeds.items():
            result = feed(p)
            if result is not None:
                out[name].append((step, result))
        del p
        if tick is not None:
            tick(1)
    return out


class _Collect(logging.Handler):
    """Keeps what a worker logs, to be logged again by the calling process."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.name, record.levelno, record.getMessage()))


def _read_block_collecting(run: Run, split: str, block: Block, consumers: Mapping[str, Consumer], level: int):
    logger = logging.getLogger("actpat")
    handler = _Collect()
    logger.addHandler(handler)
    old = logger.level, logger.propagate
    logger.setLevel(level)
    logger.propagate = False  # the calling process logs it; the worker's own handlers stay silent
    try:
        return _read_block(run, split, block, consumers), handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]


# ---------------------------------------------------------------------------------- local processes
_WORKER_RUN: Run | None = None


def _init_worker(run: Run) -> None:
    global _WORKER_RUN
    _WORKER_RUN = run
    # Ctrl-C reaches the whole process group; the calling process alone stops the pass.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_block(split: str, block: Block, consumers: Mapping[str, Consumer], level: int):
    return _read_block_collecting(_WORKER_RUN, split, block, consumers, level)


def _mp_context(consumers: Mapping[str, Consumer]):
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect when this process first starts its fork server; workers are then forked with these
    # modules already imported.
    context.set_forkserver_preload(sorted({__name__, *(type(c).__module__ for c in consumers.values())}))
    if threading.current_thread() is threading.main_thread():
        # Started with Ctrl-C ignored (inherited), the server and the workers it forks leave a Ctrl-C to
        # this process, which stops them, instead of dying in their imports with a traceback each.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, handler)
    return context


_STOP_SECONDS = 10.0  # the most a stopped pool's manager thread is waited for


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, mid-task (``shutdown`` alone waits for the running tasks)."""
    # The pool's manager thread closes its wake-up pipe as it ends; still running at interpreter exit, it races
    # the exit hook that writes to that pipe (an EBADF traceback after the command's clean message). It is
    # waited for below; shutdown() forgets it.
    manager = getattr(pool, "_executor_manager_thread", None)
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
    else:  # before 3.14 the workers are only reachable here; shutdown() forgets them
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
    if manager is not None:
        manager.join(timeout=_STOP_SECONDS)


@contextlib.contextmanager
def _deferred_interrupt():
    """Hold a Ctrl-C that arrives inside the block until its end (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _map_local(run, split, blocks, consumers, workers, level, done):
    pool = None
    try:
        # Workers start whole (a worker stopped while it unpickles its start-up data prints a traceback);
        # a Ctrl-C meanwhile takes effect right after, and stops them.
        with _deferred_interrupt():
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=_mp_context(consumers), initializer=_init_worker, initargs=(run,)
            )
            order = sorted(range(len(blocks)), key=lambda i: -blocks[i].cost)
            futures = {pool.submit(_worker_block, split, blocks[i], consumers, level): i for i in order}
        for future in as_completed(futures):
            done(futures[future], *future.result())
    except BrokenProcessPool as exc:
        _stop_pool(pool)
        raise RuntimeError(
            f"A worker process of the pass died ({exc}): killed for memory, or a script that starts the pass "
            "without an `if __name__ == '__main__':` guard. Use fewer `n_jobs` (`--jobs`), or add the guard."
        ) from exc
    except BaseException:
        if pool is not None:
            _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------- Dask
def _dask_block(run: Run, split: str, block: Block, consumers: Mapping[str, Consumer], level: int):
    if not run.path.is_dir():
        raise FileNotFoundError(
            f"Expected the run directory {str(run.path)!r} to be readable on Dask worker {socket.gethostname()!r}, "
            "but it is not there. Workers read the shards where they are: put the run on a filesystem shared "
            "by the client and every worker, at the same path."
        )
    return _read_block_collecting(run, split, block, consumers, level)


def _map_dask(client, run, split, blocks, consumers, level, done):
    from distributed import as_completed as dask_completed

    run_future = client.scatter(run, broadcast=True, hash=False)
    futures = {}
    for i in sorted(range(len(blocks)), key=lambda i: -blocks[i].cost):
        future = client.submit(_dask_block, run_future, split, blocks[i], consumers, level, pure=False)
        futures[future] = i
    try:
        for future in dask_completed(list(futures)):
            done(futures[future], *future.result())
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        client.cancel(run_future)


# ---------------------------------------------------------------------------------- the pass
def _check_parallel(n_jobs, client) -> int:
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"Expected `n_jobs` to be a positive int or -1 (all cores), but got {n_jobs!r}.")
    if client is not None:
        if n_jobs != 1:
            raise ValueError(
                f"Expected either `n_jobs` or a Dask `client`, but got both (n_jobs={n_jobs}); the cluster's "
                "workers are the parallelism."
            )
        if not (hasattr(client, "submit") and hasattr(client, "scatter")):
            raise ValueError(f"Expected `client` to be a distributed.Client, but got {type(client).__name__}.")
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs


def run_pass(
    run_or_path: Run | str | os.PathLike,
    consumers: Mapping[str, Consumer],
    split: str | None = None,
    *,
    sites: Sequence[str] | None = None,
    n_jobs: int = 1,
    client=None,
    progress: bool = True,
    desc: str = "actpat",
) -> dict[str, Any]:
    """Read every record of ``split`` once and feed it to each consumer; return their merged results.

    Parameters
    ----------
    run_or_path : Run or path
        A run, or its directory.
    consumers : mapping of str to Consumer
        The analyses of the pass, by name.
    split : str or None, default None
        Recorded split to read; None means the run's only split (a run with several must name one).
    sites : sequence of str or None, default None
        Sites to read (default all, in forward order).
    n_jobs : int, default 1
        Local worker processes; ``-1`` uses every core. Worth it from a few seconds of work on
        (see the README's benchmark for the crossover).
    client : distributed.Client or None, default None
        Run the blocks as tasks on this Dask cluster instead (the run directory must be at the same path
        on every worker: a shared filesystem).
    progress : bool, default True
        Show a ``tqdm`` bar over the records (site and step).
    desc : str, default "actpat"
        Label of the progress bar.

    Returns
    -------
    dict
        ``{name: consumer.merge(...)}`` for each consumer.

    Raises
    ------
    ValueError
        Unknown split or site, or bad ``n_jobs`` / ``client``.

    Examples
    --------
    A consumer that counts the observations of each record:

    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> class Rows:
    ...     def open_block(self, site, info, steps, start, load):
    ...         return len
    ...     def merge(self, results, split, infos):
    ...         return {(site, step): n for site, step, n in results}
    >>> tmp = tempfile.TemporaryDirectory()
    >>> writer = ShardWriter(tmp.name)
    >>> writer.start()
    >>> for step, n in ((0, 4), (5, 3)):
    ...     _ = writer.put(Record(SiteMeta("fc", 0, "ReLU", (3,), 3, "flat"), step, 0, "probe",
    ...                           np.zeros((n, 1), dtype=np.uint8), 1, n, 0))
    >>> writer.close()
    >>> run_pass(tmp.name, {"rows": Rows()}, progress=False)
    {'rows': {('fc', 0): 4, ('fc', 5): 3}}
    >>> tmp.cleanup()
    """
    workers = _check_parallel(n_jobs, client)
    if isinstance(run_or_path, Run):
        return _run_pass(run_or_path, consumers, split, sites, workers, client, progress, desc)
    run = open_run(run_or_path)
    try:
        return _run_pass(run, consumers, split, sites, workers, client, progress, desc)
    finally:
        # A run opened here is closed here (``Run.close`` comes with the reader's cache of open files).
        close = getattr(run, "close", None)
        if close is not None:
            close()


def _run_pass(run: Run, consumers, split, sites, workers: int, client, progress: bool, desc: str) -> dict[str, Any]:
    split = run.resolve_split(split)
    if sites is None:
        sites = run.sites
    unknown = [s for s in sites if s not in run.sites]
    if unknown:
        raise ValueError(f"Expected `sites` to be recorded sites {run.sites}, but got {unknown}.")
    consumers = {name: _prepared(consumer, run, split, sites) for name, consumer in consumers.items()}
    if client is not None:
        workers = max(2, sum(client.nthreads().values()))  # the cluster's task slots
    blocks = plan_blocks(run, split, sites, workers)
    parts: list[dict[str, list] | None] = [None] * len(blocks)
    seen: set = set()

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Warnings printed while the bar is drawn go above it (through tqdm.write), not onto its line.
    redirect = logging_redirect_tqdm(tqdm_class=tqdm) if progress else contextlib.nullcontext()
    with redirect, tqdm(total=sum(b.n_steps for b in blocks), disable=not progress, desc=desc, unit="record") as bar:

        def done(i: int, out: dict, messages: list) -> None:
            parts[i] = out
            for message in messages:
                if message not in seen:
                    seen.add(message)
                    logging.getLogger(message[0]).log(message[1], "%s", message[2])
            bar.update(blocks[i].n_steps)

        level = logging.getLogger("actpat").getEffectiveLevel()
        if client is not None:
            _map_dask(client, run, split, blocks, consumers, level, done)
        elif workers > 1 and len(blocks) > 1:
            _map_local(run, split, blocks, consumers, min(workers, len(blocks)), level, done)
        else:
            for i, block in enumerate(blocks):
                parts[i] = _read_block(run, split, block, consumers, tick=bar.update)
    infos = {site: run.site_info(site) for site in sites}
    return {
        name: consumer.merge(
            [(b.site, step, r) for b, part in zip(blocks, parts) for step, r in part[name]], split, infos
        )
        for name, consumer in consumers.items()
    }


def tidy_table(results: list[tuple[str, int, tuple[int, dict]]], split: str, infos: dict[str, dict]):
    """The tidy table of per-step ``(epoch, {metric: value})`` results.

    Returns
    -------
    pandas.DataFrame
        Columns ``step, epoch, split, site, site_index, metric, value``, one row per number, in the order
        of ``results`` and of each dict.
    """
    import pandas as pd

    from actpat.analysis.tables import COLUMNS

    sizes = np.fromiter((len(r[2][1]) for r in results), dtype=np.int64, count=len(results))
    n = int(sizes.sum())
    table = pd.DataFrame(
        {
            "step": np.repeat(np.fromiter((r[1] for r in results), np.int64, len(results)), sizes),
            "epoch": np.repeat(np.fromiter((r[2][0] for r in results), np.int64, len(results)), sizes),
            "split": np.full(n, split, dtype=object),
            "site": np.repeat(np.array([r[0] for r in results], dtype=object), sizes),
            "site_index": np.repeat(
                np.fromiter((infos[r[0]]["site_index"] for r in results), np.int64, len(results)), sizes
            ),
            "metric": np.array([m for r in results for m in r[2][1]], dtype=object),
            "value": np.fromiter((float(v) for r in results for v in r[2][1].values()), np.float64, n),
        },
        columns=list(COLUMNS),
    )
    return table.astype({"split": str, "site": str, "metric": str})

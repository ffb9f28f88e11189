"""Shared truth for the reliability suite: records whose content is a pure function of (site, step).

A writer in a child process sends :func:`make_record` records and appends each step to a log it
fsyncs; the test regenerates every record's expected content from its step alone, so the truth never
passes through the library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

#: (site, n_units, rows per record, pattern)
SITES = (("conv/relu", 13, 48, "channel"), ("fc.relu", 70, 6, "flat"))


def expected(site_index: int, step: int) -> dict[str, np.ndarray]:
    """The bits, labels and sample ids of record ``step`` of site ``SITES[site_index]``."""
    site, n_units, rows, _ = SITES[site_index]
    rng = np.random.default_rng([site_index, step])
    on = rng.random((rows, n_units)) < 0.4
    n_samples = rows // (8 if site_index == 0 else 1)
    return {
        "bits": np.packbits(on, axis=1, bitorder="little"),
        "labels": np.arange(n_samples, dtype=np.int64) % 5,
        "sample_ids": np.arange(n_samples, dtype=np.int64) + 1000 * step,
    }


# A child process: a ShardWriter fed with `expected` records forever (or `steps` of them, from
# `first_step`); each step is appended to LOG and fsynced after it was handed to the writer.
WRITER_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, {conftest_dir!r})
    from conftest import SITES, expected
    from actpat.recorder import shards
    from actpat.recorder.shards import Record, RecorderError, ShardWriter, SiteMeta

    out, log_path, steps, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    shards._WRITE_SECONDS = options.pop("write_seconds", shards._WRITE_SECONDS)
    step = first = options.pop("first_step", 0)
    metas = [SiteMeta(s, i, "ReLU", (n,), n, p) for i, (s, n, rows, p) in enumerate(SITES)]
    writer = ShardWriter(out, **options)
    writer.start()
    log = open(log_path, "a")
    print("started", flush=True)
    error = None
    try:
        while steps < 0 or step < first + steps:
            for i, meta in enumerate(metas):
                e = expected(i, step)
                writer.put(Record(meta, step, 0, "train", e["bits"], len(e["bits"]) // len(e["labels"]),
                                  len(e["labels"]), 0, sample_ids=e["sample_ids"], labels=e["labels"]))
            log.write(f"{{step}}\\n")
            log.flush()
            os.fsync(log.fileno())
            step += 1
        writer.close()
    except RecorderError as exc:
        error = str(exc)
        try:
            writer.close()
        except RecorderError:
            pass
    print(json.dumps({{"error": error, "finalized": [p.name for p in writer.finalized], "steps": step}}), flush=True)
    """
)


@pytest.fixture
def writer_child(tmp_path):
    """Write the child script; returns ``(argv builder)`` for ``subprocess``."""
    from pathlib import Path

    script = tmp_path / "writer_child.py"
    script.write_text(WRITER_CHILD.format(conftest_dir=str(Path(__file__).parent)))

    def argv(out, log, steps=-1, **options) -> list[str]:
        return [sys.executable, str(script), str(out), str(log), str(steps), json.dumps(options)]

    return argv


def run_child(argv: list[str], timeout: float = 120, preexec_fn=None) -> tuple[int, dict | None, str]:
    """Run a child to its end; returns its return code, its last JSON line and its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


def check_exact_or_reported(run) -> tuple[int, int]:
    """Assert every record ``run`` returns equals the truth; returns ``(records read, records lost)``.

    A record is identified by (site, step): each site writes one record per step, so a step read back
    holds exactly that record or nothing (when it was skipped, it must be listed in ``run.losses``).
    """
    names = [s[0] for s in SITES]
    read = 0
    for site in run.sites if run.splits else ():  # a crash may leave sites without a record
        index = names.index(site)
        for step in run.steps(site).tolist():
            got = run.read(site, step)
            if len(got) == 0:
                assert any(loss.site == site and loss.step == step for loss in run.losses), (site, step)
                continue
            truth = expected(index, step)
            np.testing.assert_array_equal(got.bits, truth["bits"], err_msg=f"{site} step {step}")
            rows_per_sample = len(truth["bits"]) // len(truth["labels"])
            np.testing.assert_array_equal(got.labels, np.repeat(truth["labels"], rows_per_sample))
            np.testing.assert_array_equal(got.sample_ids, np.repeat(truth["sample_ids"], rows_per_sample))
            read += 1
    lost = sum(loss.records or 0 for loss in run.losses)
    return read, lost


@pytest.fixture
def rel():
    """The helpers above, for test modules (``--import-mode=importlib`` cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        SITES=SITES, expected=expected, run_child=run_child, check_exact_or_reported=check_exact_or_reported
    )

"""Analysis on a real dask.distributed LocalCluster (2 worker processes) against the single-process results."""

import logging
import shutil

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

from actpat.analysis import analyze_run, summarize  # noqa: E402
from actpat.analysis.cli import main  # noqa: E402
from actpat.recorder.reader import open_run  # noqa: E402
from actpat.recorder.shards import Record, ShardWriter, SiteMeta  # noqa: E402

pytestmark = pytest.mark.slow

SITES = (
    (SiteMeta("stem.relu", 0, "ReLU", (16, 3, 3), 16, "channel"), 9),
    (SiteMeta("block.relu", 1, "ReLU", (40, 2, 2), 40, "channel"), 4),
    (SiteMeta("head.relu", 2, "ReLU", (70,), 70, "flat"), 1),
)
N_SAMPLES = 24  # per rank


def write_run(path, ranks=3, steps=40):
    """Probe records of ``ranks`` processes, each in several shards, one unlabelled sample per rank."""
    rng = np.random.default_rng(7)
    for rank in range(ranks):
        writer = ShardWriter(path, rank=rank, max_shard_bytes=30_000)
        writer.start()
        ids = np.arange(rank * N_SAMPLES, (rank + 1) * N_SAMPLES)
        labels = ids % 4
        labels[0] = -1
        for meta, n_positions in SITES:
            units = rng.integers(0, 2, (N_SAMPLES * n_positions, meta.n_units))
            for step in range(steps):
                units = units ^ (rng.random(units.shape) < 0.02)
                bits = np.packbits(units.astype(np.uint8), axis=1, bitorder="little")
                writer.put(Record(meta, 10 * step, step // 8, "probe", bits, n_positions, N_SAMPLES, 0,
                                  sample_ids=ids, labels=labels))
        writer.close()


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask_run")
    write_run(path)
    run = open_run(path)
    assert len(run.shards) > 6 and len({p.name.split("-")[1] for p in run.shards}) == 3
    return path


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_summarize_on_the_cluster_equals_one_process(run_path, client):
    local = summarize(run_path, progress=False)
    on_cluster = summarize(run_path, progress=False, client=client)
    pd.testing.assert_frame_equal(local, on_cluster)
    assert len(local) > 1000


def test_one_pass_on_the_cluster_equals_one_process(run_path, client, caplog):
    local = analyze_run(run_path, progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actpat"):
        remote = analyze_run(open_run(run_path), progress=False, client=client)
    pd.testing.assert_frame_equal(local.metrics, remote.metrics)
    pd.testing.assert_frame_equal(local.information_plane, remote.information_plane)
    for site, per_step in local.firing_rates.items():
        assert per_step.keys() == remote.firing_rates[site].keys()
        for step, rates in per_step.items():
            np.testing.assert_array_equal(rates, remote.firing_rates[site][step])
    # What the workers logged arrives here, once per message, logged by this process.
    unlabelled = [r for r in caplog.records if "have no label" in r.getMessage()]
    assert unlabelled and len(unlabelled) == len({r.getMessage() for r in unlabelled})
    assert {r.processName for r in unlabelled} == {"MainProcess"}


def test_cli_scheduler_flag(run_path, client, tmp_path, capsys):
    address = client.scheduler.address
    out = tmp_path / "remote.csv"
    assert main(["analyze", str(run_path), "-o", str(out), "--scheduler", address, "--no-progress"]) == 0
    assert main(["analyze", str(run_path), "-o", str(tmp_path / "local.csv"), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(tmp_path / "local.csv"))
    with pytest.raises(SystemExit):
        main(["analyze", str(run_path), "-o", str(out), "--scheduler", address, "--jobs", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_scheduler_without_workers_says_so(run_path, tmp_path, capsys):
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        argv = ["analyze", str(run_path), "-o", str(tmp_path / "m.csv"), "--scheduler", cluster.scheduler_address]
        assert main(argv + ["--scheduler-wait", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none joined it within 1 s" in err and "dask worker" in err and "--scheduler-wait" in err
    assert "Traceback" not in err


def test_workers_that_cannot_see_the_run_say_so(run_path, client, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_path, moved)
    run = open_run(moved)
    shutil.rmtree(moved)  # the client's index stays, the files are gone for the workers
    with pytest.raises(FileNotFoundError, match="same path"):
        summarize(run, progress=False, client=client)

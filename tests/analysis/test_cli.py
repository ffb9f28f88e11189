"""The `actpat` command line on a real recorded run."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from actpat.analysis.cli import main
from actpat.recorder import ActivationRecorder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run")
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU())
    x = torch.randn(40, 5)
    with ActivationRecorder(model, path) as rec:
        for step in range(3):
            with rec.capture(step, labels=torch.arange(40) % 2, sample_ids=torch.arange(40), split="probe"):
                model(x)
            with torch.no_grad():
                model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))
    return path


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "actpat.analysis.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "info", "analyze", "plot", "tensorboard", "report"):
        assert command in out.stdout


def test_info_reports_sites_steps_and_observations(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "format version: 2" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert set(lines) == {"1", "3"}
    assert "3/120" in lines["1"].replace(" ", "")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_analyze_writes_entropy_equal_to_brute_force(run_dir, tmp_path, suffix):
    out = tmp_path / f"metrics{suffix}"
    assert main(["analyze", str(run_dir), "-o", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out, dtype={"site": str}) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    from actpat.recorder import open_run

    p = open_run(run_dir).read("1", 2, split="probe")
    counts = np.array(list(Counter(map(tuple, p.unpack().tolist())).values()), dtype=float)
    prob = counts / counts.sum()
    got = df.query("site == '1' and step == 2 and metric == 'entropy'")["value"].item()
    assert got == pytest.approx(-(prob * np.log2(prob)).sum(), abs=1e-12)


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.csv")]) == 2
    assert "the run is empty" in capsys.readouterr().err
    (tmp_path / "patterns-rank000-00000.h5").write_bytes(b"not hdf5")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "patterns-rank000-00000.h5" in err and "Move the file" in err
    assert main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.txt")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err


def test_plot_writes_headline_heatmaps(run_dir, tmp_path):
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "figs"), "--no-progress"]) == 0
    names = {p.name for p in (tmp_path / "figs").glob("*.png")}
    assert {"heatmap_normalized_entropy.png", "heatmap_jaccard_init.png", "heatmap_weighted_jaccard_final.png"} <= names
    assert "information_plane.png" in names
    assert all((tmp_path / "figs" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_tensorboard_export_scalars_and_histograms_read_back(run_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["tensorboard", str(run_dir), "--logdir", str(tmp_path), "--no-progress"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    from actpat.recorder import open_run

    p = open_run(run_dir).read("3", 1, split="probe")
    on = p.unpack()
    (event,) = [e for e in acc.Scalars("actpat/firing_rate_mean/3") if e.step == 1]
    assert event.value == pytest.approx(on.mean(), rel=1e-6)
    (hist,) = [h for h in acc.Histograms("actpat/firing_rate/3") if h.step == 1]
    assert hist.histogram_value.num == 3
    # A second export into the same run is refused rather than duplicating events.
    assert main(["tensorboard", str(run_dir), "--logdir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--run-name" in err and "run_name" not in err


def test_demo_fast_trains_records_and_exports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "open it with:  tensorboard --logdir" in out
    df = pd.read_csv(tmp_path / "metrics.csv", dtype={"site": str})
    assert {"net.2", "net.5", "net.8"} <= set(df["site"])
    assert (tmp_path / "figures" / "heatmap_normalized_entropy.png").stat().st_size > 0
    assert list(tmp_path.glob("logs/version_0/actpat-offline/events.out.tfevents.*"))

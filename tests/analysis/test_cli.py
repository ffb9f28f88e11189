"""The `actpat` command line on a real recorded run."""

import itertools
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from actpat.analysis.compare import common_split, compare
from actpat.analysis.cli import main
from actpat.recorder import ActivationRecorder, open_run, schema


def record_mlp(path, seed: int, split: str = "probe") -> None:
    """Three steps of a small MLP (sites "1" and "3") whose first layer drifts between steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU())
    x = torch.randn(40, 5)
    with ActivationRecorder(model, path) as rec:
        for step in range(3):
            with rec.capture(step, labels=torch.arange(40) % 2, sample_ids=torch.arange(40), split=split):
                model(x)
            with torch.no_grad():
                model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    record_mlp(path, seed=0)
    return path


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "actpat.analysis.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "info", "analyze", "plot", "tensorboard", "report"):
        assert command in out.stdout


def test_info_reports_sites_steps_and_observations(run_dir, capsys):
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"format version: {schema.FORMAT_VERSION} (" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert set(lines) == {"1", "3"}
    assert "3/120" in lines["1"].replace(" ", "")
    assert lines["1"].split()[4] == open_run(run_dir).site_info("1")["pattern"]  # how the site was cut into patterns


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_analyze_writes_entropy_equal_to_brute_force(run_dir, tmp_path, suffix):
    out = tmp_path / f"metrics{suffix}"
    assert main(["analyze", str(run_dir), "-o", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out, dtype={"site": str}) if suffix == ".csv" else pd.read_parquet(out)
    assert list(df.columns) == ["step", "epoch", "split", "site", "site_index", "metric", "value"]
    p = open_run(run_dir).read("1", 2, split="probe")
    counts = np.array(list(Counter(map(tuple, p.unpack().tolist())).values()), dtype=float)
    prob = counts / counts.sum()
    got = df.query("site == '1' and step == 2 and metric == 'entropy'")["value"].item()
    assert got == pytest.approx(-(prob * np.log2(prob)).sum(), abs=1e-12)


def test_a_run_whose_every_step_is_lost_fails_each_command_instead_of_writing_nothing(tmp_path, capsys):
    """A step whose end never reached the disk is lost; a run of nothing else has no number to give: each command
    says so (it wrote an empty table and "0 figures" with exit code 0)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    run = tmp_path / "run"
    with ActivationRecorder(model, run) as rec:
        with rec.capture(0, labels=torch.arange(6) % 2, split="probe", ends_step=False):  # never ended
            model(torch.randn(6, 4))
    commands = {
        "analyze": ["-o", str(tmp_path / "m.csv")],
        "plot": ["-o", str(tmp_path / "figures")],
        "tensorboard": ["--logdir", str(tmp_path / "tb")],
        "report": ["-o", str(tmp_path / "report")],
    }
    for command, options in commands.items():
        assert main([command, str(run), *options, "--no-progress"]) == 2, command
        err = capsys.readouterr().err
        assert f"actpat {command}: error: Expected steps to measure in split 'probe'" in err
        assert "none could be measured" in err and "actpat info" in err
    assert not (tmp_path / "m.csv").exists()


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "patterns-rank000-00000.h5").write_bytes(b"")  # a shard for its run
    assert main(["info", str(tmp_path / "patterns-rank000-00000.h5")]) == 2
    assert f"is a shard file. Pass the folder that holds it and the run's other shards, '{tmp_path}'" in capsys.readouterr().err
    (tmp_path / "patterns-rank000-00000.h5").unlink()
    assert main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.csv")]) == 2
    assert "the run is empty" in capsys.readouterr().err
    (tmp_path / "patterns-rank000-00000.h5").write_bytes(b"not hdf5")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "patterns-rank000-00000.h5" in err and "Move the file" in err
    assert main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.txt")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err


HEADLINE = {"heatmap_normalized_entropy.png", "heatmap_jaccard_init.png", "heatmap_weighted_jaccard_final.png"}


def read_table(path):
    return pd.read_csv(path, dtype={"site": str, "split": str, "metric": str})


@pytest.fixture(scope="module")
def metrics_csv(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "metrics.csv"
    assert main(["analyze", str(run_dir), "-o", str(out), "--no-progress"]) == 0
    return out


def test_analyze_table_holds_the_information_plane(run_dir, metrics_csv, tmp_path):
    from actpat.analysis import information_plane

    df = read_table(metrics_csv)
    plane = information_plane(run_dir, split="probe")
    assert {"input_information", "mutual_information"} <= set(plane["metric"])
    # Every number of the plane is in the table exactly once (the sites' observations are whole samples,
    # so the metric table's mutual_information is the plane's own).
    keys = ["site", "step", "metric"]
    assert not df.duplicated(keys).any()
    both = plane.merge(df, on=keys, suffixes=("_plane", "_table"), validate="one_to_one")
    assert len(both) == len(plane)
    np.testing.assert_allclose(both["value_table"], both["value_plane"], rtol=0, atol=1e-12)
    out = tmp_path / "no_plane.csv"
    assert main(["analyze", str(run_dir), "-o", str(out), "--no-progress", "--no-information-plane"]) == 0
    assert not read_table(out)["metric"].str.startswith("input_information").any()


def test_plot_from_the_metrics_table_without_the_run(metrics_csv, tmp_path):
    assert main(["plot", "--metrics", str(metrics_csv), "-o", str(tmp_path / "figs"), "--no-progress"]) == 0
    names = {p.name for p in (tmp_path / "figs").glob("*.png")}
    assert HEADLINE <= names and "information_plane.png" in names
    assert all((tmp_path / "figs" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_tensorboard_export_scalars_and_histograms_read_back(run_dir, metrics_csv, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["tensorboard", str(run_dir), "--metrics", str(metrics_csv), "--logdir", str(tmp_path), "--no-progress",
            "--no-figures"]
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    assert not acc.Tags()["images"]  # --no-figures: no figure drawn (the report's test reads the figures back)
    p = open_run(run_dir).read("3", 1, split="probe")
    on = p.unpack()
    (event,) = [e for e in acc.Scalars("actpat/firing_rate_mean/3") if e.step == 1]
    assert event.value == pytest.approx(on.mean(), rel=1e-6)
    (hist,) = [h for h in acc.Histograms("actpat/firing_rate/3") if h.step == 1]
    assert hist.histogram_value.num == 3
    assert hist.histogram_value.sum == pytest.approx(on.mean(axis=0).sum(), rel=1e-6)
    # A second export into the same run is refused before any work, in the command's own flags.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--run-name" in err and "run_name" not in err


def test_report_writes_table_figures_and_events_from_one_pass(run_dir, metrics_csv, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from actpat.recorder.reader import Run

    reads = Counter()
    real = Run.read
    monkeypatch.setattr(Run, "read", lambda self, site, step, split: reads.update([(site, step)]) or real(self, site, step, split))
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "-o", str(out), "--no-progress"]) == 0
    assert set(reads.values()) == {1} and len(reads) == 2 * 3  # each (site, step) record read once
    monkeypatch.undo()
    pd.testing.assert_frame_equal(read_table(out / "metrics.csv"), read_table(metrics_csv))
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    assert {n.removesuffix(".png") for n in HEADLINE} | {"information_plane"} <= figures
    acc = EventAccumulator(str(out / "tensorboard" / "actpat-offline"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert {t.removeprefix("actpat/figures/") for t in acc.Tags()["images"]} == figures
    assert acc.Histograms("actpat/firing_rate/1")
    capsys.readouterr()
    assert main(["report", str(run_dir), "-o", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unwritable_output_fails_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    from actpat.recorder.reader import Run

    def no_read(*args, **kwargs):
        raise AssertionError("the run was read before the output was checked")

    monkeypatch.setattr(Run, "read", no_read)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (
        ["analyze", str(run_dir), "-o", str(blocker / "metrics.csv")],
        ["plot", str(run_dir), "-o", str(blocker / "figs")],
        ["tensorboard", str(run_dir), "--logdir", str(blocker)],
        ["report", str(run_dir), "-o", str(blocker)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "writable directory" in err and str(blocker) in err, argv
    assert main(["plot", "-o", str(tmp_path / "figs")]) == 2
    assert "RUN directory or --metrics" in capsys.readouterr().err


def write_run(path, splits=("probe",)):
    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    writer = ShardWriter(path)
    writer.start()
    meta = SiteMeta("fc", 0, "ReLU", (4,), 4, "flat")
    for split in splits:
        for step in range(2):
            bits = np.array([[step], [3], [5], [5]], dtype=np.uint8)
            writer.put(Record(meta, step, 0, split, bits, 1, 4, 0, sample_ids=np.arange(4), labels=np.arange(4) % 2))
    writer.close()


def test_finds_the_run_below_a_lightning_log_folder(tmp_path, capsys):
    version = tmp_path / "lightning_logs" / "version_0"
    write_run(version / "activation_patterns")
    (version / "checkpoints").mkdir()
    assert main(["info", str(version)]) == 0
    captured = capsys.readouterr()
    assert f"reading the run in {version / 'activation_patterns'}" in captured.err
    assert "fc" in captured.out
    write_run(tmp_path / "lightning_logs" / "version_1" / "activation_patterns")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "found 2" in err and "version_0" in err and "version_1" in err


def test_split_flag_defaults_to_the_only_split_and_names_the_choices(tmp_path, capsys):
    write_run(tmp_path / "one", splits=("train",))
    assert main(["analyze", str(tmp_path / "one"), "-o", str(tmp_path / "one.csv"), "--no-progress"]) == 0
    assert set(read_table(tmp_path / "one.csv")["split"]) == {"train"}
    write_run(tmp_path / "two", splits=("probe", "train"))
    assert main(["analyze", str(tmp_path / "two"), "-o", str(tmp_path / "two.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--split" in err and "['probe', 'train']" in err and "`split`" not in err
    assert main(["analyze", str(tmp_path / "two"), "-o", str(tmp_path / "two.csv"), "--split", "val"]) == 2
    assert "Expected --split to be one of the recorded splits ['probe', 'train'], but got 'val'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "two"), "-o", str(tmp_path / "cmp"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--split probe" in err and "split=" not in err
    # A table of one split says which split the run's histograms are of: no --split needed.
    assert main(["analyze", str(tmp_path / "two"), "-o", str(tmp_path / "probe.csv"), "--split", "probe",
                 "--no-progress"]) == 0
    assert main(["tensorboard", str(tmp_path / "two"), "--metrics", str(tmp_path / "probe.csv"), "--logdir",
                 str(tmp_path / "tb"), "--no-progress", "--no-figures"]) == 0
    capsys.readouterr()
    # The table's split must be one of the run's: another run's table fails before any work, in the flag's words.
    assert main(["tensorboard", str(tmp_path / "one"), "--metrics", str(tmp_path / "probe.csv"), "--logdir",
                 str(tmp_path / "tb1"), "--no-progress"]) == 2
    assert "Expected --split to be one of the recorded splits ['train'], but got 'probe'" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_jobs_flag_is_checked_by_the_parser(tmp_path, capsys, jobs):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.csv"), "--jobs", jobs])
    assert exit_info.value.code == 2
    assert "--jobs" in capsys.readouterr().err


PROBE = """
import json, sys
from actpat.analysis.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    print("RC", rc)
    print("MODULES", " ".join(sorted(sys.modules)))
"""


def loaded_modules(*commands: list[str]) -> list[set[str]]:
    """The modules loaded after each command, run one after the other in one fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True, timeout=300)
    lines = [line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("RC ", "MODULES "))]
    assert [rc for key, rc in lines if key == "RC"] == ["0"] * len(commands), out.stderr
    return [set(modules.split()) for key, modules in lines if key == "MODULES"]


@pytest.mark.slow
def test_read_only_commands_import_neither_torch_nor_lightning(tmp_path):
    write_run(tmp_path / "run")
    heavy = {"torch", "pytorch_lightning", "lightning"}
    # Each command may load what those before it may not: run in this order, a module one loads is seen
    # at its own check, never excused by an earlier command.
    checks = (
        (["--help"], {"h5py", "pandas", "matplotlib", "scipy", "tensorboard"}),
        (["info", str(tmp_path / "run")], {"pandas", "matplotlib", "scipy", "tensorboard"}),
        (["analyze", str(tmp_path / "run"), "-o", str(tmp_path / "m.csv"), "--no-progress"], {"matplotlib"}),
        (["tensorboard", str(tmp_path / "run"), "--logdir", str(tmp_path / "tb"), "--no-progress"], set()),
    )
    loaded = loaded_modules(*(argv for argv, _ in checks))
    for (argv, also_absent), modules in zip(checks, loaded):
        assert not (heavy | also_absent) & modules, (argv, (heavy | also_absent) & modules)
        if argv[0] == "info":
            assert "h5py" in modules  # the check above can see what a command imports


def test_demo_fast_trains_records_and_exports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--fast"]) == 0
    out = capsys.readouterr().out
    assert "open it with:  tensorboard --logdir" in out
    df = pd.read_csv(tmp_path / "metrics.csv", dtype={"site": str})
    assert {"net.2", "net.5", "net.8"} <= set(df["site"])
    assert (tmp_path / "figures" / "heatmap_normalized_entropy.png").stat().st_size > 0
    assert list(tmp_path.glob("logs/version_0/actpat-offline/events.out.tfevents.*"))


def test_a_large_table_is_written_in_parts_equal_to_one_write(metrics_csv, tmp_path, monkeypatch):
    from actpat.analysis import cli

    df = read_table(metrics_csv)
    monkeypatch.setattr(cli, "_CSV_ROWS_PER_WRITE", 7)
    cli._write_table(df, tmp_path / "parts.csv", progress=True)
    assert (tmp_path / "parts.csv").read_text() == metrics_csv.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["parts.csv"]


# ---------------------------------------------------------------------- info on a damaged run
def _damaged_run(path):
    """Two records of one site; the writer noted why it stopped; then one byte of step 1's bits flipped."""
    import h5py

    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    writer = ShardWriter(path)
    writer.start()
    for step in (0, 1):
        bits = np.arange(4, dtype=np.uint8).reshape(4, 1) + step
        writer.put(Record(meta, step, 0, "probe", bits, 1, 4, 0, labels=np.array([0, 1, 0, 1])))
    writer.record_stop("the disk filled up")
    writer.close()
    (shard,) = path.glob("*.h5")
    with h5py.File(shard, "r+") as f:
        group = f["sites"][schema.site_key("fc")]
        row = int(group["records"][1]["row_start"])
        group["bits"][row] = group["bits"][row] ^ 0xFF
    return shard


def test_info_reports_stop_reasons_and_with_verify_the_corrupt_records(tmp_path, capsys):
    shard = _damaged_run(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stopped early:  rank 0: the disk filled up" in out
    assert "corrupt:        0 records" in out and "--verify" in out  # nothing read yet
    assert main(["info", str(tmp_path), "--verify", "--no-progress"]) == 1  # a check scripts can use
    out = capsys.readouterr().out
    assert "corrupt:        1 records (every record verified)" in out
    assert f"corrupt    {shard.name} fc/probe/1:" in out
    # The damaged step is reported missing by the analysis too, never read as numbers.
    assert main(["analyze", str(tmp_path), "-o", str(tmp_path / "m.csv"), "--no-progress"]) == 0
    assert read_table(tmp_path / "m.csv")["step"].unique().tolist() == [0]


# ---------------------------------------------------------------------- plot, compare, replay
def test_plot_selects_metrics_sites_format_and_labels(run_dir, metrics_csv, tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["plot", str(run_dir), "--metrics", str(metrics_csv), "-o", str(out), "--metric", "entropy",
            "--metric", "distinct", "--site", "3", "--format", "svg", "--dpi", "50", "--site-labels", "--no-progress"]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"curves_entropy.svg", "curves_distinct.svg", "heatmap_entropy.svg", "heatmap_distinct.svg"}
    curve = (out / "curves_entropy.svg").read_text()
    assert "3 (ReLU, 3)" in curve and "1 (ReLU, 6)" not in curve  # only site 3, labelled with type and width
    # A typo fails before any work: the run is not analysed.
    from actpat.recorder.reader import Run

    reads = []
    real = Run.read
    Run.read = lambda self, *a: reads.append(a) or real(self, *a)
    try:
        assert main(["plot", str(run_dir), "-o", str(tmp_path / "typo"), "--metric", "entropi"]) == 2
    finally:
        Run.read = real
    assert "Expected --metric to name metrics" in capsys.readouterr().err and not reads
    assert main(["plot", "--metrics", str(metrics_csv), "-o", str(out), "--site", "9"]) == 2
    assert "Expected --site among the table's sites ['1', '3']" in capsys.readouterr().err


def test_compare_writes_the_convergence_table_of_grouped_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    record_mlp(other, seed=1)
    out = tmp_path / "cmp"
    argv = ["compare", f"mlp={run_dir}", f"mlp={other}", "-o", str(out), "--subsets", "2", "--no-progress",
            "--units", "3", "--observations", "7", "--stay"]
    assert main(argv) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert runs["run"].tolist() == ["mlp/0", "mlp/1"] and set(runs["group"]) == {"mlp"}
    convergence = pd.read_csv(out / "convergence.csv", dtype={"site": str})
    assert set(convergence["run"]) == {"mlp/0", "mlp/1"} and set(convergence["site"]) == {"1", "3"}
    assert convergence["stay"].all()
    metrics = pd.read_csv(out / "metrics.csv")
    sizes = metrics[metrics["metric"].isin(["wc_units", "wc_observations"])].groupby("metric")["value"].unique()
    assert sizes["wc_units"].tolist() == [3] and sizes["wc_observations"].tolist() == [7]
    assert "wrote" in capsys.readouterr().out


def test_compare_indexes_each_run_once(run_dir, tmp_path, monkeypatch):
    """The checks made before any work and the comparison share the opened runs: indexing a run reads every
    shard's records tables, which for a long run is most of the time a comparison takes."""
    from actpat.recorder import reader

    opened = []
    index = reader.Run.__init__
    monkeypatch.setattr(reader.Run, "__init__", lambda self, path, **kw: opened.append(path) or index(self, path, **kw))
    other = tmp_path / "other"
    record_mlp(other, seed=1)
    argv = ["compare", str(run_dir), str(other), "-o", str(tmp_path / "cmp"), "--subsets", "2", "--no-progress",
            "--units", "3", "--split", "probe"]
    assert main(argv) == 0
    assert sorted(map(str, opened)) == sorted([str(run_dir), str(other)])


def test_compare_refuses_subset_sizes_beyond_the_runs_in_the_flags_words_before_any_work(run_dir, tmp_path, capsys):
    from actpat.analysis.width import subset_sizes

    units, observations = subset_sizes([run_dir])
    for flag, value, limit in (("--observations", observations + 1, observations), ("--units", units + 1, units)):
        out = tmp_path / flag.strip("-")
        assert main(["compare", str(run_dir), "-o", str(out), "--no-progress", flag, str(value)]) == 2
        err = capsys.readouterr().err
        assert f"Expected {flag} between 1 and {limit}" in err and "n_obs" not in err
        assert not list(out.iterdir())  # nothing written


def test_compare_refuses_runs_whose_only_splits_differ_before_any_work(run_dir, tmp_path, capsys):
    record_mlp(tmp_path / "train", seed=1, split="train")
    out = tmp_path / "cmp"
    assert main(["compare", str(run_dir), str(tmp_path / "train"), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "only splits differ" in err and "only 'probe'" in err and "only 'train'" in err
    assert not list(out.iterdir())  # nothing written
    with pytest.raises(ValueError, match="only splits differ"):
        compare([run_dir, tmp_path / "train"], progress=False)
    with pytest.raises(ValueError, match="at least one run"):
        common_split([])
    assert main(["compare", str(run_dir), str(tmp_path / "train"), "-o", str(out), "--no-progress", "--split", "probe"]) == 2
    assert f"Run {tmp_path / 'train'}: Expected --split to be one of the recorded splits ['train']" in capsys.readouterr().err


def test_compare_names_a_bare_directory_as_typed_even_when_the_run_is_inside_it(run_dir, tmp_path, monkeypatch):
    version = tmp_path / "logs" / "version_0"  # the Lightning log folder around a run directory
    version.mkdir(parents=True)
    record_mlp(version / "activation_patterns", seed=1)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", "logs/version_0", str(run_dir), "-o", str(out), "--subsets", "2", "--no-progress"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert runs["run"].tolist() == ["logs/version_0", str(run_dir)]


def test_compare_takes_directories_whose_names_hold_an_equals_sign(tmp_path, monkeypatch):
    """Sweep folders (``lr=0.3/seed=0``), bare or as GROUP=DIR: the command split at the last ``=`` and failed
    ("'0' does not exist"), while parse_runs splits at the first."""
    for seed in (0, 1, 2):
        record_mlp(tmp_path / "sweep" / "lr=0.3" / f"seed={seed}", seed=seed)
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "a=sweep/lr=0.3/seed=0", "a=sweep/lr=0.3/seed=1", "sweep/lr=0.3/seed=2", "-o", "cmp",
            "--subsets", "2", "--no-progress"]
    assert main(argv) == 0
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert runs["run"].tolist() == ["a/0", "a/1", "sweep/lr=0.3/seed=2"]
    assert runs["path"].tolist() == [f"sweep/lr=0.3/seed={seed}" for seed in (0, 1, 2)]


def test_replay_is_a_command_with_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--module" in out and "--probe" in out and "CKPT_DIR" in out.replace("ckpt_dir", "CKPT_DIR")


def test_info_prints_the_format_version_of_each_shard(tmp_path, capsys):
    """A run continued after an upgrade mixes versions: info says which, not the library's own."""
    import h5py

    from actpat.recorder.shards import Record, ShardWriter, SiteMeta

    meta = SiteMeta("fc", 0, "ReLU", (8,), 8, "flat")
    for step in (0, 1):  # one writer per step: two shards
        writer = ShardWriter(tmp_path)
        writer.start()
        writer.put(Record(meta, step, 0, "probe", np.zeros((4, 1), dtype=np.uint8), 1, 4, 0))
        writer.close()
    with h5py.File(tmp_path / schema.shard_name(0, 0), "r+") as handle:  # as version 2 wrote it
        handle.attrs["format_version"] = 2
        del handle.attrs["compression"]
        for group in handle["sites"].values():
            records = group["records"][()]
            names = schema.RECORD_FIELDS[2]
            old = np.zeros(len(records), dtype=[(n, schema.RECORD_DTYPE[n]) for n in names])
            for name in names:
                old[name] = records[name]
            del group["records"]
            group.create_dataset("records", data=old, maxshape=(None,), chunks=(256,))
    assert main(["info", str(tmp_path)]) == 0
    assert f"format version: 2 (1 shard), {schema.FORMAT_VERSION} (1 shard)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["plot", "tensorboard"])
def test_plot_and_tensorboard_of_a_run_read_each_record_once(run_dir, tmp_path, monkeypatch, command):
    from actpat.analysis import plots
    from actpat.recorder.reader import Run

    reads = Counter()
    real = Run.read
    monkeypatch.setattr(Run, "read", lambda self, site, step, split: reads.update([(site, step)])
                        or real(self, site, step, split))  # fmt: skip
    # Figures are drawn from the table, after the reads: one suffices here (47 took most of the time).
    out = ["-o", str(tmp_path / "figs")] if command == "plot" else ["--logdir", str(tmp_path / "tb")]
    iter_figures = plots.iter_figures
    monkeypatch.setattr(plots, "iter_figures", lambda *a, **k: itertools.islice(iter_figures(*a, **k), 1))
    assert main([command, str(run_dir), *out, "--no-progress"]) == 0
    assert set(reads.values()) == {1} and len(reads) == 2 * 3


def test_info_into_a_closed_pipe_ends_quietly(run_dir, monkeypatch):
    """`actpat info RUN | head -1` on a large run: the reader goes away mid-output."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return write_end

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["info", str(run_dir)]) == 1  # no traceback
    finally:
        os.close(write_end)

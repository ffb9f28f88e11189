"""The ``actpat`` command line: inspect, analyse, plot and export recorded runs, and run the demo.

Commands that only read shards (``info``, ``analyze``, ``plot``, ``tensorboard``, ``report``) import
neither torch nor Lightning: this module imports nothing heavy at the top, and each command imports
what it uses when it runs (``--help`` and ``info`` cost little more than importing h5py). The commands
that train (``demo``) live torch-side, in :mod:`actpat.callbacks.demo`, and are imported only inside
their command function.

Commands that analyse read each record once (:func:`actpat.analysis.analyze_run`), in this process, in
``--jobs`` local processes, or on a Dask cluster (``--scheduler ADDRESS``; the run directory must be at
the same path on every worker). ``plot`` and ``tensorboard`` take the table ``analyze`` wrote
(``--metrics``) instead of analysing again; ``report`` writes the table, the figures and the TensorBoard
events from one pass.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

TABLE_SUFFIXES = (".csv", ".parquet")
DEFAULT_RUN_NAME = "actpat-offline"
# How deep below a given folder to look for a run directory (lightning_logs/version_0/activation_patterns).
_SEARCH_DEPTH = 4
_LOSSES_SHOWN = 20  # loss lines `actpat info` prints without --all-losses
# Seconds a Ctrl-C leaves the command to stop on its own before it is made to exit.
_EXIT_GRACE_SECONDS = 20
# How long --scheduler waits to connect, and for a first worker, unless --scheduler-wait says otherwise.
_DASK_WAIT_SECONDS = 20.0
# A table larger than this is written in parts, with a progress bar.
_CSV_ROWS_PER_WRITE = 500_000


class CommandError(ValueError):
    """A mistake in the command line, told in the command's own flags."""


# ---------------------------------------------------------------------------------- runs
def locate_run(path: Path) -> Path:
    """The run directory at ``path``, or the only one in a folder below it (e.g. a Lightning log folder).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist (``NotADirectoryError``: a file, such as a shard).
    CommandError
        No shards at or below ``path``, or several run directories below it.
    """
    from actpat.recorder.reader import find_runs, not_a_run_dir

    path = Path(path)
    if not path.is_dir():
        raise not_a_run_dir(path)

    found = find_runs(path, _SEARCH_DEPTH)
    if not found:
        raise CommandError(
            f"Expected shards (patterns-rank*.h5) in {path} or a folder below it, but found none: the run is empty. "
            "Check the path; a recorder writes its first shard when its first record arrives."
        )
    if len(found) > 1:
        listing = "\n  ".join(str(p) for p in found)
        raise CommandError(f"Expected one run directory under {path}, but found {len(found)}; pass one of:\n  {listing}")
    if found[0] != path:
        print(f"actpat: reading the run in {found[0]}", file=sys.stderr)
    return found[0]


def _open(path: Path):
    from actpat.recorder import open_run

    return open_run(locate_run(path))


def _split(run, split: str | None) -> str:
    """The split of ``run`` that --split names (None: the run's only one), or a CommandError in the flag's words."""
    try:
        return run.resolve_split(split, name="--split")
    except ValueError as exc:
        raise CommandError(str(exc)) from None


# ---------------------------------------------------------------------------------- outputs
def _check_writable_dir(directory: Path, flag: str) -> None:
    """Create ``directory`` and prove a file can be written there, before any work."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise CommandError(f"Expected {flag} {str(directory)!r} to be a writable directory, but {exc}.") from None


def _check_table_path(path: Path, flag: str) -> None:
    if path.suffix not in TABLE_SUFFIXES:
        raise CommandError(f"Expected {flag} to end in .csv or .parquet, but got {str(path)!r}.")
    if path.is_dir():
        raise CommandError(f"Expected {flag} to be a file, but {str(path)!r} is a directory.")
    if path.suffix == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise CommandError(f"Writing .parquet needs pyarrow: `pip install actpat[parquet]`, or use {flag} *.csv.")
    _check_writable_dir(path.parent, flag)


def _check_events_dir(logdir: Path, run_name: str, overwrite: bool, flag: str) -> Path:
    if not run_name or run_name in (".", "..") or "/" in run_name or "\\" in run_name:
        raise CommandError(f"Expected --run-name to be a plain directory name, but got {run_name!r}.")
    target = logdir / run_name
    existing = sorted(target.rglob("events.out.tfevents.*")) if target.is_dir() else []
    if existing and not overwrite:
        raise CommandError(
            f"Expected no TensorBoard events in {target}, but it holds {len(existing)} event file(s) of an earlier "
            "export; writing again would duplicate every point. Pass --overwrite to replace them, or another "
            "--run-name."
        )
    _check_writable_dir(target, flag)
    return target


def _write_table(df, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    # Written beside and renamed: an interrupted command leaves no half table under the given name.
    partial = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix == ".parquet":
            df.to_parquet(partial, index=False)
        else:
            rows = _CSV_ROWS_PER_WRITE
            with open(partial, "w", newline="") as f, tqdm(
                total=len(df), desc=f"actpat {path.name}", unit="row", disable=not progress or len(df) <= rows
            ) as bar:
                for start in range(0, max(len(df), 1), rows):
                    part = df.iloc[start : start + rows]
                    part.to_csv(f, index=False, header=start == 0)
                    bar.update(len(part))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_table(path: Path, split: str | None):
    import pandas as pd

    if path.suffix not in TABLE_SUFFIXES:
        raise CommandError(f"Expected --metrics to end in .csv or .parquet, but got {str(path)!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"Expected --metrics {str(path)!r} to be a table written by `actpat analyze`, but "
                                "there is no such file.")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"split": str, "site": str, "metric": str})
    if split is not None:
        if split not in set(df.get("split", ())):
            raise CommandError(
                f"Expected --split to be one of the splits in {path} {sorted(set(df.get('split', ())))}, but got "
                f"{split!r}."
            )
        df = df[df["split"] == split]
    return df


# ---------------------------------------------------------------------------------- analysis
@contextlib.contextmanager
def _dask_client(address: str | None, wait: float | None = None):
    wait = _DASK_WAIT_SECONDS if wait is None else wait
    if address is None:
        yield None
        return
    try:
        import asyncio

        from distributed import Client
    except ImportError:
        raise CommandError("--scheduler needs dask.distributed: `pip install actpat[dask]`.") from None
    try:
        client = Client(address, timeout=f"{wait}s")
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
        raise CommandError(f"Expected a Dask scheduler at --scheduler {address}, but cannot connect: {exc}.") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=wait)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            raise CommandError(
                f"Expected a Dask scheduler with workers at --scheduler {address}, but none joined it within "
                f"{wait:g} s: start them (`dask worker {address}`), wait longer (--scheduler-wait), or drop --scheduler."
            ) from None
        yield client


def _analyze(args: argparse.Namespace, run, split: str, *, plane: bool = True, rates: bool = False):
    from actpat.analysis.pipeline import analyze_run

    with _dask_client(args.scheduler, args.scheduler_wait) as client:
        result = analyze_run(
            run, split, information_plane=plane, firing_rates=rates, n_classes=args.n_classes,
            n_jobs=args.jobs if client is None else 1, client=client, progress=not args.no_progress,
        )
    if result.metrics.empty:  # an empty table or no figure, said to be written, would look like a result
        raise CommandError(
            f"Expected steps to measure in split {split!r} of {run.path}, but none could be measured: the records of "
            "every step are lost or hold no observation (the warnings above say which; `actpat info` lists the losses)."
        )
    return result


def _rates(args: argparse.Namespace, run, split: str):
    from actpat.analysis.firing import firing_rates

    with _dask_client(args.scheduler, args.scheduler_wait) as client:
        return firing_rates(run, split, n_jobs=args.jobs if client is None else 1, client=client,
                            progress=not args.no_progress)


# ---------------------------------------------------------------------------------- commands
def _cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    run = _open(args.run_dir)
    if args.verify:
        run.verify(progress=not args.no_progress)
    size = sum(path.stat().st_size for path in run.shards)
    versions = Counter(info.format_version for info in run.shard_infos)
    partial = sum(not info.finalized for info in run.shard_infos)
    print(f"run:            {run.path}")
    print("format version: " + ", ".join(f"{v} ({n} shard{'s' * (n != 1)})" for v, n in sorted(versions.items())))
    print(f"shards:         {len(run.shards)} ({size / 1e6:.2f} MB on disk)"
          + (f", {partial} unfinalized (.partial)" if partial else ""))
    print(f"splits:         {', '.join(run.splits)}")
    print(f"dropped:        {run.dropped_records} records (backpressure)")
    checked = "every record verified" if args.verify else "records read so far; --verify checks every record"
    print(f"corrupt:        {run.corrupt_records} records ({checked})")
    if run.losses:
        print(f"lost:           {_count_losses(run.losses)}")
        # A run that dropped records under backpressure can lose thousands of steps: the first few, unless asked.
        shown = run.losses if args.all_losses else run.losses[:_LOSSES_SHOWN]
        for loss in shown:
            where = "/".join(str(v) for v in (loss.site, loss.split, loss.step) if v is not None)
            print(f"  {loss.kind:<10} {loss.path.name}{' ' + where if where else ''}: {loss.reason}")
        if len(shown) < len(run.losses):
            print(f"  ... and {len(run.losses) - len(shown)} more (--all-losses lists each)")
    for stop in run.stop_reasons:
        print(f"stopped early:  rank {stop.rank}: {stop.reason}")
    header = f"{'#':>3}  {'site':<28} {'type':<16} {'units':>6}  {'pattern':<12}  " + "  ".join(
        f"{split + ' steps/obs':>20}" for split in run.splits
    )
    print(header)
    for site in run.sites:
        info = run.site_info(site)
        cells = []
        for split in run.splits:
            steps = run.steps(site, split)
            cells.append(f"{len(steps):>8}/{run.n_observations(site, split):<11}")
        print(f"{info['site_index']:>3}  {site:<28} {info['module_type']:<16} {info['n_units']:>6}  {info['pattern']:<12}  "
              + "  ".join(cells))
    if run.losses:
        print("     (steps/obs count every step with records, those of the losses above included, which the "
              "analysis leaves out)")
    return 1 if args.verify and run.losses else 0


def _count_losses(losses) -> str:
    """Per kind of loss: how many, and the records they hold where known ("corrupt 2 (2 records)")."""
    by_kind: dict[str, list] = {}
    for loss in losses:
        by_kind.setdefault(loss.kind, []).append(loss.records)
    parts = []
    for kind, records in sorted(by_kind.items()):
        known, unknown = sum(r for r in records if r is not None), sum(r is None for r in records)
        sizes = [f"{known} record{'s' * (known != 1)}"] if unknown < len(records) else []
        sizes += [f"{unknown} of unknown size"] if unknown else []
        parts.append(f"{kind} {len(records)} ({', '.join(sizes)})")
    return ", ".join(parts)


def _cmd_analyze(args: argparse.Namespace) -> int:
    out: Path = args.output
    _check_table_path(out, "-o")
    run = _open(args.run_dir)
    split = _split(run, args.split)
    df = _analyze(args, run, split, plane=not args.no_information_plane).table()
    _write_table(df, out, not args.no_progress)
    print(f"wrote {len(df)} rows ({df['site'].nunique()} sites, {df['step'].nunique()} steps) to {out}")
    return 0


def _table_for(args: argparse.Namespace, *, rates: bool):
    """The metric table, the firing rates (if asked) and the information plane (None from --metrics: the
    table's own flat-site plane is drawn), from --metrics or from one pass over RUN."""
    if args.metrics is None and args.run_dir is None:
        raise CommandError("Expected a RUN directory or --metrics TABLE, but got neither.")
    if args.metrics is not None:
        df = _read_table(args.metrics, args.split)
        if not rates:
            if args.run_dir is not None:
                print(f"actpat: plotting the table {args.metrics}; the run is not read.", file=sys.stderr)
            return df, None, None
        if args.run_dir is None:
            print("actpat: no RUN given with --metrics: firing-rate histograms left out.", file=sys.stderr)
            return df, None, None
        run = _open(args.run_dir)
        splits = set(df.get("split", ()))
        table_split = splits.pop() if args.split is None and len(splits) == 1 else args.split  # the table's own
        return df, _rates(args, run, _split(run, table_split)), None
    run = _open(args.run_dir)
    result = _analyze(args, run, _split(run, args.split), rates=rates)
    return result.table(), result.firing_rates, result.information_plane


def _check_metric_names(args: argparse.Namespace) -> None:
    """--metric names the registry does not know fail before any work (a typo costs no analysis)."""
    from actpat.analysis.metrics import METRICS

    unknown = [m for m in args.metric or () if m not in METRICS]
    if unknown:
        raise CommandError(f"Expected --metric to name metrics of actpat.analysis.metrics, but got {unknown}; "
                           f"known: {', '.join(sorted(METRICS))}.")


def _figure_options(args: argparse.Namespace, df) -> dict:
    """The figure flags of ``plot`` as arguments of :func:`actpat.analysis.plots.save_all`, checked before
    drawing."""
    from actpat.analysis import plots

    present_metrics, present_sites = set(df["metric"]), list(dict.fromkeys(df["site"]))
    unknown = [m for m in args.metric or () if m not in present_metrics]
    if unknown:
        raise CommandError(f"Expected --metric among the table's metrics {sorted(present_metrics)}, but got {unknown}.")
    unknown = [s for s in args.site or () if s not in present_sites]
    if unknown:
        raise CommandError(f"Expected --site among the table's sites {present_sites}, but got {unknown}.")
    labels = None
    if args.site_labels:
        if args.run_dir is None:
            raise CommandError("Expected RUN with --site-labels (module types and widths are read from the run).")
        labels = plots.describe_sites(_open(args.run_dir))
    return dict(metrics=args.metric, heatmap_metrics=args.metric, sites=args.site, x=args.x,
                steps_per_epoch=args.steps_per_epoch, site_labels=labels, format=args.format, dpi=args.dpi)


def _cmd_plot(args: argparse.Namespace) -> int:
    from actpat.analysis import plots

    _check_writable_dir(args.output, "-o")
    _check_metric_names(args)
    df, _, plane = _table_for(args, rates=False)
    options = _figure_options(args, df)
    if args.metric:  # only the chosen metrics (and their saturation flags): no other figure
        from actpat.analysis.metrics import metric

        flags = {metric(name).saturation_flag for name in args.metric} - {None}
        df, plane = df[df["metric"].isin(set(args.metric) | flags)], None
    paths = plots.save_all(df, args.output, info_plane_df=plane, progress=not args.no_progress, **options)
    print(f"wrote {len(paths)} figures to {args.output}")
    return 0


def _cmd_tensorboard(args: argparse.Namespace) -> int:
    from actpat.analysis.tensorboard import to_tensorboard

    _check_events_dir(args.logdir, args.run_name, args.overwrite, "--logdir")
    df, rates, plane = _table_for(args, rates=True)
    out = to_tensorboard(df, args.logdir, run_name=args.run_name, figures=not args.no_figures, unit_rates=rates,
                         info_plane_df=plane, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote TensorBoard events to {out}\nopen them with:  tensorboard --logdir {args.logdir}")
    return 0


def _report(
    run, split: str, *, table: Path, figures: Path, logdir: Path, run_name: str, overwrite: bool, x: str,
    args: argparse.Namespace,
):
    """Table, figures and TensorBoard events of one pass over ``run``; returns (table, figure paths, event dir)."""
    from actpat.analysis import plots
    from actpat.analysis.tensorboard import to_tensorboard

    result = _analyze(args, run, split, rates=True)
    df = result.table()
    _write_table(df, table, not args.no_progress)
    paths = plots.save_all(df, figures, x=x, info_plane_df=result.information_plane, progress=not args.no_progress)
    board = to_tensorboard(df, logdir, run_name=run_name, figures=paths, unit_rates=result.firing_rates,
                           overwrite=overwrite, progress=not args.no_progress)
    return df, paths, board


def _cmd_report(args: argparse.Namespace) -> int:
    out: Path = args.output
    table = out / f"metrics.{args.table}"
    _check_table_path(table, "-o")
    _check_writable_dir(out / "figures", "-o")
    _check_events_dir(out / "tensorboard", args.run_name, args.overwrite, "-o")
    run = _open(args.run_dir)
    df, paths, board = _report(
        run, _split(run, args.split), table=table, figures=out / "figures", logdir=out / "tensorboard",
        run_name=args.run_name, overwrite=args.overwrite, x=args.x, args=args,
    )
    print(
        f"table:       {table} ({len(df)} rows)\nfigures:     {len(paths)} PNG files in {out / 'figures'}\n"
        f"TensorBoard: {board}\nopen it with:  tensorboard --logdir {out / 'tensorboard'}"
    )
    return 0


def _check_subset_sizes(runs: list, args: argparse.Namespace) -> None:
    """--units and --observations within what every site of ``runs`` (open) has, before any work, in the flags'
    words."""
    from actpat.analysis.width import subset_sizes

    most = dict(zip(("--units", "--observations"), subset_sizes(runs, args.split)))
    for flag, given, what in (("--units", args.units, "the narrowest site's width"),
                              ("--observations", args.observations, "the fewest observations of any site at any step")):
        if given is not None and not 1 <= given <= most[flag]:
            raise CommandError(f"Expected {flag} between 1 and {most[flag]} ({what}), but got {given}.")


def _cmd_compare(args: argparse.Namespace) -> int:
    from actpat.analysis.compare import common_split, parse_runs, report, split_run_spec

    _check_writable_dir(args.output, "-o")
    runs = []
    for spec in args.runs:
        group, path = split_run_spec(spec)
        # A bare directory is named as typed, not by the run folder found inside it.
        runs.append((spec if group is None else group, locate_run(path)))
    from actpat.recorder import open_run

    # Opened once, here: checked in the options' command-line names before any work, then compared.
    specs = [spec._replace(opened=open_run(spec.path)) for spec in parse_runs(runs)]
    opened = [spec.opened for spec in specs]
    common_split(opened, args.split, name="--split")  # a split missing, several without --split, or different ones
    if not args.no_width_controlled and (args.units is not None or args.observations is not None):
        _check_subset_sizes(opened, args)
    written = report(
        specs, args.output, split=args.split, metrics=args.metric, threshold=args.threshold, stay=args.stay,
        kind=args.band, width_controlled=not args.no_width_controlled, regions=args.regions, m=args.units,
        n_obs=args.observations, n_subsets=args.subsets,
        seed=args.seed, x=args.x, progress=not args.no_progress,
    )
    print(f"wrote {len(written)} files to {args.output}: " + ", ".join(sorted(p.name for p in written.values())))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from actpat.recorder import checkpoint_replay  # torch: imported by this command only

    return checkpoint_replay.run_from_args(args)


def _demo_table(df):
    """Per site: final normalized entropy and distinct patterns, and wJI(final) at mid-run."""
    steps = sorted(df["step"].unique())
    final, mid = steps[-1], steps[len(steps) // 2]
    wide = df.pivot_table(index=["site_index", "site", "step"], columns="metric", values="value")
    at_final = wide.xs(final, level="step")
    at_mid = wide.xs(mid, level="step")
    table = at_final[["normalized_entropy", "distinct"]].copy()
    table[f"wJI(final) at step {mid}"] = at_mid["weighted_jaccard_final"]
    table.columns = [f"normalized entropy (step {final})", f"distinct patterns (step {final})", table.columns[-1]]
    return table.reset_index(level="site_index", drop=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from actpat.callbacks.demo import run_demo  # torch and Lightning: imported by this command only
    from actpat.recorder import open_run

    out: Path = args.out
    _check_writable_dir(out, "--out")
    print(f"[1/2] training a small CNN on scikit-learn's digits with probe recording -> {out}")
    result = run_demo(out, fast=args.fast, progress=not args.fast)
    print("[2/2] analysing the recorded probe patterns: table, figures, TensorBoard events")
    df, figures, board = _report(
        open_run(result.run_dir), "probe", table=out / "metrics.csv", figures=out / "figures",
        logdir=result.logs_dir, run_name=DEFAULT_RUN_NAME, overwrite=True, x="step", args=args,
    )
    print(_demo_table(df).round(3).to_string())
    print(
        f"\nshards:      {result.run_dir}\nmetrics:     {out / 'metrics.csv'}\n"
        f"figures:     {len(figures)} PNG files in {out / 'figures'}\nTensorBoard: {board}\n"
        f"open it with:  tensorboard --logdir {result.logs_dir}"
    )
    return 0


# ---------------------------------------------------------------------------------- parser
def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"expected a positive number of processes or -1 (every core), but got {text!r}")
    return value


def _compute_options(parser: argparse.ArgumentParser, *, split_help: str) -> None:
    parser.add_argument("--split", default=None, help=split_help)
    parser.add_argument("--n-classes", type=int, default=None, metavar="C",
                        help="the dataset's class count: adds the nominal label measures (default: classes present)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--jobs", type=_jobs, default=1, help="local worker processes, -1 every core (default: 1)")
    where.add_argument(
        "--scheduler", metavar="ADDRESS", default=None,
        help="analyse on a Dask cluster (tcp://host:8786); the run must be at the same path on every worker",
    )
    parser.add_argument("--scheduler-wait", type=float, default=None, metavar="SECONDS",
                        help=f"how long --scheduler waits for the scheduler and a first worker (default: "
                             f"{_DASK_WAIT_SECONDS:g})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``actpat`` command."""
    parser = argparse.ArgumentParser(
        prog="actpat",
        description="Record and analyse binary activation patterns of ReLU-family units during training. "
        "RUN is a run directory of shards, or a folder above it (e.g. a Lightning log version folder).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    only_split = "recorded split to read (default: the run's only split)"

    demo = commands.add_parser("demo", help="instrumented training on scikit-learn's digits, then a report")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    demo.add_argument("--fast", action="store_true", help="a few steps only, for smoke tests")
    demo.set_defaults(func=_cmd_demo, jobs=1, scheduler=None, scheduler_wait=None, no_progress=False,
                      n_classes=None)

    info = commands.add_parser("info", help="sites, steps, splits, observations and size of a recorded run")
    info.add_argument("run_dir", type=Path, metavar="RUN")
    info.add_argument("--verify", action="store_true",
                      help="check every record's checksum (reads the whole run); exit status 1 if anything is lost")
    info.add_argument("--no-progress", action="store_true", help="hide the progress bar of --verify")
    info.add_argument("--all-losses", action="store_true",
                      help=f"list every lost record or step (default: the first {_LOSSES_SHOWN})")
    info.set_defaults(func=_cmd_info)

    analyze = commands.add_parser(
        "analyze", help="every entropy, similarity and information-plane measure of a run, as a tidy table"
    )
    analyze.add_argument("run_dir", type=Path, metavar="RUN")
    analyze.add_argument("-o", "--output", type=Path, required=True, help="metrics.csv or metrics.parquet")
    analyze.add_argument("--no-information-plane", action="store_true", help="leave out input_information, mutual_information, ...")
    _compute_options(analyze, split_help=only_split)
    analyze.set_defaults(func=_cmd_analyze)

    plot = commands.add_parser("plot", help="heatmaps (site x time), per-site curves and the information plane")
    plot.add_argument("run_dir", type=Path, nargs="?", metavar="RUN", help="run to analyse (not needed with --metrics)")
    plot.add_argument("-o", "--output", type=Path, required=True, help="directory for the figure files")
    plot.add_argument("--metrics", type=Path, help="table written by `actpat analyze` instead of analysing RUN")
    plot.add_argument("--x", choices=("step", "epoch"), default="step", help="time axis (default: step)")
    plot.add_argument("--steps-per-epoch", type=float, default=None,
                      help="for --x epoch: steps per epoch (default: estimated from the table)")
    plot.add_argument("--metric", action="append", metavar="NAME",
                      help="draw only this metric, as curves and a heatmap (repeat; default: every non-constant "
                      "metric as curves, the headline metrics as heatmaps, and the information plane)")
    plot.add_argument("--site", action="append", metavar="NAME", help="a site to draw (repeat; default: all)")
    plot.add_argument("--site-labels", action="store_true", help="label sites with module type and width (needs RUN)")
    plot.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="file format (default: png)")
    plot.add_argument("--dpi", type=int, default=100, help="resolution of png figures (default: 100)")
    _compute_options(plot, split_help=only_split + "; with --metrics, the table's split to plot")
    plot.set_defaults(func=_cmd_plot)

    board = commands.add_parser("tensorboard", help="metrics, firing-rate histograms and figures as TensorBoard events")
    board.add_argument("run_dir", type=Path, nargs="?", metavar="RUN",
                       help="run to analyse; with --metrics, only read for the firing-rate histograms")
    board.add_argument("--logdir", type=Path, required=True, help="TensorBoard log directory")
    board.add_argument("--run-name", default=DEFAULT_RUN_NAME, help=f"sub-directory of LOGDIR (default: {DEFAULT_RUN_NAME})")
    board.add_argument("--overwrite", action="store_true", help="replace the events of an earlier export")
    board.add_argument("--metrics", type=Path, help="table written by `actpat analyze` instead of analysing RUN")
    board.add_argument("--no-figures", action="store_true",
                       help="scalars and histograms only: leave out the figures (drawing them takes most of the time)")
    _compute_options(board, split_help=only_split + "; with --metrics, the table's split to export")
    board.set_defaults(func=_cmd_tensorboard)

    rep = commands.add_parser("report", help="table, figures and TensorBoard events of a run from one pass")
    rep.add_argument("run_dir", type=Path, metavar="RUN")
    rep.add_argument("-o", "--output", type=Path, required=True,
                     help="directory: metrics.csv, figures/, tensorboard/<run name>/")
    rep.add_argument("--table", choices=("csv", "parquet"), default="csv", help="format of the table (default: csv)")
    rep.add_argument("--x", choices=("step", "epoch"), default="step", help="time axis (default: step)")
    rep.add_argument("--run-name", default=DEFAULT_RUN_NAME, help=f"TensorBoard run name (default: {DEFAULT_RUN_NAME})")
    rep.add_argument("--overwrite", action="store_true", help="replace the events of an earlier report")
    _compute_options(rep, split_help=only_split)
    rep.set_defaults(func=_cmd_report)

    cmp_ = commands.add_parser("compare", help="several runs side by side: heatmaps, bands over seeds, convergence")
    cmp_.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or GROUP=RUN (seeds share a GROUP)")
    cmp_.add_argument("-o", "--output", type=Path, required=True, help="directory for the tables and figures")
    cmp_.add_argument("--split", default=None, help="recorded split to read (default: each run's only split)")
    cmp_.add_argument("--metric", action="append", metavar="NAME",
                      help="a metric to draw (repeat; default: the headline metrics)")
    cmp_.add_argument("--threshold", type=float, default=0.9,
                      help="wJI(final, t) a site must exceed to count as converged (default: 0.9)")
    cmp_.add_argument("--band", choices=("minmax", "bootstrap"), default="minmax", help="band over seeds")
    cmp_.add_argument("--subsets", type=int, default=10, help="unit subsets of the width-controlled measures")
    cmp_.add_argument("--units", type=int, default=None, metavar="M",
                      help="units per subset of the width-controlled measures (default: the narrowest site's width)")
    cmp_.add_argument("--observations", type=int, default=None, metavar="N",
                      help="observations per subset (default: the fewest any site of any run has at any step)")
    cmp_.add_argument("--stay", action="store_true",
                      help="converged = stays above the threshold from then on (default: first step above)")
    cmp_.add_argument("--seed", type=int, default=0, help="seed of the unit subsets and the bootstrap")
    cmp_.add_argument("--no-width-controlled", action="store_true", help="leave out the width-controlled measures")
    cmp_.add_argument("--regions", action="store_true", help="add the linear-region measures")
    cmp_.add_argument("--x", choices=("step", "epoch"), default="step", help="time axis (default: step)")
    cmp_.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    cmp_.set_defaults(func=_cmd_compare)

    from actpat.recorder.checkpoint_replay import build_parser as replay_arguments  # torch-free

    replay = commands.add_parser("replay", help="probe saved checkpoints afterwards, into a run directory")
    replay_arguments(replay)
    replay.set_defaults(func=_cmd_replay)
    return parser


@contextlib.contextmanager
def _interruptible(command: str):
    """Ctrl-C raises KeyboardInterrupt as usual. Should it be lost on its way (one raised while a finalizer
    runs is only printed), the command still ends interrupted: a watchdog started by the Ctrl-C exits with 130
    after a grace period, unless the interrupt reached :func:`main` first or the command returned (it then
    raises KeyboardInterrupt itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    timers: list[threading.Timer] = []

    def on_sigint(signum, frame):
        timer = threading.Timer(_EXIT_GRACE_SECONDS, _exit_interrupted, args=(command,))
        timer.daemon = True
        timer.start()
        timers.append(timer)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for timer in timers:
            timer.cancel()
    if timers:  # returned after a Ctrl-C whose KeyboardInterrupt was lost: not a normal end
        raise KeyboardInterrupt


def _exit_interrupted(command: str) -> None:
    print(f"\nactpat {command}: interrupted (forced exit).", file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``actpat`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with _interruptible(args.command):
            return func(args)
    except BrokenPipeError:  # `actpat info RUN | head`: the reader has gone, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        what = ("the checkpoints replayed so far are in the run directory, and a rerun continues after them"
                if args.command == "replay" else "shards finalized so far are readable; figures and events of this "
                "command may be incomplete (tables are written whole or not at all)")
        print(f"\nactpat {args.command}: interrupted; {what}.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, KeyError, ImportError) as exc:
        if isinstance(exc, ImportError) and exc.name != "hdf5plugin":  # only the extra a run needs names its install
            raise
        print(f"actpat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``actpat`` command line: run the demo, inspect and analyse recorded runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence


def _open_nonempty(run_dir: Path):
    from actpat.recorder import open_run

    run = open_run(run_dir)
    if not run.shards:
        raise ValueError(
            f"Expected shards (patterns-rank*.h5) in {run_dir}, but found none: the run is empty. "
            "Check the path; a recorder writes its first shard when its first record arrives."
        )
    return run


def _cmd_info(args: argparse.Namespace) -> int:
    run = _open_nonempty(args.run_dir)
    size = sum(path.stat().st_size for path in run.shards)
    print(f"run:            {run.path}")
    print(f"format version: {run.format_version}")
    print(f"shards:         {len(run.shards)} ({size / 1e6:.2f} MB on disk)")
    print(f"splits:         {', '.join(run.splits)}")
    print(f"dropped:        {run.dropped_records} records")
    header = f"{'#':>3}  {'site':<28} {'type':<16} {'units':>6}  " + "  ".join(
        f"{split + ' steps/obs':>20}" for split in run.splits
    )
    print(header)
    for site in run.sites:
        info = run.site_info(site)
        cells = []
        for split in run.splits:
            steps = run.steps(site, split)
            cells.append(f"{len(steps):>8}/{run.n_observations(site, split):<11}")
        print(f"{info['site_index']:>3}  {site:<28} {info['module_type']:<16} {info['n_units']:>6}  " + "  ".join(cells))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from actpat.analysis import summarize

    out: Path = args.output
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"Expected `-o` to end in .csv or .parquet, but got {str(out)!r}.")
    df = summarize(_open_nonempty(args.run_dir), split=args.split, progress=not args.no_progress, n_jobs=args.jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            df.to_parquet(out, index=False)
        except ImportError as exc:
            raise ValueError("Writing .parquet needs pyarrow: `pip install actpat[parquet]`, or use -o *.csv.") from exc
    else:
        df.to_csv(out, index=False)
    print(f"wrote {len(df)} rows ({df['site'].nunique()} sites, {df['step'].nunique()} steps) to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from actpat.analysis import information_plane, plots, summarize

    run = _open_nonempty(args.run_dir)
    df = summarize(run, split=args.split, progress=not args.no_progress)
    try:
        plane = information_plane(run, split=args.split)
    except ValueError as exc:  # e.g. subsampled records: no sample's whole pattern is known
        plane = None
        print(f"information plane skipped: {exc}", file=sys.stderr)
    paths = plots.save_all(df, args.output, x=args.x, info_plane_df=plane)
    print(f"wrote {len(paths)} figures to {args.output}")
    return 0


def _cmd_tensorboard(args: argparse.Namespace) -> int:
    from actpat.analysis import firing_rates, summarize, to_tensorboard

    run = _open_nonempty(args.run_dir)
    df = summarize(run, split=args.split, progress=not args.no_progress)
    out = to_tensorboard(
        df, args.logdir, run_name=args.run_name, unit_rates=firing_rates(run, args.split), overwrite=args.overwrite
    )
    print(f"wrote TensorBoard events to {out}\nopen them with:  tensorboard --logdir {args.logdir}")
    return 0


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
    from actpat.analysis import firing_rates, plots, summarize, to_tensorboard
    from actpat.callbacks.demo import run_demo

    out: Path = args.out
    print(f"[1/4] training a small CNN on scikit-learn's digits with probe recording -> {out}")
    result = run_demo(out, fast=args.fast, progress=not args.fast)
    print("[2/4] analysing the recorded probe patterns")
    df = summarize(result.run_dir, split="probe")
    df.to_csv(out / "metrics.csv", index=False)
    print("[3/4] writing figures")
    figures = plots.save_all(df, out / "figures")
    print("[4/4] writing TensorBoard events")
    board = to_tensorboard(
        df, result.logs_dir, run_name="actpat-offline", unit_rates=firing_rates(result.run_dir), overwrite=True
    )
    print(_demo_table(df).round(3).to_string())
    print(
        f"\nshards:      {result.run_dir}\nmetrics:     {out / 'metrics.csv'}\n"
        f"figures:     {len(figures)} PNG files in {out / 'figures'}\nTensorBoard: {board}\n"
        f"open it with:  tensorboard --logdir {result.logs_dir}"
    )
    return 0



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``actpat`` command."""
    parser = argparse.ArgumentParser(
        prog="actpat",
        description="Record and analyse binary activation patterns of ReLU-family units during training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="instrumented training on scikit-learn's digits, then analysis")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    demo.add_argument("--fast", action="store_true", help="a few steps only, for smoke tests")
    demo.set_defaults(func=_cmd_demo)

    info = commands.add_parser("info", help="sites, steps, splits, observations and size of a recorded run")
    info.add_argument("run_dir", type=Path)
    info.set_defaults(func=_cmd_info)

    analyze = commands.add_parser("analyze", help="every entropy and similarity measure of a run, as a tidy table")
    analyze.add_argument("run_dir", type=Path)
    analyze.add_argument("-o", "--output", type=Path, required=True, help="metrics.csv or metrics.parquet")
    analyze.add_argument("--split", default="probe", help="recorded split to analyse (default: probe)")
    analyze.add_argument("--jobs", type=int, default=1, help="worker processes, one site each (default: 1)")
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    analyze.set_defaults(func=_cmd_analyze)

    plot = commands.add_parser("plot", help="heatmaps (site x time) and per-site curves as PNG files")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("-o", "--output", type=Path, required=True, help="directory for the PNG files")
    plot.add_argument("--split", default="probe", help="recorded split to plot (default: probe)")
    plot.add_argument("--x", choices=("step", "epoch"), default="step", help="time axis (default: step)")
    plot.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    plot.set_defaults(func=_cmd_plot)

    board = commands.add_parser("tensorboard", help="offline metrics, firing-rate histograms and figures as events")
    board.add_argument("run_dir", type=Path)
    board.add_argument("--logdir", type=Path, required=True, help="TensorBoard log directory")
    board.add_argument("--run-name", default=None, help="sub-directory of LOGDIR (default: actpat-offline)")
    board.add_argument("--split", default="probe", help="recorded split to export (default: probe)")
    board.add_argument("--overwrite", action="store_true", help="replace events of an earlier export")
    board.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    board.set_defaults(func=_cmd_tensorboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``actpat`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("actpat: interrupted; shards finalized so far are readable.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"actpat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The callback's argument checks, all made when it is constructed (fail fast)."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader

from actpat.recorder import arguments, schema
from actpat.recorder.probe_set import check_probe_set
from actpat.recorder.selection import SiteSelection


def check_arguments(args: dict[str, Any]) -> None:
    """Validate every argument of the callback (``args`` = its ``__init__``'s locals)."""
    arguments.expect_int("batch_every_n_steps", args["batch_every_n_steps"], 0)
    arguments.expect_every("probe_every", args["probe_every"])
    for name, allowed in (("probe_mode", ("train", "eval")), ("pattern", (None, *schema.PATTERN_KINDS)), ("on_error", ("warn", "raise"))):
        arguments.expect_choice(name, args[name], allowed)
    if args["out_dir"] is not None and not isinstance(args["out_dir"], (str, os.PathLike)):
        raise ValueError(f"Expected `out_dir` to be None or a path, but got {type(args['out_dir']).__name__}.")
    for name in ("max_observations", "probe_batch_size"):
        arguments.expect_optional_int(name, args[name], 1)
    arguments.expect_int("probe_cache_bytes", args["probe_cache_bytes"], 0)
    for name in ("live_stats", "probe_on_all_ranks", "probe_copy"):
        arguments.expect_bool(name, args[name])
    n_classes = args["n_classes"]
    if n_classes is not None and n_classes != "probe" and (
        isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1
    ):
        raise ValueError(f"Expected `n_classes` to be None, an int >= 1 or \"probe\", but got {n_classes!r}.")
    for name in ("labels_from", "inputs_from", "mask_from", "probe_forward"):
        arguments.expect_callable(name, args[name])
    values = args["probe_values"]
    arguments.expect_values("probe_values", values)
    arguments.expect_module_types("module_types", args["module_types"])
    SiteSelection(args["sites"])  # validates the type of `sites`
    schema.check_codec(args["compression"])
    probe = args["probe"]
    if probe is not None:
        check_probe_set(probe)
    if probe is None and args["batch_every_n_steps"] == 0:
        raise ValueError(
            "Expected something to record, but got `probe=None` and `batch_every_n_steps=0`. Pass a probe "
            "set, or `batch_every_n_steps >= 1` to record the training batches."
        )
    if probe is None and values is not None:
        raise ValueError(f"Expected a `probe` set for `probe_values={values!r}`, but got `probe=None`.")
    if isinstance(probe, DataLoader) and args["probe_batch_size"] is not None:
        raise ValueError(
            f"Expected `probe_batch_size=None` with a DataLoader probe (it keeps its own batch size "
            f"{probe.batch_size}), but got {args['probe_batch_size']}. Pass the Dataset to choose the batch size."
        )

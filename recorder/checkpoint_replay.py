"""Replay: run the probe protocol on the saved checkpoints of a run that recorded nothing.

For each checkpoint, in step order, the weights are loaded into the model and the probe set is run
through it by :class:`~actpat.recorder.prober.Prober` (the same implementation as the live callback and
a plain loop), into one run directory that the whole analysis reads. The patterns equal those a live
probe would have recorded at the same step: a probe is a function of the weights and the probe set.

Checkpoints: a Lightning ``.ckpt`` (weights under ``state_dict``) or a plain ``torch.save``'d file
(``.pt``, ``.pth``, ``.bin``): a ``state_dict`` itself, or a dict holding it under ``state_dict``,
``model_state_dict`` or ``model``. The step is the checkpoint's own ``global_step`` (Lightning) or
``step`` entry; otherwise it is read from the file name (:func:`step_from_name`).

Importing this module does not import torch (the ``actpat`` command builds its parser from it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from actpat.recorder import schema

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from actpat.recorder.reader import Run

log = logging.getLogger(__name__)

#: File name endings taken for checkpoints in a directory.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_STATE_KEYS = ("state_dict", "model_state_dict", "model")
_STEP_KEYS = ("global_step", "step")
_NAMED_STEP = re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into the model; replay reports it and goes on with the others."""


@dataclass(frozen=True)
class ReplayResult:
    """What replay did with one checkpoint: ``status`` is ``"replayed"`` or ``"skipped"`` (``reason`` says why)."""

    path: Path
    step: Optional[int]
    status: str
    reason: str = ""


def step_from_name(name: str) -> Optional[int]:
    """The step in a checkpoint's file name, or None.

    The rule: ``step`` followed by an optional ``=``, ``_`` or ``-`` and digits, anywhere in the name
    (``epoch=2-step=1200.ckpt``, ``step_1200.pt``, ``model-step-1200.pth``); otherwise the last number
    in the name (``model-1200.pt``, ``ckpt_001200.pth``); a name without digits has no step.

    Examples
    --------
    >>> [step_from_name(n) for n in ("epoch=2-step=1200.ckpt", "step_7.pt", "net-0042.pth", "last.ckpt")]
    [1200, 7, 42, None]
    """
    stem = Path(name).name
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    match = _NAMED_STEP.search(stem) or _LAST_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def load_checkpoint(path: Union[str, os.PathLike], *, weights_only: bool = True) -> tuple[dict, Optional[int], int]:
    """``(state_dict, step or None, epoch or -1)`` of one checkpoint file.

    Raises
    ------
    CheckpointError
        The file cannot be read, or holds no recognizable ``state_dict``.
    """
    import torch

    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as exc:  # noqa: BLE001 - every reason a file does not load is reported the same way
        if isinstance(exc, RuntimeError) and "mmap" in str(exc):
            content = _load(path, weights_only)  # the legacy (not zip) format cannot be memory-mapped
        else:
            raise _load_error(path, exc, weights_only) from exc
    if not isinstance(content, Mapping):
        raise CheckpointError(f"Expected {path} to hold a dict (a state_dict or a checkpoint), but it holds a "
                              f"{type(content).__name__}.")
    state = next((content[key] for key in _STATE_KEYS if isinstance(content.get(key), Mapping)), content)
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(
            f"Expected {path} to hold a state_dict (names to tensors), itself or under one of {_STATE_KEYS}, but its "
            f"keys are {sorted(map(str, content))[:8]}."
        )
    step = next((int(content[key]) for key in _STEP_KEYS if isinstance(content.get(key), int)), None)
    epoch = content.get("epoch")
    return dict(state), step, epoch if isinstance(epoch, int) else -1


def replay(
    checkpoints: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    model: nn.Module,
    probe: Union[Dataset, DataLoader],
    out_dir: Union[str, os.PathLike],
    *,
    mode: str = "train",
    batch_size: Optional[int] = None,
    weights_only: bool = True,
    progress: bool = True,
    **prober_options: Any,
) -> list[ReplayResult]:
    """Probe every checkpoint of a run, in step order, into the run directory ``out_dir``.

    Parameters
    ----------
    checkpoints : path or sequence of paths
        A directory (its files ending in :data:`CHECKPOINT_SUFFIXES`) or the checkpoint files.
    model : nn.Module
        A model of the trained architecture; each checkpoint's weights are loaded into it (in place).
    probe : Dataset or DataLoader
        The probe set, as for :class:`~actpat.recorder.prober.Prober`.
    out_dir : path
        Run directory. Steps it already holds are skipped, so an interrupted replay continues.
    mode, batch_size
        As for the prober: use the live run's probe mode and, in ``train`` mode, its batch size.
    weights_only : bool, default True
        Load with ``torch.load(weights_only=True)``, which runs no code from the file; False for a
        trusted file that holds other objects.
    progress : bool, default True
        Show a progress bar over the checkpoints.
    **prober_options
        Further options of the prober (``sites``, ``pattern``, ``forward``, ``inputs_from``,
        ``labels_from``, ``store_values``, ``module_types``, ``compression``, ``cache_bytes``).

    Returns
    -------
    list of ReplayResult
        One per checkpoint, in step order, then the checkpoints without a step.

    Notes
    -----
    A checkpoint that fails to load (unreadable, not a state_dict, weights of another model, no step)
    is reported (a logged warning and its :class:`ReplayResult`) and skipped; the others are replayed.
    A failure of the probe itself (a probe forward that does not fit the model) is the same for every
    checkpoint and raises. The probe runs on ``model`` itself (``copy=False`` unless given): nothing needs
    protecting.
    """
    from tqdm.auto import tqdm

    from actpat.recorder.prober import PROBE_SPLIT, Prober, existing_run, recorded_steps

    files = _checkpoint_files(checkpoints)
    out_dir = Path(out_dir)
    existing = existing_run(out_dir)
    done = set(recorded_steps(existing, PROBE_SPLIT))
    cut_short = _cut_short_steps(existing)
    if existing is not None:
        existing.close()
    planned, results = [], []
    for path in files:  # pass 1: the step of each file (memory-mapped: the weights are not read)
        try:
            _, step, _ = load_checkpoint(path, weights_only=weights_only)
        except CheckpointError as exc:
            results.append(_skip(path, None, str(exc)))
            continue
        step = step if step is not None else step_from_name(path.name)
        if step is None:
            results.append(_skip(path, None, "no step: neither a `global_step`/`step` entry nor digits in the name"))
        else:
            planned.append((step, path))
    planned.sort(key=lambda item: (item[0], str(item[1])))
    by_step: dict[int, list[Path]] = {}
    for step, path in planned:
        by_step.setdefault(step, []).append(path)
    last = max(done, default=-1)
    replayed: list[ReplayResult] = []
    prober_options.setdefault("copy", False)  # the model is replay's own: nothing to protect
    _probe_as_the_callback(model, prober_options)
    prober = Prober(model, probe, out_dir, 1, mode=mode, batch_size=batch_size, **prober_options)
    stopped_in = None  # the step whose probe Ctrl-C stopped at once
    try:
        for step, path in tqdm(planned, desc="replaying checkpoints", unit="ckpt", disable=not progress):
            if step in cut_short:
                replayed.append(_skip(path, step, f"step {step} in {out_dir} was cut short (its replay stopped, or the "
                                                  "process was killed, while probing it) and a run's steps are never "
                                                  "written twice: replay into a new directory to record it"))
                continue
            if step in done:
                replayed.append(_skip(path, step, f"step {step} is recorded in {out_dir} already"))
                continue
            if len(by_step[step]) > 1:
                others = ", ".join(str(p) for p in by_step[step] if p != path)
                replayed.append(_skip(path, step, f"{others} is of step {step} too: which weights the step had is "
                                                  "ambiguous; replay the right file alone, or move the other away"))
                continue
            if step < last:
                replayed.append(_skip(path, step, f"step {step} comes before step {last}, the last recorded in {out_dir}: "
                                                  "a run's records are kept in time order, so a replay adds later steps "
                                                  "only; replay into a new directory to record this one"))
                continue
            try:
                state, _, epoch = load_checkpoint(path, weights_only=weights_only)
                _load_weights(model, state, path)
            except CheckpointError as exc:
                replayed.append(_skip(path, step, str(exc)))
                continue
            try:
                with _whole_probe(step) as interrupted:
                    prober.probe(step, epoch)
            except KeyboardInterrupt:
                stopped_in = step
                raise
            done.add(step)
            replayed.append(ReplayResult(path, step, "replayed"))
            if interrupted:
                raise KeyboardInterrupt
    finally:
        prober.close()
        if stopped_in is not None:
            _tell_if_cut_short(out_dir, stopped_in)
    return replayed + results


def _tell_if_cut_short(out_dir: Path, step: int) -> None:
    """Say whether the probe of ``step``, stopped at once, left the step cut short in ``out_dir`` (a rerun can
    replay it only where none of its records reached the disk)."""
    from actpat.recorder.prober import existing_run

    try:
        run = existing_run(out_dir, warn=False)
        if run is None:
            return
        with run:
            cut = step in _cut_short_steps(run)
    except Exception as exc:  # noqa: BLE001 - the interrupt is what the caller reports; a rerun names the step
        log.debug("actpat replay: could not read %s to tell whether step %d was cut short: %r", out_dir, step, exc)
        return
    if cut:
        log.warning("actpat replay: step %d was cut short while it was probed, and a run's steps are never written "
                    "twice: replay its checkpoint into a new directory to record it.", step)


def _cut_short_steps(run: Optional["Run"]) -> set[int]:
    """Probe steps of ``run`` (None: no run) cut short: some of their records reached the disk, not the last."""
    from actpat.recorder.prober import PROBE_SPLIT

    return {loss.step for loss in (run.losses if run is not None else ())
            if loss.kind == "incomplete" and loss.split == PROBE_SPLIT}


@contextlib.contextmanager
def _whole_probe(step: int) -> Iterator[list]:
    """Ctrl-C while checkpoint ``step`` is probed stops after its probe, so that the run holds the step whole (a
    step cut short is lost to the run directory: its steps are never written twice); a second Ctrl-C goes to the
    handler there was before (by default: stops at once). Yields a list that holds the first Ctrl-C, if any (the
    caller then stops). Nothing changes off the main thread, which alone gets signals, or where Ctrl-C is ignored."""
    caught: list = []
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):
        yield caught
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if caught:
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        caught.append(signum)
        try:  # no I/O error may leave the handler: it would stop the probe it protects
            log.warning("actpat replay: stopping once the probe of step %d is whole; Ctrl-C again to stop at once "
                        "(step %d is then lost to the run directory).", step, step)
        except Exception:  # noqa: BLE001 - e.g. a write to stderr interrupted by this very signal
            pass

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


def _probe_as_the_callback(model: "nn.Module", options: dict) -> None:
    """A LightningModule without ``forward`` is probed through its ``training_step``, on the module made inert
    (logging, optimizers), as the callback probed it live; unless ``options`` name a ``forward``."""
    from actpat.recorder import lightning_probe

    if options.get("forward") is None and lightning_probe.is_lightning_module(model) and not (
        lightning_probe.overrides_forward(model)
    ):
        how = "`forward=` (`--forward file.py:fn` to `actpat replay`)"
        options["forward"] = lightning_probe.training_step_forward(model, how)
        options.setdefault("context", lambda module: lightning_probe.inert(module, None))


def replay_command(
    ckpt_dir: Union[str, os.PathLike],
    module: str,
    probe: str,
    out_dir: Union[str, os.PathLike],
    *,
    forward: Optional[str] = None,
    labels_from: Optional[str] = None,
    mask_from: Optional[str] = None,
    device: Optional[str] = None,
    **options: Any,
) -> list[ReplayResult]:
    """:func:`replay` with the model, probe set and probe forward named as ``pkg.mod:attr`` or ``file.py:attr``.

    ``module`` and ``probe`` name factories called without arguments (the model, the probe set);
    ``forward`` names a ``forward(module, batch)`` function itself, ``labels_from`` a ``labels_from(batch)`` (the
    class labels), ``mask_from`` a ``mask_from(batch)`` (the observations to keep, such as real tokens). ``device``
    moves the model there.
    """
    from torch import nn

    model = resolve(module, "--module")()
    if not isinstance(model, nn.Module):
        raise ValueError(f"Expected `--module {module}` to return a torch.nn.Module, but got {type(model).__name__}.")
    if device is not None:
        model = model.to(device)
    probe_set = resolve(probe, "--probe")()
    for name, spec in (("forward", forward), ("labels_from", labels_from), ("mask_from", mask_from)):
        if spec is not None:
            options[name] = resolve(spec, f"--{name.replace('_', '-')}")
    return replay(ckpt_dir, model, probe_set, out_dir, **options)


def resolve(spec: str, option: str = "spec") -> Callable:
    """The object ``spec`` names: ``pkg.mod:attr`` (importable) or ``path/to/file.py:attr`` (loaded from the file)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"Expected `{option}` as `pkg.module:name` or `file.py:name`, but got {spec!r}.")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {where!r}")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)  # as `python file.py` does: the file may import the modules beside it
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules.setdefault(path.stem, module)  # pickling and dataclasses look modules up by name
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        target = module
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise ValueError(f"Expected `{option} {spec}` to name an object, but it cannot be loaded: {exc}.") from exc
    if not callable(target):
        raise ValueError(f"Expected `{option} {spec}` to name a callable, but it is a {type(target).__name__}.")
    return target


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The arguments of ``actpat replay``, added to ``parser`` (a sub-command's) or to a new parser."""
    parser = parser or argparse.ArgumentParser(prog="actpat replay", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path, help="directory of checkpoints (.ckpt, .pt, .pth, .bin) or one file")
    parser.add_argument("--module", required=True, help="factory of the model: pkg.mod:factory or file.py:factory")
    parser.add_argument("--probe", required=True, help="factory of the probe set (Dataset or DataLoader)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="run directory to write")
    parser.add_argument("--mode", choices=("train", "eval"), default="train", help="probe mode (default: train)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="probe batch size for a Dataset (in train mode: the training batch size)")
    parser.add_argument("--forward", default=None, help="probe forward(module, batch): pkg.mod:fn or file.py:fn")
    parser.add_argument("--labels-from", default=None,
                        help="labels_from(batch): the class labels (default: batch[1], or a dict's label key)")
    parser.add_argument("--mask-from", default=None,
                        help="mask_from(batch): the observations to keep, e.g. real tokens: pkg.mod:fn or file.py:fn")
    parser.add_argument("--sites", nargs="+", default=None, help="site names or glob patterns (default: all)")
    parser.add_argument("--pattern", choices=schema.PATTERN_KINDS, default=None,
                        help="how pre-activations are cut into patterns (default: channel, 3-d sites warned of)")
    parser.add_argument("--device", default=None, help="device to probe on, e.g. cuda (default: the model's)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="torch.load with weights_only=False (runs code from the files: trusted files only)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``actpat replay`` from parsed arguments; prints a summary, returns the exit status."""
    results = replay_command(
        args.ckpt_dir, args.module, args.probe, args.output, forward=args.forward, labels_from=args.labels_from,
        mask_from=args.mask_from, device=args.device, mode=args.mode, batch_size=args.batch_size, sites=args.sites,
        pattern=args.pattern, weights_only=not args.unsafe_load, progress=not args.no_progress,
    )
    replayed = [r for r in results if r.status == "replayed"]
    skipped = len(results) - len(replayed)
    note = f"; {skipped} skipped, each named in a warning above" if skipped else ""
    print(f"replayed {len(replayed)} of {len(results)} checkpoints into {args.output}{note}")
    return 0 if replayed else 1


def replay_main(argv: Optional[Sequence[str]] = None) -> int:
    """``actpat replay ...`` as a program of its own: parse ``argv``, replay, report errors as exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        print("actpat replay: interrupted; the checkpoints replayed so far are in the run directory.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"actpat replay: error: {exc}", file=sys.stderr)
        return 2


def _checkpoint_files(checkpoints: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[Path]:
    if isinstance(checkpoints, (str, os.PathLike)):
        path = Path(checkpoints)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise FileNotFoundError(f"Expected a directory of checkpoints or a checkpoint file, but {str(path)!r} "
                                    "does not exist.")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"Expected checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in {path}, but "
                                    "found none.")
        return files
    return [Path(p) for p in checkpoints]


def _load_weights(model: nn.Module, state: dict, path: Path) -> None:
    own = model.state_dict()
    if not any("_orig_mod" in key for key in own):  # a checkpoint of a compiled model, into an eager one
        state = {key.replace("_orig_mod.", ""): value for key, value in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"The weights of {path} do not fit {type(model).__name__}: {exc}{_prefix_hint(set(own), set(state))}"
        ) from exc


def _prefix_hint(own: set[str], saved: set[str]) -> str:
    """Where the saved names are the model's behind a common prefix (a LightningModule's ``net.``) or the other
    way round, a hint that names it."""
    for longer, shorter, whose in ((saved, own, "the checkpoint's"), (own, saved, "the model's")):
        key = next(iter(shorter), None)
        prefix = next((k[: -len(key)] for k in longer if key is not None and k.endswith("." + key)), None)
        if prefix and {k[len(prefix):] for k in longer if k.startswith(prefix)} == shorter:
            return (f" Every name of {whose} weights carries the prefix {prefix!r}: pass (to --module) the model as "
                    f"the checkpoint saw it, e.g. the LightningModule holding the network as {prefix[:-1]!r}.")
    return ""


def _load(path: Path, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(path, exc, weights_only) from exc


def _load_error(path: Path, exc: Exception, weights_only: bool) -> CheckpointError:
    # Torch's safe unpickler refused an object the file holds (not a damaged file, which fails in that unpickler too).
    refused = weights_only and any(words in str(exc) for words in ("Unsupported global", "can still be loaded"))
    hint = " If you trust the file, load it with `weights_only=False` (--unsafe-load)." if refused else ""
    return CheckpointError(f"{path} cannot be loaded: {exc!r}.{hint}")


def _skip(path: Path, step: Optional[int], reason: str) -> ReplayResult:
    log.warning("actpat replay: skipped %s: %s", path, reason)
    return ReplayResult(path, step, "skipped", reason)


__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointError", "ReplayResult", "load_checkpoint", "replay", "replay_command",
           "replay_main", "step_from_name"]

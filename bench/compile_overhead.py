"""Recording overhead of a ``torch.compile``'d model against that of the same eager model (CPU or GPU).

The model (``--model``, as in ``overhead.py``; default the ResNet-20) trains with SGD in four arms,
interleaved in groups with the order reversed every other group: eager steps (A), eager steps whose
forward runs inside ``recorder.capture()`` (B), compiled steps (C) and compiled recorded steps (D). Each
kind has its own copy of the model (same initial weights) and its own recorder; the compiled model's
recorder is created before its first call, and the warm-up steps compile both of its graphs (with and
without an active capture) and their backward graphs.

``eager_ratio`` = median over groups of B / A, ``compiled_ratio`` of D / C, both in wall time
(``*_cpu_ratio``: process CPU time); ``speedup`` = A / C, what compiling buys. ``compile_s`` is the
wall time of the warm-up, mostly compilation. ``--device cuda`` runs on a GPU (timed calls end with a
device synchronization, as in ``overhead.py``).

Prints one JSON line. ``--quick`` runs a tiny configuration for the test suite (pass ``--backend eager``
there: dynamo traces the hooks the same way without building C++ kernels).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from actpat.recorder import ActivationRecorder, open_run
from overhead import build, median_ratio, parse_args, recorder_kwargs, run_arms, run_fields, synchronizer


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, ("--backend", {"default": "inductor", "help": "torch.compile backend"}))
    quick = args.quick
    groups = args.pairs or (2 if quick else 20)

    eager, x, y = build(args.model, quick, args.batch, args.resolution, args.device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=args.backend)
    steps = {"eager": 0, "compiled": 0}

    def train_step(model, step_model, opt, recorder=None, kind="eager") -> None:
        if recorder is None:
            loss = F.cross_entropy(step_model(x), y)
        else:
            with recorder.capture(steps[kind], labels=y):
                loss = F.cross_entropy(step_model(x), y)
            steps[kind] += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_compiled = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    kwargs = recorder_kwargs(args.compression)
    with tempfile.TemporaryDirectory() as eager_out, tempfile.TemporaryDirectory() as compiled_out:
        rec_eager = ActivationRecorder(eager, eager_out, **kwargs)
        rec_compiled = ActivationRecorder(compiled, compiled_out, **kwargs)
        arms = {
            "a": lambda: train_step(eager, eager, opt_eager),
            "b": lambda: train_step(eager, eager, opt_eager, rec_eager, "eager"),
            "c": lambda: train_step(compiled_model, compiled, opt_compiled),
            "d": lambda: train_step(compiled_model, compiled, opt_compiled, rec_compiled, "compiled"),
        }
        with rec_eager, rec_compiled:
            start = time.perf_counter()
            for _ in range(2):  # the first calls compile, the second ones check that nothing recompiles
                arms["c"]()
                arms["d"]()
            synchronizer(args.device)()
            compile_s = time.perf_counter() - start
            clocks = run_arms(arms, groups, warmup=1, device=args.device)
        eager_run, compiled_run = open_run(eager_out), open_run(compiled_out)
        sites_equal = eager_run.sites == compiled_run.sites
        n_sites = len(compiled_run.sites)

    a, b, c, d = (clocks[k] for k in "abcd")
    result = {
        "bench": "compile_overhead",
        "model": args.model,
        "backend": args.backend,
        "eager_ratio": median_ratio(b.wall, a.wall),
        "compiled_ratio": median_ratio(d.wall, c.wall),
        "eager_cpu_ratio": median_ratio(b.cpu, a.cpu),
        "compiled_cpu_ratio": median_ratio(d.cpu, c.cpu),
        "speedup": round(statistics.median(a.wall) / statistics.median(c.wall), 3),
        "eager_step_ms": round(1e3 * statistics.median(a.wall), 2),
        "compiled_step_ms": round(1e3 * statistics.median(c.wall), 2),
        "compile_s": round(compile_s, 1),
        "sites": n_sites,
        "same_sites_as_eager": sites_equal,
        **run_fields(x, groups, args.compression, quick),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

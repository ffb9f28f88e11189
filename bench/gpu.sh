#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks, in one run on a machine with an NVIDIA GPU, from the repository
# root: `bash bench/gpu.sh` (about 5 minutes on one H100). It runs the checkout as it is, installed or not
# (the three code folders are mapped to `actpat.*` on PYTHONPATH), with the `python3` that holds a CUDA
# build of torch and the dependencies (pytest-xdist for the tests). Writes into $OUT (default gpu_out/):
# log (everything), tests.xml (JUnit), bench.jsonl (one JSON line per benchmark). Each part has its own
# time limit; a failed part is named in the log, the next one runs, and the script exits 1 if any failed.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
failed=0
mkdir -p "$site/actpat"
for folder in recorder callbacks analysis; do ln -s "$PWD/$folder" "$site/actpat/$folder"; done
export PYTHONPATH="$site:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log") 2>&1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || failed=1
    return "$rc"
}

part environment 60 bash -c "nvidia-smi -L; $python -c 'import torch, pytorch_lightning as pl, h5py; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), pl.__version__, h5py.__version__)'"
part cuda-tests 200 "$python" -m pytest -q -p no:cacheprovider -o addopts= --import-mode=importlib -n 8 \
    -k "cuda or gpu" --junitxml="$out/tests.xml" \
    tests/recorder/test_recorder.py tests/recorder/test_prober.py tests/recorder/test_compile.py \
    tests/recorder/test_bench_probe_memory.py tests/callbacks/test_patterns.py tests/callbacks/test_compat.py tests/recorder/test_packing.py
bench() {  # bench NAME SECONDS SCRIPT ARGS...: its JSON line goes to bench.jsonl
    local name=$1 limit=$2
    shift 2
    part "$name" "$limit" "$python" "$@" > "$out/.last"
    cat "$out/.last"
    grep '^{' "$out/.last" >> "$out/bench.jsonl"
}
bench overhead-resnet18-224 120 bench/overhead.py --device cuda --model resnet18 --resolution 224
bench overhead-resnet20 90 bench/overhead.py --device cuda
bench overhead-digits 90 bench/overhead.py --device cuda --model digits --pairs 100
bench probe-memory 120 bench/probe_memory.py --device cuda --rounds 2
bench compile-overhead 150 bench/compile_overhead.py --device cuda --pairs 10
bench callback-overhead 120 bench/callback_overhead.py --accelerator gpu --rounds 3 --epochs 4
rm -f "$out/.last"
exit "$failed"

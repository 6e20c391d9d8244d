#!/usr/bin/env bash
# One GPU lease, one command: install the carried wheels, run bench_gpu.py, leave JSON + a
# markdown table in $OUT (the device tool brings that folder back) or bench/out/device.
#
#   here, once:   bench/device/fetch_wheels.sh   # -> .whl/ (transformers 5.24, trl 1.12, datasets, pydantic)
#   device tool:  run(command="bench/device/run.sh --precisions bf16 --budget-s 400 --deadline-s 465",
#                     carry=[".whl"], timeout_s=490)   # what one 15-minute lease held, twice
#   diagnostics:  run(command="bench/device/run.sh --probes profile,warmup --sizes 100m --deadline-s 465",
#                     carry=[".whl"], timeout_s=490)   # see bench_gpu.py's docstring
#   listed runs:  run(command="bench/device/run.sh --jobs bench/device/jobs/mfu-1.2b.json --budget-s 400
#                     --deadline-s 465 --job-timeout-s 200", carry=[".whl"], timeout_s=490)
#   on CPU:       SKIP_WHEELS=1 PYTHON=.venv/bin/python bench/device/run.sh --device cpu --sizes tiny \
#                     --sides ours --lora tiny --response-length 8 --threads 2
#
# Extra arguments go to bench_gpu.py (see its --help). The GPU image has torch, transformers
# 5.17, peft and accelerate; the wheels add what it lacks, and transformers 5.24 (the version
# CI tests), installed with --no-deps into /tmp/site: the image's own torch is measured.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
# SKIP_WHEELS=1: use the interpreter's own packages (a venv here, where .whl's cp312 wheels
# may not fit).
if [[ "${SKIP_WHEELS:-0}" != 1 ]] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT_DIR=${OUT:-bench/out/device}
mkdir -p "$OUT_DIR"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
    --format=csv > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
# Per-run logs and results outside $OUT (the device tool brings back at most 8 files), then
# one archive of them into it.
RUNS=$(mktemp -d /tmp/bench_gpu_runs.XXXX)
rc=0
"$PY" bench/device/bench_gpu.py --out "$OUT_DIR" --runs-dir "$RUNS" "$@" || rc=$?
tar -czf "$OUT_DIR/runs.tar.gz" -C "$RUNS" . || true
exit $rc

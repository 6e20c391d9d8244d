#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks into .whl/ (git-ignored; ~4 MB), for
# bench/device/run.sh to install there with --no-deps. The image (Python 3.12) has torch
# 2.11, transformers 5.17, peft, accelerate, pyarrow, pandas, tqdm, xxhash, fsspec, but no
# trl, datasets (trl's PPOTrainer side) or pydantic (tasks/ppo.py's PPOConfig; the trainer
# module itself, tasks/ppo_trainer.py, needs only torch).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.12.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.15.0   # pydantic 2.12 needs >= 4.14.1; the image's version is unread
ls -la .whl

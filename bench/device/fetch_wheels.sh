#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks into .whl/ (git-ignored; ~18 MB), for
# bench/device/run.sh to install there with --no-deps. The image (Python 3.12) has torch
# 2.11, transformers 5.17, peft, accelerate, pyarrow, pandas, tqdm, xxhash, fsspec,
# huggingface_hub, tokenizers, but no trl, datasets (trl's PPOTrainer side) or pydantic
# (tasks/ppo.py's PPOConfig; the trainer module itself, tasks/ppo_trainer.py, needs only
# torch). transformers 5.24 is carried too: it is the version our venvs and tests use (the
# static cache's max_cache_len needs >= 5.2x), so both sides run the code CI checks.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl transformers==5.24.0 trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0   # the versions of bench/.venv-trl112 and the project venv
ls -la .whl

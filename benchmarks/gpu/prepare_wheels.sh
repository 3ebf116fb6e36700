#!/bin/bash
# Download the small wheels benchmarks/gpu/check.py needs on the GPU machine (which has torch, transformers,
# accelerate, numpy, but no deepspeed or faiss, and no package index) into benchmarks/gpu/wheels/ (git-ignored).
# Carry that folder with the run (the device tool's `carry`, 64 MiB in all); check.py installs from it with
# `pip install --no-index --find-links`. Targets the GPU machine's Python 3.12 on x86_64 Linux.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/wheels}
PY=${PY_VERSION:-3.12}
mkdir -p "$OUT"
BIN=(--only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux_2_28_x86_64 --implementation cp --no-deps -d "$OUT")
# DeepSpeed ships only a source distribution (pure Python + JIT-built ops; no op is prebuilt here). Its runtime
# dependencies are listed with --no-deps so that pip never pulls a CUDA torch build.
pip download --no-deps --no-binary=:all: -d "$OUT" "deepspeed==0.19.8"
pip download "${BIN[@]}" hjson ninja py-cpuinfo msgpack einops psutil nvidia-ml-py pydantic pydantic-core \
  annotated-types typing-inspection typing-extensions
# Exact CPU search to compare the GPU search with (optional: without it check.py compares with numpy).
pip download "${BIN[@]}" "faiss-cpu==1.15.1" || echo "faiss-cpu wheel not found: check.py will compare with numpy"
du -sh "$OUT"
ls -la "$OUT"

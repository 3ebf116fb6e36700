#!/usr/bin/env bash
# Installs lancer-dist and everything it needs into ./.venv (idempotent; ~3 min on a fresh machine).
# PyTorch goes in first, pinned, so that no dependency pulls the multi-GB CUDA wheels on a CPU machine.
# On a GPU machine set LANCER_TORCH_SPEC (e.g. "torch==2.13.0 --index-url <your CUDA wheel index>").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.lancer-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
python -m pip install -q ${LANCER_TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"

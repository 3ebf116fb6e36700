#!/usr/bin/env bash
# The test command of README.md: installs everything (scripts/install.sh), then lint, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp() { echo "[test.sh] $(date -u +%H:%M:%S) $*" >&2; }  # phase times in CI's log
stamp install
bash scripts/install.sh
bash scripts/install_schedulers.sh  # SLURM + munge for the integration tests (root only; else they skip)
. .venv/bin/activate
stamp lint
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ruff check lancer_dist launchers tests benchmarks
ruff format --check lancer_dist launchers tests benchmarks
mypy
stamp pytest
# A hard ceiling for the whole suite (CI allows 90 min; it takes ~20): a hang ends as a failure, not a CI timeout.
timeout --kill-after=60 "${LANCER_TEST_TIMEOUT_S:-3600}" python -m pytest tests --durations=30 "$@"

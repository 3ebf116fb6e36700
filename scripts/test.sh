#!/usr/bin/env bash
# The test command of README.md: installs everything (scripts/install.sh), then lint, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_schedulers.sh  # SLURM + munge for the integration tests (root only; else they skip)
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ruff check lancer_dist launchers tests benchmarks
ruff format --check lancer_dist launchers tests benchmarks
mypy
python -m pytest tests "$@"

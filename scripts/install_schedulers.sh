#!/usr/bin/env bash
# Installs the real schedulers the integration tests start (SLURM 22.05 + munge from Debian's packages).
# Idempotent: does nothing when slurmctld, slurmd and sbatch are already on PATH. Only runs as root (CI runs as
# root); elsewhere it prints why it skipped and the SLURM tests skip with that reason. Ray and MLflow come from
# pip (scripts/install.sh). Set LANCER_SKIP_SCHEDULERS=1 to skip on purpose.
set -euo pipefail
if [ "${LANCER_SKIP_SCHEDULERS:-0}" = "1" ]; then
  echo "install_schedulers: LANCER_SKIP_SCHEDULERS=1, not installing SLURM" >&2
  exit 0
fi
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "install_schedulers: not root, not installing SLURM (the SLURM tests will skip)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_schedulers: no apt-get, not installing SLURM (the SLURM tests will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A failed install must not fail the test command: the SLURM tests then skip and say why.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
  >/tmp/lancer-install-schedulers.log 2>&1; then
  echo "install_schedulers: apt-get failed (see /tmp/lancer-install-schedulers.log); SLURM tests will skip" >&2
  exit 0
fi
# The Debian postinst scripts may start daemons with the packaged config; the tests start their own, so stop those
# (by the pid files the packages write, never by name).
for pidfile in /run/slurmctld.pid /run/slurmd.pid /var/run/slurmctld.pid /var/run/slurmd.pid; do
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
  fi
done
echo "install_schedulers: installed $(slurmd -V)" >&2

#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian's slurm-wlm + munge, the test
# extra), then runs pytest. The tests start a single-node Slurm themselves and stop it by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  echo "test.sh: installing slurm-wlm and munge (Debian)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || true
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
fi
PY=$(bash scripts/install.sh --test | tail -n 1)
exec "$PY" -m pytest -q -ra "$@"

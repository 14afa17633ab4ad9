#!/usr/bin/env bash
# Start the single-node test Slurm (slurmctld + slurmd + munged) in the foreground, for trying
# the launcher against a real scheduler by hand. Prints the SLURM_CONF to export; Ctrl-C stops
# the daemons (by PID). Usage: scripts/start_slurm.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "start_slurm.sh: installing slurm-wlm and munge (Debian)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || true
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
  else
    echo "start_slurm.sh: Slurm is not installed; run: apt-get install -y --no-install-recommends slurm-wlm munge" >&2
    exit 1
  fi
fi
exec "${PYTHON:-python3}" -m tests.slurm_cluster "$@"

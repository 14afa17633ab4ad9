#!/usr/bin/env bash
# A real Slurm on this machine for trying the launcher by hand (the tests start their own).
#   scripts/start_slurm.sh [WORKDIR]
#       single node (tests/slurm_cluster.py) in the foreground; Ctrl-C stops the daemons (by PID)
#   scripts/start_slurm.sh --nodes 3 [--workdir DIR] [--foreground]
#       multi-node (tests/multinode_cluster.py, needs root): one network namespace per node; prints
#       what to export (SLURM_CONF), a shell command per node, the shared directory, and the stop
#       command; the daemons keep running after this script returns unless --foreground
#   scripts/start_slurm.sh --stop STATE_JSON
#       stop a multi-node cluster (by PID) and remove its namespaces, bridge and veths
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
case "${1:-}" in
  --nodes|--nodes=*|--stop|--stop=*|--workdir|--workdir=*|--foreground|-h|--help)
    exec "${PYTHON:-python3}" -m tests.multinode_cluster "$@" ;;
  *)
    exec "${PYTHON:-python3}" -m tests.slurm_cluster "$@" ;;
esac

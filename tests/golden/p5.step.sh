#!/bin/bash
# One per node: derive the rendezvous head from the step's CURRENT node list (it changes
# when HyperPod replaces a node or a requeued job lands elsewhere), then start the node's
# ranks with torchrun. Addresses come from Slurm (NodeAddr): node names need not be DNS names.
set -euo pipefail
cd /fsx/hyperlaunch
nodelist="${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}"
head=$(python -m cluster.hostlist --first "$nodelist")
node_addr() { scontrol show node "$1" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' || true; }
head_addr=$(node_addr "$head"); head_addr="${head_addr:-$head}"
self_addr=$(node_addr "${SLURMD_NODENAME:-$(hostname)}"); self_addr="${self_addr:-$(hostname)}"
nnodes="${SLURM_STEP_NUM_NODES:-$SLURM_JOB_NUM_NODES}"
# monitoring.prometheus=true (the run has prometheus.yml): one GPU/EFA node exporter per node,
# up before torchrun so start-up hangs show; it exits with torchrun (exec keeps this PID).
if [ -f /fsx/runs/golden-20260101-000000/prometheus.yml ] && [ -z "${HYPERLAUNCH_NODE_EXPORTER:-}" ]; then
  export HYPERLAUNCH_NODE_EXPORTER=1
  python -m monitoring.node_exporter --run-dir /fsx/runs/golden-20260101-000000 --parent-pid $$ &
fi
# the hang watchdog of this node (resilience.*): stacks, then a restart of the worker group
python -m cluster.watchdog --run-dir /fsx/runs/golden-20260101-000000 --parent-pid $$ &
exec python -m torch.distributed.run \
  --nnodes="$nnodes" \
  --nproc-per-node=8 \
  --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$head_addr:29500" \
  --local-addr="$self_addr" \
  --max-restarts=3 \
  -m trainer --config /fsx/runs/golden-20260101-000000/config.yaml

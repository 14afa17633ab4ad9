"""Render the sbatch script and the per-node step script of a run (pure functions).

Layout choice: ONE task per node running torchrun, which starts ``gpus_per_node`` ranks.
torchrun owns local ranks and the c10d rendezvous, so the same step works inside a
pyxis container (one container per node instead of eight) and after HyperPod's
``--auto-resume`` replaces a node: the step script derives the rendezvous head from the
step's current node list each time it starts, never from a list computed at submit time.

Quoting: every value that reaches the shell goes through ``shlex.quote``. ``#SBATCH``
lines are parsed by sbatch, not by a shell; values there are either validated safe paths
or slugs (``job_name_slug``), so nothing a user types can start a new shell line.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from cluster.local import TORCHRUN_ENV
from cluster.instances import EFA_LIBRARY_DIRS, GPU_ENV, efa_device_count_command, instance_env
from configs.hardware import lookup_instance
from configs.schema import ClusterConfig

STEP_SCRIPT = "step.sh"
CONTROL_DIR = "control"
SAVE_REQUEST = "save_and_exit"  # the trainer polls for this file (written on SIGUSR2)
FINISHED_MARK = "finished"  # the trainer writes this when all steps are done
REQUEUE_MARK = "requeue"  # cluster.watchdog.REQUEUE_MARK: a node was drained; requeue without it
PROMETHEUS_MARK = "prometheus.yml"  # monitoring.launch.PROMETHEUS_FILE: monitoring.prometheus=true
NODE_EXPORTER_ENV = "HYPERLAUNCH_NODE_EXPORTER"  # monitoring.node_exporter.STARTED_ENV
PREFLIGHT_EXIT = 3
QUARANTINE_FILE = "preflight_quarantine"  # cluster.health_report.QUARANTINE_FILE: node<TAB>reason lines
PREFLIGHT_GRACE_S = 120  # srun and container start-up on top of cluster.preflight.time_budget_s


@dataclass(frozen=True)
class JobPlan:
    """Everything the renderer needs, resolved by the launcher (no I/O here)."""

    run_name: str
    run_dir: str
    workdir: str
    cluster: ClusterConfig
    max_restarts: int = 0  # torchrun --max-restarts: in-job restarts of the worker group (resilience)
    watchdog: bool = False  # start the per-node hang watchdog (cluster.watchdog) next to torchrun


def job_name_slug(run_name: str) -> str:
    """A job name sbatch and squeue show safely: [A-Za-z0-9._-], at most 64 chars."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-.") or "run"
    return slug[:64]


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _header(plan: JobPlan) -> list[str]:
    c = plan.cluster
    logs = f"{plan.run_dir}/logs"
    lines = [
        f"--job-name={job_name_slug(plan.run_name)}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts gpus_per_node ranks
    ]
    if c.exclusive:
        lines.append("--exclusive")
    lines += ["--mem=0", f"--time={c.time_limit}", "--wait-all-nodes=1"]
    if c.gpus_per_node_flag:
        lines.append(f"--gpus-per-node={c.gpus_per_node}")
    for flag, value in (("partition", c.partition), ("account", c.account),
                        ("qos", c.qos), ("reservation", c.reservation)):
        if value:
            lines.append(f"--{flag}={value}")
    # append: a requeued job writes to the same files, and the attempt before it stays readable
    lines += [f"--output={logs}/%x_%j.out", f"--error={logs}/%x_%j.err", "--open-mode=append", "--export=ALL"]
    if c.requeue:
        lines.append("--requeue")
    if c.signal_seconds:
        # B: signal the batch shell only; it forwards the request to the ranks via a file,
        # because torchrun's agent would die on an unhandled SIGUSR2.
        lines.append(f"--signal=B:USR2@{c.signal_seconds}")
    if c.dependency:
        lines.append(f"--dependency={c.dependency}")
    lines += list(c.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def _env_block(plan: JobPlan) -> list[str]:
    c = plan.cluster
    out: list[str] = []
    inst = lookup_instance(c.instance_type) if c.instance_type else None
    if c.gpu_type != "cpu":
        out.append("# NCCL / CUDA for Megatron (TP comm overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1)")
        out += [f"export {k}={_q(v)}" for k, v in GPU_ENV]
    if inst is not None:
        out.append(f"# EFA / NCCL for {c.instance_type} ({inst.efa_devices} EFA devices); aws-ofi-nccl configures "
                   "libfabric itself (cluster/instances.py)")
        out += [f"export {k}={_q(v)}" for k, v in instance_env(inst.name, nvls=c.nccl_nvls)]
        if not c.container_image:
            dirs = ":".join(EFA_LIBRARY_DIRS)
            out.append("# no container: libfabric and the aws-ofi-nccl plugin from the EFA installer")
            out.append(f'export LD_LIBRARY_PATH="{dirs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"')
    if c.env:
        out.append("# user environment (cluster.env)")
        out += [f"export {k}={_q(v)}" for k, v in sorted(c.env.items())]
    if c.secret_env:
        out.append("# secrets: forwarded by name from the submitting environment (--export=ALL);")
        out.append("# their values are never written to this file")
        names = " ".join(_q(n) for n in c.secret_env)
        out.append(f"for name in {names}; do")
        out.append('  [ -n "${!name:-}" ] || echo "warning: secret $name is not set in the submitting environment" >&2')
        out.append("done")
    return out


def preflight_enabled(c: ClusterConfig) -> bool:
    """cluster.preflight.enabled; null: on for Slurm/HyperPod clusters, off for cluster=local."""
    return c.preflight.enabled if c.preflight.enabled is not None else c.kind != "local"


def _preflight(plan: JobPlan) -> list[str]:
    c = plan.cluster
    out = ["# preflight: fail fast with a clear message instead of a slow or silent fallback"]
    if c.container_image:
        out += [
            "if ! srun --help 2>&1 | grep -q -- '--container-image'; then",
            '  echo "preflight: pyxis is not installed (srun has no --container-image), but '
            'cluster.container_image is set. Install pyxis/enroot or set cluster.container_image=null." >&2',
            f"  exit {PREFLIGHT_EXIT}",
            "fi",
        ]
    if c.kind == "hyperpod":
        out += [
            'if [ ! -d "${HYPERLAUNCH_HYPERPOD_MARKER:-/opt/sagemaker_cluster}" ]; then',
            '  echo "preflight: this is not a SageMaker HyperPod cluster (/opt/sagemaker_cluster is missing), '
            'so srun --auto-resume=1 is unavailable. Use cluster=slurm (or cluster.kind=slurm)." >&2',
            f"  exit {PREFLIGHT_EXIT}",
            "fi",
        ]
    if preflight_enabled(c):
        return out + _health_step(plan)  # the EFA device count is one of its checks, per node
    if c.efa_devices > 0:
        check = (
            'export PATH="/opt/amazon/efa/bin:$PATH"; '
            "command -v fi_info >/dev/null || { echo \"preflight: fi_info not found on $(hostname): "
            "the EFA software (libfabric) is missing\" >&2; exit 1; }; "
            f"n=$({efa_device_count_command()}); "
            f"[ \"$n\" -ge {c.efa_devices} ] || {{ echo \"preflight: $(hostname) has $n EFA devices, "
            f"{c.instance_type or 'the cluster config'} has {c.efa_devices} (cluster.efa_devices); NCCL would "
            "lose bandwidth or fall back to TCP sockets\" >&2; exit 1; }; "
            f"echo \"preflight: $(hostname): $n EFA devices (expected {c.efa_devices})\""
        )
        inside = " ".join(_q(a) for a in _container_args(plan))  # the same libraries the training sees
        out += [
            f"if ! srun --ntasks-per-node=1 --kill-on-bad-exit=1 {inside + ' ' if inside else ''}bash -c {_q(check)}; then",
            '  echo "preflight: EFA check failed (see above); not starting training" >&2',
            f"  exit {PREFLIGHT_EXIT}",
            "fi",
        ]
    return out


def _health_step(plan: JobPlan) -> list[str]:
    """The node health checks on every node (cluster.healthcheck), then quarantine and requeue on failure."""
    c, p = plan.cluster, plan.cluster.preflight
    control = f"$RUN_DIR/{CONTROL_DIR}"
    ranks = c.gpus_per_node if c.gpu_type != "cpu" else 1  # one rank per GPU: each reaches its own EFA devices
    args = [f"--ntasks-per-node={ranks}", "--kill-on-bad-exit=0", "--export=ALL", "--label", *_container_args(plan)]
    srun = " ".join(_q(a) for a in args)
    command = f"{_q(c.python)} -m cluster.healthcheck worker --run-dir \"$RUN_DIR\""
    tasks = '"$SLURM_JOB_NUM_NODES"' if ranks == 1 else f"$((SLURM_JOB_NUM_NODES * {ranks}))"
    step = (f"timeout --kill-after=10 {p.time_budget_s + PREFLIGHT_GRACE_S} srun --nodes=\"$SLURM_JOB_NUM_NODES\" "
            f"--ntasks={tasks} {srun} {command}")
    replace = c.kind == "hyperpod" and p.hyperpod_replace
    what = "marked for replacement (HyperPod)" if replace else "drained and excluded"
    lines = [
        "",
        f"# preflight health checks (cluster.preflight, docs/preflight.md): GPUs (dcgmi diag -r {p.gpu_diag_level} or "
        "NVML), EFA devices and",
        f"# all-reduce bandwidth on every node within {p.time_budget_s} s; the verdict and every node's results go to",
        f"# $RUN_DIR/preflight/. Failing nodes are {what}, and the job requeues without them.",
        f"echo {_q('+ ' + step)}",
        step,
        "preflight_rc=$?",
        f"quarantine=\"{control}/{QUARANTINE_FILE}\"",
        'if [ -s "$quarantine" ]; then',
        "  trap '' TERM  # scontrol requeue signals this shell; what follows the requeue must still run",
        '  failed=""; exclude=""',
        "  while IFS=$'\\t' read -r node reason; do",
        '    [ -n "$node" ] || continue',
        '    failed="${failed:+$failed,}$node"',
    ]
    if replace:  # HyperPod replaces the instance; excluded from the job only when it cannot be marked
        lines += [
            '    echo "preflight: marking $node for replacement (HyperPod): $reason"',
            '    scontrol update nodename="$node" state=fail reason="Action:Replace" || { echo "preflight: cannot mark '
            '$node for replacement (needs Slurm admin rights); excluding it from this job instead" >&2; '
            'exclude="${exclude:+$exclude,}$node"; }',
        ]
    else:  # the job's own exclusion needs no rights, a drain does
        lines += [
            '    echo "preflight: draining $node: $reason"',
            '    scontrol update nodename="$node" state=drain reason="$reason" || echo "preflight: cannot drain $node '
            '(needs Slurm operator rights); excluding it from this job only" >&2',
            '    exclude="${exclude:+$exclude,}$node"',
        ]
    lines += ['  done < "$quarantine"', '  rm -f "$quarantine"']
    if c.requeue:
        lines += [
            '  before=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | sed -n \'s/.* ExcNodeList=\\([^ ]*\\).*/\\1/p\')',
            '  [ "$before" = "(null)" ] && before=""',
            '  if scontrol requeue "$SLURM_JOB_ID"; then',
            '    [ -z "$exclude" ] || scontrol update jobid="$SLURM_JOB_ID" ExcNodeList="${before:+$before,}$exclude" '
            '|| echo "preflight: could not exclude $exclude from the requeued job" >&2',
            '    echo "preflight: requeued without $failed"',
            "    exit 0",
            "  fi",
            '  echo "preflight: could not requeue; resubmit the job (without $failed)" >&2',
        ]
    else:
        lines += ['  echo "preflight: $failed failed; cluster.requeue=false, so resubmit the job" >&2']
    lines += [
        f"  exit {PREFLIGHT_EXIT}",
        "fi",
        'if [ "$preflight_rc" -ne 0 ]; then',
        '  echo "preflight: the health checks failed (status $preflight_rc; the table above and $RUN_DIR/preflight/ '
        'say why); not starting training" >&2',
        f"  exit {PREFLIGHT_EXIT}",
        "fi",
    ]
    return lines


def _container_args(plan: JobPlan) -> list[str]:
    c = plan.cluster
    if not c.container_image:
        return []
    args = [f"--container-image={c.container_image}"]
    if c.container_mounts:
        args.append(f"--container-mounts={','.join(c.container_mounts)}")
    return args + [f"--container-workdir={plan.workdir}"]


def _srun_args(plan: JobPlan) -> list[str]:
    c = plan.cluster
    args = ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL", "--label"]
    if c.kind == "hyperpod":
        args.append("--auto-resume=1")
    return args + _container_args(plan)


_UNSAFE_HEADER = re.compile(r"[\s'\"\\%$`;&|<>]")


def render_sbatch(plan: JobPlan) -> str:
    """The batch script: header, environment, preflight, the training step, requeue logic."""
    c = plan.cluster
    if _UNSAFE_HEADER.search(plan.run_dir):
        raise ValueError(f"run directory {plan.run_dir!r} cannot appear in an #SBATCH line; "
                         "choose a runs_root without spaces, quotes, %, $ or shell metacharacters")
    control = f"$RUN_DIR/{CONTROL_DIR}"
    srun = " ".join(_q(a) for a in _srun_args(plan))
    lines = ["#!/bin/bash", f"# {job_name_slug(plan.run_name)}: rendered by hyperlaunch; edit the config, not this file.",
             *_header(plan), "", "set -uo pipefail", "",
             f"RUN_DIR={_q(plan.run_dir)}", f"WORKDIR={_q(plan.workdir)}",
             "export HYPERLAUNCH_RUN_DIR=\"$RUN_DIR\"",
             f"export HYPERLAUNCH_RUN_NAME={_q(plan.run_name)}",
             f"export HYPERLAUNCH_CONTROL_DIR=\"{control}\"",
             "export PYTHONPATH=\"$WORKDIR${PYTHONPATH:+:$PYTHONPATH}\"",
             "# torchrun: a fresh TCP store per rendezvous round, or in-job restarts hang (cluster/local.py)",
             *[f"export {k}={_q(v)}" for k, v in TORCHRUN_ENV.items()],
             f"mkdir -p \"{control}\"",
             f"rm -f \"{control}/{SAVE_REQUEST}\"", ""]
    lines += _env_block(plan)
    lines += ["", 'echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart ${SLURM_RESTART_COUNT:-0}) at $(date -u +%FT%TZ)"',
              "env | sort | grep -E '^(FI_|NCCL_|TORCH_NCCL|CUDA_|SLURM_JOB|HYPERLAUNCH_)' || true", ""]
    lines += _preflight(plan)
    lines += [
        "",
        "# SIGUSR2 (--signal: the time limit is near): the ranks checkpoint and stop, the job requeues.",
        "# SIGTERM (scancel, preemption): the ranks checkpoint and stop, and the job does NOT requeue.",
        "requeue_wanted=0",
        "term_received=0",
        f"request_save() {{ echo \"batch: $1 received, requesting checkpoint\"; touch \"{control}/{SAVE_REQUEST}\"; }}",
        "trap 'request_save USR2; requeue_wanted=1' USR2",
        "trap 'request_save TERM; requeue_wanted=0; term_received=1' TERM",
        "",
        f"echo {_q('+ srun ' + srun + ' bash')} \"$RUN_DIR/{STEP_SCRIPT}\"",
        f"srun {srun} bash \"$RUN_DIR/{STEP_SCRIPT}\" &",
        "step_pid=$!",
        "# wait returns early (status > 128) when a trapped signal arrives: keep waiting",
        "while true; do",
        "  wait \"$step_pid\"; rc=$?",
        "  kill -0 \"$step_pid\" 2>/dev/null || break",
        "done",
        "echo \"training step exited with status $rc\"",
    ]
    if c.requeue:
        lines += [
            f"if [ \"$requeue_wanted\" = 1 ] && [ ! -e \"{control}/{FINISHED_MARK}\" ]; then",
            '  echo "batch: stopped before the end of training; requeueing to resume from the latest checkpoint"',
            '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
            "fi",
            "# the watchdog drained a node that hung repeatedly: start again without it",
            f"if [ -e \"{control}/{REQUEUE_MARK}\" ] && [ ! -e \"{control}/{FINISHED_MARK}\" ]; then",
            f"  echo \"batch: $(cat \"{control}/{REQUEUE_MARK}\"); requeueing to resume on other nodes\"",
            f"  rm -f \"{control}/{REQUEUE_MARK}\"",
            '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
            "fi",
        ]
    lines += [
        "# SIGTERM to this shell only (`launcher cancel`: scancel --batch --signal=TERM): the ranks stopped after the",
        "# same step and saved it; end the job as cancelled rather than completed",
        f"if [ \"$term_received\" = 1 ] && [ ! -e \"{control}/{FINISHED_MARK}\" ]; then",
        '  echo "batch: stopped on request after a checkpoint; cancelling the job (not requeued)"',
        "  trap '' TERM",
        '  scancel "$SLURM_JOB_ID"',
        "fi",
        "exit \"$rc\"", ""]
    return "\n".join(lines)


def render_step(plan: JobPlan) -> str:
    """Runs once per node inside the srun step (inside the container when configured)."""
    c = plan.cluster
    py = _q(c.python)
    mark = _q(f"{plan.run_dir}/{PROMETHEUS_MARK}")
    lines = [
        "#!/bin/bash",
        "# One per node: derive the rendezvous head from the step's CURRENT node list (it changes",
        "# when HyperPod replaces a node or a requeued job lands elsewhere), then start the node's",
        "# ranks with torchrun. Addresses come from Slurm (NodeAddr): node names need not be DNS names.",
        "set -euo pipefail",
        f"cd {_q(plan.workdir)}",
        'nodelist="${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}"',
        f'head=$({py} -m cluster.hostlist --first "$nodelist")',
        'node_addr() { scontrol show node "$1" -o 2>/dev/null | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\' || true; }',
        'head_addr=$(node_addr "$head"); head_addr="${head_addr:-$head}"',
        'self_addr=$(node_addr "${SLURMD_NODENAME:-$(hostname)}"); self_addr="${self_addr:-$(hostname)}"',
        'nnodes="${SLURM_STEP_NUM_NODES:-$SLURM_JOB_NUM_NODES}"',
        "# monitoring.prometheus=true (the run has prometheus.yml): one GPU/EFA node exporter per node,",
        "# up before torchrun so start-up hangs show; it exits with torchrun (exec keeps this PID).",
        f'if [ -f {mark} ] && [ -z "${{{NODE_EXPORTER_ENV}:-}}" ]; then',
        f"  export {NODE_EXPORTER_ENV}=1",
        f"  {py} -m monitoring.node_exporter --run-dir {_q(plan.run_dir)} --parent-pid $$ &",
        "fi",
    ]
    if plan.watchdog:
        lines += ["# the hang watchdog of this node (resilience.*): stacks, then a restart of the worker group",
                  f"{py} -m cluster.watchdog --run-dir {_q(plan.run_dir)} --parent-pid $$ &"]
    lines += [
        f"exec {py} -m torch.distributed.run \\",
        '  --nnodes="$nnodes" \\',
        f"  --nproc-per-node={c.gpus_per_node} \\",
        '  --rdzv-id="$SLURM_JOB_ID" \\',
        "  --rdzv-backend=c10d \\",
        f'  --rdzv-endpoint="$head_addr:{c.rdzv_port}" \\',
        '  --local-addr="$self_addr" \\',
        f"  --max-restarts={plan.max_restarts} \\",
        f"  -m trainer --config {_q(plan.run_dir + '/config.yaml')}",
        "",
    ]
    return "\n".join(lines)

"""The preflight step of the rendered job.sbatch, executed with stub srun/scontrol/python on PATH: what the
batch script does with the health checks' verdict (drain or replace, exclude, requeue, or stop), with
hostile node names and reasons kept inert. The real thing runs in tests/multinode/test_preflight.py."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from cluster.sbatch import JobPlan, preflight_enabled, render_sbatch, render_step
from configs.preflight_config import PreflightConfig
from configs.schema import ClusterConfig

EVIL_REASON = "hyperlaunch preflight: net.link: $(touch PWNED) `touch PWNED` \"; touch PWNED; \" 0.001 GB/s"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_job(tmp_path: Path, cluster: ClusterConfig, *, verdict: str, quarantine: str = "",
            refuse: str = "") -> tuple[
        subprocess.CompletedProcess[str], list[list[str]], bool]:
    """Run job.sbatch; the stub healthcheck writes ``quarantine`` and exits 1 unless ``verdict`` is pass.

    Returns the result, every scontrol call (argv) and whether training started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    calls, trained = tmp_path / "scontrol_calls", tmp_path / "trained"
    _stub(bin_dir, "srun", 'if [ "${1:-}" = --help ]; then echo "  --container-image=IMAGE"; exit 0; fi\n'
          'while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir, "scontrol", f'printf "%s\\0" "$@" >> {calls}; printf "\\n" >> {calls}\n'
          'if [ "$1" = show ] && [ "$2" = job ]; then echo "JobId=77 JobName=r ExcNodeList=node9 NodeList=node[1-2]"; fi\n'
          + (f'[ "$3" = {shlex.quote(refuse)} ] && {{ echo "slurm_update error: Invalid user id" >&2; exit 1; }}\n'
             if refuse else "") + "exit 0\n")
    healthcheck = {"pass": "exit 0", "fail": "exit 1",
                   "quarantine": f'printf %s {shlex.quote(quarantine)} > "$HYPERLAUNCH_CONTROL_DIR/preflight_quarantine"; exit 1'}
    _stub(bin_dir, "stubpython", 'if [ "$2" = cluster.hostlist ]; then echo node1; exit 0; fi\n'
          f'if [ "$2" = cluster.healthcheck ]; then [ "$3 $4" = "worker --run-dir" ] || exit 9; {healthcheck[verdict]}; fi\n'
          f'touch {trained}\n')
    cluster.python = str(bin_dir / "stubpython")
    plan = JobPlan("r", str(tmp_path / "run"), str(tmp_path), cluster)
    Path(plan.run_dir).mkdir(parents=True)
    (Path(plan.run_dir) / "job.sbatch").write_text(render_sbatch(plan))
    (Path(plan.run_dir) / "step.sh").write_text(render_step(plan))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "HOME": str(tmp_path), "HYPERLAUNCH_HYPERPOD_MARKER": str(tmp_path)}
    proc = subprocess.run(["bash", str(Path(plan.run_dir) / "job.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    argv = [line.split("\0")[:-1] for line in calls.read_text().splitlines()] if calls.exists() else []
    argv = [a for a in argv if a[:2] != ["show", "node"]]  # step.sh resolving NodeAddr
    assert not list(tmp_path.rglob("PWNED")), "an injected command ran"
    return proc, argv, trained.exists()


def slurm(**kw) -> ClusterConfig:
    return ClusterConfig(kind="slurm", gpu_type="cpu", gpus_per_node=1, nodes=2, **kw)


def test_healthy_nodes_start_training(tmp_path: Path) -> None:
    proc, calls, trained = run_job(tmp_path, slurm(), verdict="pass")
    assert proc.returncode == 0 and trained and calls == [], proc.stderr


def test_failing_nodes_are_drained_excluded_and_the_job_requeues(tmp_path: Path) -> None:
    lines = f"node2\t{EVIL_REASON}\nnode 3;x\tsecond reason\n"
    proc, calls, trained = run_job(tmp_path, slurm(), verdict="quarantine", quarantine=lines)
    assert proc.returncode == 0 and not trained, proc.stdout + proc.stderr
    assert calls == [
        ["update", "nodename=node2", "state=drain", f"reason={EVIL_REASON}"],
        ["update", "nodename=node 3;x", "state=drain", "reason=second reason"],
        ["show", "job", "77", "-o"],
        ["requeue", "77"],
        ["update", "jobid=77", "ExcNodeList=node9,node2,node 3;x"],  # the job's own exclusions are kept
    ]
    assert "preflight: requeued without node2,node 3;x" in proc.stdout
    assert not (tmp_path / "run" / "control" / "preflight_quarantine").exists()


def test_hyperpod_nodes_are_marked_for_replacement(tmp_path: Path) -> None:
    cluster = ClusterConfig(kind="hyperpod", gpu_type="cpu", nodes=2, preflight=PreflightConfig(hyperpod_replace=True))
    proc, calls, trained = run_job(tmp_path, cluster, verdict="quarantine", quarantine=f"node2\t{EVIL_REASON}\n")
    assert proc.returncode == 0 and not trained
    assert calls == [["update", "nodename=node2", "state=fail", "reason=Action:Replace"], ["show", "job", "77", "-o"],
                     ["requeue", "77"]]  # a replaced node comes back healthy: not excluded
    assert EVIL_REASON in proc.stdout  # the reason is logged; HyperPod reads only Action:Replace


def test_without_slurm_rights_the_nodes_are_still_excluded_from_the_job(tmp_path: Path) -> None:
    proc, calls, _ = run_job(tmp_path / "drain", slurm(), verdict="quarantine", quarantine="node2\tr\n",
                             refuse="state=drain")
    assert calls[-1] == ["update", "jobid=77", "ExcNodeList=node9,node2"] and proc.returncode == 0
    assert "cannot drain node2 (needs Slurm operator rights)" in proc.stderr
    hyperpod = ClusterConfig(kind="hyperpod", gpu_type="cpu", nodes=2, preflight=PreflightConfig(hyperpod_replace=True))
    proc, calls, _ = run_job(tmp_path / "replace", hyperpod, verdict="quarantine", quarantine="node2\tr\n",
                             refuse="state=fail")
    assert calls[-1] == ["update", "jobid=77", "ExcNodeList=node9,node2"] and proc.returncode == 0
    assert "cannot mark node2 for replacement (needs Slurm admin rights)" in proc.stderr


def test_without_requeue_the_job_stops_after_draining(tmp_path: Path) -> None:
    proc, calls, trained = run_job(tmp_path, slurm(requeue=False), verdict="quarantine", quarantine="node2\tr\n")
    assert proc.returncode == 3 and not trained
    assert calls == [["update", "nodename=node2", "state=drain", "reason=r"]]
    assert "cluster.requeue=false, so resubmit the job" in proc.stderr


def test_a_failed_preflight_without_quarantine_stops_the_job(tmp_path: Path) -> None:
    proc, calls, trained = run_job(tmp_path, slurm(), verdict="fail")
    assert proc.returncode == 3 and not trained and calls == []
    assert "the health checks failed (status 1" in proc.stderr


@pytest.mark.parametrize("cluster,expected", [
    (ClusterConfig(kind="local"), False),
    (ClusterConfig(kind="slurm"), True),
    (ClusterConfig(kind="hyperpod"), True),
    (ClusterConfig(kind="slurm", preflight=PreflightConfig(enabled=False)), False),
    (ClusterConfig(kind="local", preflight=PreflightConfig(enabled=True)), True),
])
def test_on_for_slurm_and_hyperpod_off_for_local(cluster: ClusterConfig, expected: bool) -> None:
    assert preflight_enabled(cluster) is expected


def test_disabled_health_checks_leave_the_plain_efa_count() -> None:
    cluster = ClusterConfig(kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8, instance_type="ml.p5.48xlarge",
                            efa_devices=32, preflight=PreflightConfig(enabled=False))
    text = render_sbatch(JobPlan("r", "/fsx/r", "/fsx/code", cluster))
    assert "cluster.healthcheck" not in text and "fi_info -p efa" in text


def test_gpu_nodes_run_one_rank_per_gpu_within_the_budget() -> None:
    cluster = ClusterConfig(kind="slurm", gpu_type="h100-80gb", gpus_per_node=8,
                            preflight=PreflightConfig(time_budget_s=240, gpu_diag_level=2))
    text = render_sbatch(JobPlan("r", "/fsx/r", "/fsx/code", cluster))
    step = next(line for line in text.splitlines() if line.startswith("timeout "))
    assert step.startswith("timeout --kill-after=10 360 srun")
    assert "--ntasks=$((SLURM_JOB_NUM_NODES * 8)) --ntasks-per-node=8" in step and "--kill-on-bad-exit=0" in step
    assert "dcgmi diag -r 2" in text

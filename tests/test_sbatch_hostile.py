"""Hostile names, paths and env values never reach a shell unquoted.

The rendered scripts are EXECUTED with stub srun/scontrol/python/fi_info on PATH; the
test fails if any injected command runs or if an argument arrives altered.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.sbatch import JobPlan, job_name_slug, render_sbatch, render_step
from configs.preflight_config import PreflightConfig
from configs.schema import ClusterConfig

# cluster.preflight off: the batch script's own EFA count (with the health checks on, the count is one
# of their per-node checks: tests/cluster/test_health_script.py)
NO_HEALTH_CHECKS = PreflightConfig(enabled=False)

HOSTILE = ["a'; touch PWNED; echo '", "a\ntouch PWNED", "$(touch PWNED)", "`touch PWNED`", 'x" ; touch PWNED ; "']


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fi_info(devices: int) -> str:
    """What ``fi_info -p efa -t FI_EP_RDM`` prints: one block per device (its ``domain``)."""
    return "".join(f"echo 'provider: efa'; echo '    fabric: efa'; echo '    domain: rdmap{16 + i}s27-rdm'; "
                   "echo '    version: 120.0'; echo '    type: FI_EP_RDM'; echo '    protocol: FI_PROTO_EFA'\n"
                   for i in range(devices))


def _run(tmp_path: Path, plan: JobPlan, efa_devices: int = 32) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_log = tmp_path / "python_argv.txt"
    _stub(bin_dir, "srun", 'if [ "${1:-}" = --help ]; then echo "  --container-image=IMAGE"; exit 0; fi\n'
          'while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_dir, "scontrol", "exit 0\n")
    _stub(bin_dir, "fi_info", _fi_info(efa_devices))
    # the cluster.python stub: hostlist queries print a head; anything else records its argv
    _stub(bin_dir, "stubpython", f'if [ "$2" = cluster.hostlist ]; then echo head-node; exit 0; fi\n'
          f'printf "%s\\0" "$@" > {argv_log}\nenv > {tmp_path}/env.txt\n')
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(plan.run_dir) / "job.sbatch").write_text(render_sbatch(plan))
    (Path(plan.run_dir) / "step.sh").write_text(render_step(plan))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_JOB_NUM_NODES": "2", "HOME": str(tmp_path), "HYPERLAUNCH_HYPERPOD_MARKER": str(tmp_path)}
    proc = subprocess.run(["bash", str(Path(plan.run_dir) / "job.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, argv_log


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_values_are_inert(tmp_path: Path, evil: str) -> None:
    workdir = tmp_path / f"code {evil}"
    workdir.mkdir()
    cluster = ClusterConfig(name="slurm", kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8, nodes=2,
                            instance_type="ml.p5.48xlarge", efa_devices=32, container_image=None,
                            python=str(tmp_path / "bin" / "stubpython"), env={"EVIL": evil, "PLAIN": "1"},
                            secret_env=["WANDB_API_KEY"])
    plan = JobPlan(run_name=evil, run_dir=str(tmp_path / "runs" / "r1"), workdir=str(workdir), cluster=cluster)
    proc, argv_log = _run(tmp_path, plan)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED")), "an injected command ran"
    argv = argv_log.read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--rdzv-endpoint=head-node:29500" in argv and argv[-1] == f"{plan.run_dir}/config.yaml"
    env = (tmp_path / "env.txt").read_text()
    assert f"HYPERLAUNCH_RUN_NAME={evil}" in env and f"EVIL={evil}" in env
    assert "LD_LIBRARY_PATH=/opt/amazon/efa/lib:/opt/amazon/ofi-nccl/lib" in env  # no container: the plugin's path
    assert "secret WANDB_API_KEY is not set" in proc.stderr
    header = [line for line in render_sbatch(plan).splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --job-name={job_name_slug(evil)}" in header and "\n" not in job_name_slug(evil)


def test_secret_values_never_written(tmp_path: Path) -> None:
    os.environ["WANDB_API_KEY"] = "sk-very-secret-value"
    try:
        cluster = ClusterConfig(kind="slurm", gpu_type="h100-80gb", gpus_per_node=8, secret_env=["WANDB_API_KEY"])
        text = render_sbatch(JobPlan("r", "/fsx/r", "/fsx/code", cluster))
    finally:
        del os.environ["WANDB_API_KEY"]
    assert "sk-very-secret-value" not in text and "WANDB_API_KEY" in text


def test_efa_preflight_fails_fast(tmp_path: Path) -> None:
    cluster = ClusterConfig(kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8, nodes=2,
                            instance_type="ml.p5.48xlarge", efa_devices=32, python=str(tmp_path / "bin" / "stubpython"),
                            preflight=NO_HEALTH_CHECKS)
    plan = JobPlan("r", str(tmp_path / "run"), str(tmp_path), cluster)
    proc, argv_log = _run(tmp_path, plan, efa_devices=0)
    assert proc.returncode == 3
    assert "has 0 EFA devices, ml.p5.48xlarge has 32" in proc.stderr and "fall back to TCP" in proc.stderr
    assert not argv_log.exists(), "training started despite the failed preflight"


def test_efa_preflight_counts_devices(tmp_path: Path) -> None:
    """A degraded node (16 of 32 devices) fails the preflight; the count is devices, not endpoints."""
    cluster = ClusterConfig(kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8, nodes=2,
                            instance_type="ml.p5.48xlarge", efa_devices=32, python=str(tmp_path / "bin" / "stubpython"),
                            preflight=NO_HEALTH_CHECKS)
    plan = JobPlan("r", str(tmp_path / "run"), str(tmp_path), cluster)
    proc, argv_log = _run(tmp_path, plan, efa_devices=16)
    assert proc.returncode == 3 and "has 16 EFA devices, ml.p5.48xlarge has 32" in proc.stderr
    assert not argv_log.exists()


def test_pyxis_preflight(tmp_path: Path) -> None:
    cluster = ClusterConfig(kind="slurm", gpu_type="h100-80gb", gpus_per_node=8, container_image="/fsx/img.sqsh",
                            python=str(tmp_path / "bin" / "stubpython"))
    plan = JobPlan("r", str(tmp_path / "run"), str(tmp_path), cluster)
    bin_dir = tmp_path / "bin"
    proc, _ = _run(tmp_path, plan)
    assert proc.returncode == 0, proc.stderr
    _stub(bin_dir, "srun", "echo usage; exit 0\n")  # an srun without pyxis
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.run(["bash", f"{plan.run_dir}/job.sbatch"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "pyxis is not installed" in proc.stderr


def test_unsafe_run_dir_refused_by_renderer() -> None:
    with pytest.raises(ValueError, match="cannot appear in an #SBATCH line"):
        render_sbatch(JobPlan("r", "/fsx/runs/a b", "/w", ClusterConfig(kind="slurm")))
    with pytest.raises(ValueError):
        render_sbatch(JobPlan("r", "/fsx/runs/a\n#SBATCH --x", "/w", replace(ClusterConfig(), kind="slurm")))


def test_hyperpod_preflight_refuses_plain_slurm(tmp_path: Path) -> None:
    cluster = ClusterConfig(kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8,
                            python=str(tmp_path / "bin" / "stubpython"))
    plan = JobPlan("r", str(tmp_path / "run"), str(tmp_path), cluster)
    proc, argv_log = _run(tmp_path, plan)
    assert proc.returncode == 0, proc.stderr
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1",
           "HYPERLAUNCH_HYPERPOD_MARKER": str(tmp_path / "absent")}
    proc = subprocess.run(["bash", f"{plan.run_dir}/job.sbatch"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "not a SageMaker HyperPod cluster" in proc.stderr

"""Golden files for the rendered sbatch and step scripts.

On a mismatch the test prints a diff. Regenerate after an intended change with:
    UPDATE_GOLDEN=1 python -m pytest tests/test_sbatch_golden.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from cluster.sbatch import JobPlan, render_sbatch, render_step
from tests.compose import compose_root

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = "/fsx/runs/golden-20260101-000000"

CASES = {
    "p5": ("config=llama3_70b_p5", "cluster.nodes=32"),
    "p4de": ("config=llama3_70b_p5", "cluster=hyperpod_p4de", "cluster.nodes=16", "parallelism.pp=8",
             "parallelism.vpp=null", "cluster.container_image=null", "cluster.container_mounts=[]",
             "cluster.partition=train", "cluster.account=ml-team", "+cluster.env.NCCL_DEBUG_SUBSYS=INIT"),
    "slurm": ("config=llama3_70b_p5", "cluster=slurm", "cluster.nodes=4", "parallelism.pp=4", "parallelism.vpp=null",
              "cluster.partition=gpu", "cluster.time_limit=12:00:00", "cluster.dependency=afterok:4242",
              "cluster.container_image=null", "cluster.container_mounts=[]", "cluster.python=/opt/venv/bin/python",
              "cluster.workdir=/home/me/hyperlaunch", "cluster.extra_sbatch=['--constraint=h100']"),
}


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
        return
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
        pytest.fail(f"{name} differs from its golden file:\n{diff}\n"
                    "If the change is intended: UPDATE_GOLDEN=1 python -m pytest tests/test_sbatch_golden.py")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    root = compose_root(*CASES[case])
    plan = JobPlan(run_name=root.run_name, run_dir=RUN_DIR, workdir=root.cluster.workdir or "/fsx/hyperlaunch",
                   cluster=root.cluster, max_restarts=root.resilience.max_restarts,
                   watchdog=root.resilience.watchdog)  # as launcher.app.render_files builds it
    _check(f"{case}.sbatch", render_sbatch(plan))
    _check(f"{case}.step.sh", render_step(plan))


def test_p5_script_has_what_p5_engineers_expect() -> None:
    text = (GOLDEN / "p5.sbatch").read_text()
    for needle in ("#SBATCH --nodes=32", "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --requeue",
                   "--signal=B:USR2@300",
                   "NCCL_SOCKET_IFNAME='^lo,docker0,veth_def_agent'", "CUDA_DEVICE_MAX_CONNECTIONS=1",
                   "--auto-resume=1", "--container-image=/fsx/apps/hyperlaunch-megatron.sqsh",
                   "--container-mounts=/fsx:/fsx", "--kill-on-bad-exit=1", "-m cluster.healthcheck worker"):
        assert needle in text, needle
    # settings current aws-ofi-nccl / PyTorch guidance has moved past (cluster/instances.py)
    for stale in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_AVOID_RECORD_STREAMS", "FI_PROVIDER",
                  "FI_EFA_SET_CUDA_SYNC_MEMOPS", "NCCL_NVLS_ENABLE", "NCCL_BUFFSIZE"):
        assert stale not in text, stale
    assert "LD_LIBRARY_PATH" not in text  # the container image carries its own libraries
    # the health checks (GPUs, EFA device count, bandwidth: cluster/healthcheck.py) run where training runs,
    # one rank per GPU, within the time budget; failing nodes are drained and excluded, the job requeues
    preflight = next(line for line in text.splitlines() if line.startswith("timeout ") and "cluster.healthcheck" in line)
    assert "--container-image=/fsx/apps/hyperlaunch-megatron.sqsh" in preflight and "--ntasks-per-node=8" in preflight
    assert preflight.startswith("timeout --kill-after=10 300 srun")  # time_budget_s=180 + start-up
    assert 'state=drain reason="$reason"' in text and "ExcNodeList=" in text and "fi_info" not in text
    assert "--gpus-per-node" not in text  # HyperPod: exclusive nodes, GRES often absent
    step = (GOLDEN / "p5.step.sh").read_text()
    assert "--rdzv-backend=c10d" in step and "--nproc-per-node=8" in step and "SLURM_STEP_NODELIST" in step
    assert "--max-restarts=3" in step and "-m cluster.watchdog" in step and '--local-addr="$self_addr"' in step
    assert "--open-mode=append" in text


def test_generic_slurm_requests_gpus_and_has_no_efa() -> None:
    text = (GOLDEN / "slurm.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --dependency=afterok:4242" in text
    assert "FI_PROVIDER" not in text and "--auto-resume" not in text and "fi_info" not in text
    p4de = (GOLDEN / "p4de.sbatch").read_text()
    assert "FI_EFA_USE_DEVICE_RDMA" not in p4de and "-m cluster.healthcheck worker" in p4de


@pytest.mark.parametrize("nvls,line", [(None, None), (False, "export NCCL_NVLS_ENABLE=0"),
                                       (True, "export NCCL_NVLS_ENABLE=1")])
def test_nvls_is_a_switch_left_to_nccl_by_default(nvls, line) -> None:
    from configs.schema import ClusterConfig

    cluster = ClusterConfig(kind="hyperpod", gpu_type="h100-80gb", gpus_per_node=8, instance_type="ml.p5.48xlarge",
                            efa_devices=32, nccl_nvls=nvls)
    text = render_sbatch(JobPlan("r", "/fsx/r", "/fsx/code", cluster))
    assert (line in text) if line else ("NCCL_NVLS_ENABLE" not in text)

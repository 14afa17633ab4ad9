"""Multi-node training through the launcher on the 3-node test Slurm: the rendered job.sbatch/step.sh
run one torchrun per node, the c10d rendezvous and gloo collectives cross "nodes" (namespaces).

* DP=2 across nodes, and TP=2 within a node x DP=2 across nodes, give the single-node losses;
* a node killed mid-run (slurmd and every process in its namespace): Slurm marks it DOWN, requeues
  the job, it starts on the two healthy nodes (a new rendezvous head) and resumes from the last
  commit with the uninterrupted run's losses;
* a rank on the second node hangs: both nodes' watchdogs stop the group, torchrun restarts it in the
  same allocation (no requeue), and training resumes with the same losses;
* USR2 before the time limit reaches every node's ranks: they stop after the same step, save, the
  job requeues and finishes;
* `launcher cancel` (SIGTERM to the batch shell) stops every node's ranks after the same step with a
  checkpoint, and the job ends CANCELLED, not requeued.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import launcher as local_launcher
from tests.e2e import losses, only_run
from tests.faults import fault_env
from tests.multinode_cluster import MultiNodeSlurm

pytestmark = [pytest.mark.multinode]
BASE = ["config=tiny_local", "training.precision=fp32", "monitoring.prometheus=false", "training.train_steps=16"]
SLURM = ["cluster=slurm", "cluster.gpu_type=cpu", "cluster.gpus_per_node_flag=false", f"cluster.python={sys.executable}",
         "cluster.time_limit=00:15:00", "cluster.signal_seconds=30"]
STEP = re.compile(r"step=(\d+)/\d+ loss=([0-9.]+)")


def by_step(text: str) -> dict[int, float]:
    """The last loss printed for every step (a resumed run prints the re-run steps again)."""
    return {int(m.group(1)): float(m.group(2)) for m in STEP.finditer(text)}


def reference(tmp_path: Path, nproc: int, *extra: str) -> dict[int, float]:
    proc = local_launcher(*BASE, f"cluster.gpus_per_node={nproc}", f"runs_root={tmp_path / 'ref'}", *extra,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return by_step((only_run(tmp_path / "ref") / "logs" / "local.out").read_text())


def submit(cluster: MultiNodeSlurm, runs: Path, *overrides: str, env: dict[str, str] | None = None) -> tuple[Path, str]:
    proc = cluster.launcher(*BASE, *SLURM, f"runs_root={runs}", *overrides, env=env, timeout_s=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = only_run(runs)
    return run, str(json.loads((run / "job.json").read_text())["job_id"])


def log_text(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "logs").glob("*.out")))


def wait_done(cluster: MultiNodeSlurm, run: Path, timeout_s: float = 300) -> str:
    proc = cluster.launcher("wait", str(run), "--timeout", str(timeout_s), "--max-interval", "2",
                            timeout_s=timeout_s + 60)
    state = json.loads((run / "job.json").read_text()).get("state")
    assert proc.returncode == 0, f"{state}\n{log_text(run)[-4000:]}\n{cluster.log_tails()}"
    return str(state)


def wait_for_step(run: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step in by_step(log_text(run)):
            return
        time.sleep(0.5)
    raise AssertionError(f"step {step} never logged:\n{log_text(run)[-3000:]}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,nproc,layout", [("dp2", 1, []), ("tp2_dp2", 2, ["parallelism.tp=2"])])
def test_multinode_losses_equal_single_node(multinode: MultiNodeSlurm, tmp_path: Path, name: str, nproc: int,
                                            layout: list[str]) -> None:
    expected = reference(tmp_path, 2 * nproc, *layout)
    run, _ = submit(multinode, tmp_path / "runs", "cluster.nodes=2", f"cluster.gpus_per_node={nproc}", *layout)
    assert wait_done(multinode, run) == "COMPLETED"
    text = log_text(run)
    assert by_step(text) == pytest.approx(expected, abs=2e-4)
    world = 2 * nproc
    assert f"layout: world={world}" in text and ("dp=2" in text)
    nodes = set(re.findall(r"job \d+ on (\S+)", text))
    assert nodes and all("node" in n for n in nodes)


@pytest.mark.timeout(900)
def test_node_loss_requeues_and_resumes_on_the_survivors(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
    steps = ["training.train_steps=40", "checkpoint.enabled=true", "checkpoint.save_interval=4"]
    expected = reference(tmp_path, 2, *steps)
    run, job_id = submit(multinode, tmp_path / "runs", "cluster.nodes=2", "cluster.gpus_per_node=1",
                         "resilience.max_restarts=0", *steps)
    wait_for_step(run, 10, 240)
    batch_host = multinode.job_fields(job_id).get("BatchHost", "node1")
    killed_at = time.monotonic()
    multinode.kill_node(batch_host)  # slurmd and every process of the node, as a dead instance
    multinode.wait_until(lambda: multinode.node_states().get(batch_host, "").startswith("down"), 90,
                         f"{batch_host} down")
    down_s = time.monotonic() - killed_at
    assert wait_done(multinode, run, timeout_s=400) == "COMPLETED"
    text = log_text(run)
    assert "(restart 1)" in text, text[-3000:]  # SLURM_RESTART_COUNT=1: Slurm requeued the job itself
    second = text[text.index("(restart 1)"):]
    assert batch_host not in re.search(r"job \d+ on (\S+) \(restart 1\)", text).group(1)  # type: ignore[union-attr]
    assert re.search(r"checkpoint: resumed from \S+step_000000(0[4-9]|1[0-9])", second), second[-3000:]
    assert by_step(text) == pytest.approx(expected, abs=2e-4)
    print(f"node {batch_host} killed: DOWN after {down_s:.1f} s")


@pytest.mark.timeout(900)
def test_hung_rank_on_another_node_restarts_in_place(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
    steps = ["training.train_steps=16", "checkpoint.enabled=true", "checkpoint.save_interval=2"]
    expected = reference(tmp_path, 2, *steps)
    run, _ = submit(multinode, tmp_path / "runs", "cluster.nodes=2", "cluster.gpus_per_node=1", *steps,
                    "resilience.max_restarts=1", "resilience.floor_s=8", "resilience.startup_s=180",
                    "resilience.poll_s=1", env=fault_env("hang:rank=1,step=6", base={}))
    assert wait_done(multinode, run, timeout_s=500) == "COMPLETED"
    text = log_text(run) + "\n".join(p.read_text(errors="replace") for p in (run / "logs").glob("*.err"))
    assert "watchdog: HANG" in text and "(restart 1)" not in text  # restarted inside the job, not requeued
    event = json.loads(next((run / "hangs").glob("attempt-*.json")).read_text())
    hosts = {h for _, h in event["suspects"] or event["laggards"]}
    assert 1 in {r for r, _ in event["suspects"] or event["laggards"]} and hosts <= {"node1", "node2", "node3"}
    assert len(list((run / "hangs").glob("*.txt"))) >= 1  # stack dumps
    assert by_step(log_text(run)) == pytest.approx(expected, abs=2e-4)


@pytest.mark.timeout(900)
def test_usr2_stops_every_node_after_the_same_step_and_requeues(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
    steps = ["training.train_steps=60", "checkpoint.enabled=true", "checkpoint.save_interval=10"]
    run, job_id = submit(multinode, tmp_path / "runs", "cluster.nodes=2", "cluster.gpus_per_node=1", *steps)
    wait_for_step(run, 6, 240)
    assert multinode.run("scancel", "--batch", "--signal=USR2", job_id).returncode == 0
    assert wait_done(multinode, run, timeout_s=500) == "COMPLETED"
    text = log_text(run)
    stops = re.findall(r"stop requested \(control file\): stopping after step (\d+)/60", text)
    assert len(stops) == 1, text[-3000:]
    stopped = int(stops[0])
    assert f"checkpoint: resumed from" in text and "(restart 1)" in text
    assert re.search(rf"resumed from \S+step_{stopped:08d}", text), text[-3000:]  # the stop save, on both nodes
    assert sorted(by_step(text)) == list(range(1, 61))


@pytest.mark.timeout(600)
def test_cancel_stops_every_node_after_the_same_step_with_a_checkpoint(multinode: MultiNodeSlurm,
                                                                       tmp_path: Path) -> None:
    steps = ["training.train_steps=100000", "checkpoint.enabled=true", "checkpoint.save_interval=100000"]
    run, job_id = submit(multinode, tmp_path / "runs", "cluster.nodes=2", "cluster.gpus_per_node=1", *steps)
    wait_for_step(run, 6, 240)
    cancel = multinode.launcher("cancel", str(run), timeout_s=60)
    assert cancel.returncode == 0 and "every rank stops after the same step" in cancel.stdout, cancel.stdout
    deadline = time.monotonic() + 240
    while json.loads((run / "job.json").read_text()).get("state") not in ("CANCELLED", "COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, log_text(run)[-3000:]
        multinode.launcher("status", str(run), timeout_s=60)
        time.sleep(1)
    assert json.loads((run / "job.json").read_text())["state"] == "CANCELLED"
    text = log_text(run)
    stops = re.findall(r"stopping after step (\d+)/100000", text)
    assert len(stops) == 1, text[-3000:]
    stopped = int(stops[0])
    manifest = json.loads((run / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").read_text())
    writers = {name.split("_")[2] for name in manifest["files"] if name.startswith("__")}  # __<rank>_<n>.distcp
    assert writers == {"0", "1"}, manifest["files"]  # the save is collective: the ranks of both nodes wrote it
    assert max(by_step(text)) == stopped and "(restart 1)" not in text and "requeueing" not in text
    assert "batch: stopped on request after a checkpoint; cancelling the job" in text
    print(f"cancelled: both nodes stopped after step {stopped}; checkpoint files {sorted(writers)[:4]}")

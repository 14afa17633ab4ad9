"""The launcher against a REAL single-node Slurm (slurmctld + slurmd started by the fixture):
render -> sbatch -> srun step -> torchrun -> 2 training ranks; status, cancel, failures."""

from __future__ import annotations

import calendar
import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import job_record, launcher, losses, only_run

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.timeout(300)]

SLURM_CPU = ["config=tiny_local", "cluster=slurm", "cluster.gpu_type=cpu", "cluster.gpus_per_node=2",
             "cluster.gpus_per_node_flag=false", f"cluster.python={sys.executable}", "cluster.time_limit=00:10:00",
             "cluster.signal_seconds=60"]


def _submit(tmp_path: Path, *extra: str) -> Path:
    proc = launcher(*SLURM_CPU, *extra, f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout
    return only_run(tmp_path)


def _wait_state(run: Path, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        launcher("status", str(run))  # refreshes job.json from Slurm
        state = job_record(run).get("state")
        if state in states:
            return state
        time.sleep(1)
    pytest.fail(f"{run.name} never reached {states}; last {job_record(run)}")


def test_submit_trains_two_ranks_to_completion(slurm, tmp_path: Path) -> None:
    run = _submit(tmp_path, "parallelism.tp=2", "training.train_steps=10")
    waited = launcher("wait", str(run), "--timeout", "240", "--max-interval", "4", timeout=280)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    rec = job_record(run)
    assert rec["state"] == "COMPLETED" and rec["exit_code"] == 0
    out = next((run / "logs").glob(f"*_{rec['job_id']}.out")).read_text()
    got = losses(out)
    assert len(got) == 10 and got[-1] < got[0] - 0.5, out[-3000:]
    assert "layout: world=2 tp=2 pp=1" in out and "training finished" in out
    assert (run / "control" / "finished").exists()


def test_cancel_now(slurm, tmp_path: Path) -> None:
    run = _submit(tmp_path, "parallelism.dp=2", "training.train_steps=100000")
    _wait_state(run, {"RUNNING"})
    cancel = launcher("cancel", "--now", str(run))
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout
    assert _wait_state(run, {"CANCELLED"}) == "CANCELLED"


def test_cancel_stops_every_rank_after_the_same_step_with_a_checkpoint(slurm, tmp_path: Path) -> None:
    """`launcher cancel` of a running job: SIGTERM (no kill) to the batch shell only; the ranks
    agree on a step, save it and exit; the job ends CANCELLED and is not requeued."""
    run = _submit(tmp_path, "parallelism.dp=2", "training.train_steps=100000", "checkpoint.enabled=true",
                  "checkpoint.save_interval=100000")
    _wait_state(run, {"RUNNING"})
    job_id = str(job_record(run)["job_id"])
    out_file = lambda: next(iter((run / "logs").glob(f"*_{job_id}.out")), None)  # noqa: E731
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out_file() and "step=3/" in out_file().read_text()):
        time.sleep(0.5)
    cancel = launcher("cancel", str(run))
    assert cancel.returncode == 0 and "to stop: every rank stops after the same step" in cancel.stdout, cancel.stdout
    assert _wait_state(run, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=180) == "CANCELLED"
    text = out_file().read_text()
    stopped = re.findall(r"stopping after step (\d+)/100000", text)
    assert len(stopped) == 1, text[-3000:]
    step = int(stopped[0])
    manifest = run / "checkpoints" / f"step_{step:08d}" / "manifest.json"
    assert manifest.exists(), text[-3000:]  # saved by both ranks: the save is collective
    assert "requeueing" not in text and "(restart 1)" not in "".join(p.read_text() for p in (run / "logs").glob("*.out"))


def test_startup_failure_reported_with_log_tail(slurm, tmp_path: Path) -> None:
    run = _submit(tmp_path, "cluster.python=/nonexistent/bin/python3")
    waited = launcher("wait", str(run), "--timeout", "120", "--max-interval", "2", timeout=150)
    assert waited.returncode == 1
    assert "FAILED" in waited.stdout and "last lines of" in waited.stdout
    assert "/nonexistent/bin/python3" in waited.stdout  # the cause, from the job's own log


def test_slurm_rejection_shows_sbatch_error_and_hint(slurm, tmp_path: Path) -> None:
    proc = launcher(*SLURM_CPU, "cluster.partition=nope", f"runs_root={tmp_path}")
    assert proc.returncode == 3
    assert "invalid partition specified: nope" in proc.stderr and "Hint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "a rejected submission left its run directory behind"


def test_gres_rejection_hint(slurm, tmp_path: Path) -> None:
    proc = launcher(*SLURM_CPU, "cluster.gpus_per_node_flag=true", f"runs_root={tmp_path}")
    assert proc.returncode == 3
    assert "Invalid generic resource (gres) specification" in proc.stderr and "gpus_per_node_flag" in proc.stderr


def test_usr2_stops_ranks_together_and_requeues(slurm, tmp_path: Path) -> None:
    """--signal's USR2 reaches the batch shell, the ranks stop after the same step, the job requeues."""
    run = _submit(tmp_path, "parallelism.dp=2", "training.train_steps=100000")
    _wait_state(run, {"RUNNING"})
    job_id = str(job_record(run)["job_id"])
    out_file = lambda: next(iter((run / "logs").glob(f"*_{job_id}.out")), None)  # noqa: E731
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out_file() and "step=3/" in out_file().read_text()):
        time.sleep(0.5)
    slurm.run("scancel", "--batch", "--signal=USR2", job_id)
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        text = out_file().read_text()
        if "requeueing" in text:
            break
        time.sleep(0.5)
    assert "batch: USR2 received, requesting checkpoint" in text, text[-3000:]
    assert "stop requested (control file): stopping after step" in text
    assert "training step exited with status 0" in text and "requeueing" in text
    assert not (run / "control" / "finished").exists()
    launcher("cancel", str(run))


def test_depends_on_chains_stages_with_afterok(slurm, tmp_path: Path) -> None:
    first = _submit(tmp_path, "parallelism.dp=2", "training.train_steps=8", "run_name=stage1")
    proc = launcher(*SLURM_CPU, "parallelism.dp=2", "training.train_steps=4", "run_name=stage2",
                    f"depends_on={first.name}", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    second = next(p for p in tmp_path.iterdir() if p.name.startswith("stage2"))
    first_id = job_record(first)["job_id"]
    assert f"#SBATCH --dependency=afterok:{first_id}" in (second / "job.sbatch").read_text()
    assert launcher("wait", str(second), "--timeout", "240", "--max-interval", "3", timeout=280).returncode == 0
    assert launcher("status", str(first)).returncode == 0  # refreshes job.json from Slurm
    assert job_record(first)["state"] == "COMPLETED" and job_record(first)["exit_code"] == 0
    finished_first = (first / "control" / "finished").stat().st_mtime
    out2 = next((second / "logs").glob("*.out")).read_text()
    assert "training finished" in out2
    stamp = re.search(r"\(restart \d+\) at (\S+Z)", out2).group(1)  # the batch script's first line
    started_second = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    assert started_second >= int(finished_first), "stage 2 started before stage 1 finished"

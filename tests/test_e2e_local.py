"""`python -m launcher config=tiny_local` end to end: real torchrun, real megatron-core on CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import ROOT, job_record, launcher, losses, only_run
from tests.faults import fault_env

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]


def _assert_trained(proc: subprocess.CompletedProcess, runs_root: Path, steps: int) -> list[float]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = only_run(runs_root)
    log = (run / "logs" / "local.out").read_text()
    got = losses(log)
    assert len(got) == steps, log[-2000:]
    # the padded vocabulary is masked, so training starts near ln(257) = 5.55 (not ln(384))
    assert got[0] == pytest.approx(5.55, abs=0.15), got
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.3, f"loss did not decrease: {got}"
    assert job_record(run)["state"] == "COMPLETED" and job_record(run)["exit_code"] == 0
    return got


def test_tiny_local_default(tmp_path: Path) -> None:
    proc = launcher("config=tiny_local", f"runs_root={tmp_path}")
    _assert_trained(proc, tmp_path, steps=30)
    run = only_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["packages"]["megatron-core"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert manifest["git"]["commit"] == head and len(head) == 40  # the code that ran, exactly
    assert manifest["overrides"] == ["config=tiny_local", f"runs_root={tmp_path}"] and manifest["packages"]["torch"].startswith("2.")
    assert (run / "launch.sh").read_text().count("torch.distributed.run") == 1
    assert "step=30/30" in proc.stdout  # streamed to the terminal too
    tail = launcher("logs", str(run), "-n", "3")
    assert tail.returncode == 0 and len(tail.stdout.strip().splitlines()) == 3
    assert "training finished" in tail.stdout and "step=1/30" not in tail.stdout
    follow = launcher("logs", str(run), "--follow", timeout=60)  # a finished run: prints and returns
    assert follow.returncode == 0 and "step=30/30" in follow.stdout


@pytest.mark.parametrize("layout", [["parallelism.tp=2"], ["parallelism.pp=2"], ["parallelism.dp=2"]],
                         ids=["tp2", "pp2", "dp2"])
def test_tiny_local_two_processes(tmp_path: Path, layout: list[str]) -> None:
    proc = launcher("config=tiny_local", "cluster.gpus_per_node=2", "training.train_steps=12", *layout,
                    f"runs_root={tmp_path}")
    _assert_trained(proc, tmp_path, steps=12)


def test_missing_data_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    proc = launcher("config=tiny_local", "training.data.source=indexed", "training.data.blend=[{path:/nonexistent/x}]",
                    f"runs_root={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert "training.data.blend[0].path = '/nonexistent/x'" in proc.stderr and "trainer.tokenize" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_failing_local_run_reports_failure(tmp_path: Path) -> None:
    env = fault_env("fail:rank=0,step=2")
    proc = launcher("config=tiny_local", f"runs_root={tmp_path}", env=env)
    assert proc.returncode == 1
    run = only_run(tmp_path)
    assert job_record(run)["state"] == "FAILED"
    status = launcher("status", str(run))
    assert "FAILED" in status.stdout and "last lines of" in status.stdout


def test_cancel_local_run(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "config=tiny_local", "training.train_steps=100000",
                             "checkpoint.enabled=true", "checkpoint.save_interval=100000", f"runs_root={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [p for p in tmp_path.iterdir() if (p / "job.json").exists()] if tmp_path.exists() else []
            if runs and "step=" in (runs[0] / "logs" / "local.out").read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("the local run never started training")
        run = runs[0]
        pid = job_record(run)["pid"]
        cancel = launcher("cancel", "--runs-root", str(tmp_path), run.name)
        assert cancel.returncode == 0 and "stopped local run" in cancel.stdout
        proc.wait(timeout=60)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert job_record(run)["state"] == "CANCELLED"
        # the ranks got SIGTERM: they stopped after the same step and saved it before exiting
        log = (run / "logs" / "local.out").read_text()
        stopped = re.search(r"stopping after step (\d+)/100000", log)
        assert stopped and "checkpoint: SIGTERM received: saving after this step" in log, log[-3000:]
        assert (run / "checkpoints" / f"step_{int(stopped.group(1)):08d}" / "manifest.json").exists(), log[-3000:]
        listing = launcher("list", "--runs-root", str(tmp_path))
        assert run.name[:20] in listing.stdout and "CANCELLED" in listing.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

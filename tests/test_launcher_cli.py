"""CLI behaviour that needs no training: dry runs, sweeps, run listing."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e import launcher


def test_dry_run_70b_p5_writes_everything_and_submits_nothing(tmp_path: Path) -> None:
    proc = launcher("config=llama3_70b_p5", "cluster.nodes=32", "dry_run=true", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run = next(tmp_path.iterdir())
    for name in ("config.yaml", "job.sbatch", "step.sh", "manifest.json"):
        assert str(run / name) in proc.stdout and (run / name).exists()
    assert json.loads((run / "job.json").read_text())["state"] == "NOT_SUBMITTED"
    assert "#SBATCH --nodes=32" in (run / "job.sbatch").read_text()
    assert "nodes: 32" in (run / "config.yaml").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "cluster.nodes=32" in manifest["overrides"] and manifest["packages"]["hydra-core"]
    status = launcher("status", "--runs-root", str(tmp_path), "--json")
    assert json.loads(status.stdout)["state"] == "NOT_SUBMITTED"


def test_multirun_sweep_creates_one_run_per_point(tmp_path: Path) -> None:
    proc = launcher("-m", "config=tiny_local", "cluster.gpus_per_node=2", "parallelism.tp=1,2", "dry_run=true",
                    f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in tmp_path.iterdir() if (p / "config.yaml").exists())
    assert len(runs) == 2
    tps = sorted("tp: 2" in (r / "config.yaml").read_text() for r in runs)
    assert tps == [False, True]
    listing = launcher("list", "--runs-root", str(tmp_path))
    assert listing.returncode == 0 and listing.stdout.count("NOT_SUBMITTED") == 2


def test_management_commands_explain_missing_runs(tmp_path: Path) -> None:
    proc = launcher("status", "--runs-root", str(tmp_path))
    assert proc.returncode == 2 and "no runs under" in proc.stderr and "Traceback" not in proc.stderr
    proc = launcher("logs", "nope", "--runs-root", str(tmp_path))
    assert proc.returncode == 2 and "no run named 'nope'" in proc.stderr


def test_unusable_runs_root_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for bad in ("/proc/no-such-dir", str(a_file)):  # as root too: the directory is really tried
        proc = launcher("config=tiny_local", "dry_run=true", f"runs_root={bad}")
        assert proc.returncode == 2, proc.stderr
        assert f"runs_root = '{bad}': cannot hold run directories" in proc.stderr
        assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr


def test_corrupt_job_record_is_reported_not_a_traceback(tmp_path: Path) -> None:
    proc = launcher("config=tiny_local", "dry_run=true", f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    run = next(tmp_path.iterdir())
    (run / "job.json").write_text('{"state": "RUNN')  # torn by a crash or a full disk
    for command in (["status", str(run)], ["logs", str(run)], ["list", "--runs-root", str(tmp_path)],
                    ["cancel", str(run)]):
        out = launcher(*command, "--runs-root", str(tmp_path)) if command[0] != "list" else launcher(*command)
        assert out.returncode == 0, (command, out.stderr)
        assert "Traceback" not in out.stderr, command
    status = launcher("status", str(run), "--runs-root", str(tmp_path))
    assert "UNKNOWN" in status.stdout and "job.json is unreadable" in status.stdout

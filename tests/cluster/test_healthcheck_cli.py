"""``python -m cluster.healthcheck``: usage errors exit 2 with a message, settings from a run's config,
the srun command it runs (the checks themselves: test_health_worker.py, tests/multinode/test_preflight.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.health_records import HealthSettings
from cluster.healthcheck import operator, settings_from_config, srun_command
from tests.compose import compose_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,message", [
    (["--nodes", "node[1-"], "unbalanced brackets"),
    (["--nodes", "n1", "--gpu-type", "tpu"], "--gpu-type 'tpu': one of a100-40gb"),
    (["--nodes", "n1", "--time-budget", "3"], "--time-budget 3: at least 10 s"),
    (["--nodes", "n1", "--min-fraction", "2"], "--min-fraction 2: in (0, 1]"),
    (["--nodes", "n1", "--config", "/nonexistent/run"], "--config /nonexistent/run:"),
])
def test_usage_errors_exit_2_with_the_reason(args: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert operator([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_missing_nodes_and_help(capsys) -> None:
    assert operator([]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert operator(["--help"]) == 0
    assert "exit status: 0 every node healthy, 1 some node failed, 2 usage error" in capsys.readouterr().out


def test_without_slurm_it_says_where_to_run(tmp_path: Path, capsys) -> None:
    assert operator(["--nodes", "n1", "--out", str(tmp_path), "--srun", str(tmp_path / "srun")]) == 2
    assert "run this on a Slurm login or compute node" in capsys.readouterr().err


def test_the_module_entry_point_exits_2_on_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "cluster.healthcheck", "--nodes", "x[", "--out", "/tmp/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "healthcheck:" in proc.stderr


def test_settings_from_a_p5_run_config() -> None:
    root = compose_root("config=llama3_70b_p5", "cluster.nodes=4", "cluster.preflight.time_budget_s=240",
                        "cluster.preflight.hyperpod_replace=true", "monitoring.pushgateway_url=http://head:9091")
    s = settings_from_config(root, "/fsx/runs/llama-20260101-000000")
    assert (s.gpu_type, s.gpus_per_node, s.ranks_per_node, s.efa_devices, s.instance_type) == (
        "h100-80gb", 8, 8, 32, "ml.p5.48xlarge")
    assert (s.time_budget_s, s.port, s.run_name, s.quarantine_action, s.pushgateway_url) == (
        240.0, 29501, "llama-20260101-000000", "replace", "http://head:9091")
    assert HealthSettings.from_json(s.to_json()) == s


def test_srun_command_runs_one_rank_per_gpu_in_the_container(tmp_path: Path) -> None:
    args = argparse.Namespace(srun="srun", nodes="ip-10-1-[2-5]", partition="train", account=None,
                              container_image="/fsx/img.sqsh", container_mounts="/fsx:/fsx", python="python3")
    settings = HealthSettings(gpu_type="h100-80gb", gpus_per_node=8)
    cmd = srun_command(args, settings, ["a", "b", "c", "d"], tmp_path / "s.json", tmp_path / "out")
    assert cmd[:6] == ["srun", "--nodes=4", "--nodelist=ip-10-1-[2-5]", "--ntasks-per-node=8", "--kill-on-bad-exit=0",
                       "--export=ALL"]
    assert "--container-image=/fsx/img.sqsh" in cmd and "--container-mounts=/fsx:/fsx" in cmd
    assert cmd[-8:] == ["python3", "-m", "cluster.healthcheck", "worker", "--settings", str(tmp_path / "s.json"),
                        "--out", str(tmp_path / "out")]

"""The healthcheck worker for real (gloo bandwidth tests, rank files, rank 0's verdict), as two "nodes" on
this machine with the environment srun would give them; and the EFA device count with a recorded
``fi_info`` on PATH. Multi-node runs through Slurm: tests/multinode/test_preflight.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.health_records import FAIL, HealthSettings
from cluster.health_worker import check_efa

ROOT = Path(__file__).resolve().parents[2]
NODES = ("localhost", "127.0.0.1")  # two names of this machine: two "nodes" (no scontrol on PATH: names are addresses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(tmp_path: Path, settings: HealthSettings, node_index: int) -> subprocess.Popen[str]:
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(settings.to_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent), "SLURM_JOB_ID": "5",
           "SLURM_STEP_NODELIST": ",".join(NODES), "SLURMD_NODENAME": NODES[node_index], "SLURM_LOCALID": "0",
           "SLURM_NODEID": str(node_index), "SLURM_STEP_NUM_TASKS": "2"}
    return subprocess.Popen([sys.executable, "-m", "cluster.healthcheck", "worker", "--settings", str(settings_file),
                             "--out", str(tmp_path / "out")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(120)
def test_two_healthy_nodes_pass_with_measured_links(tmp_path: Path) -> None:
    settings = HealthSettings(time_budget_s=60, port=free_port(), run_name="r")
    started = time.monotonic()
    procs = [start_worker(tmp_path, settings, i) for i in range(2)]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    took = time.monotonic() - started
    assert [p.returncode for p in procs] == [0, 0], outputs
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] in ("pass", "warn") and report["quarantine"] == [], report["message"]
    assert {(x["src"]["node"], x["dst"]["node"]) for x in report["links"]} == {NODES, NODES[::-1]}
    assert all(x["bytes_per_s"] > 0 and x["transfers"] >= 2 for x in report["links"])
    assert report["all_nodes"]["ranks"] == 2 and took < 60
    assert "verdict: all 2 nodes healthy" in outputs[0] and "┃ node" in outputs[0]  # rank 0 prints the table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "node-127.0.0.1.json", "node-localhost.json", "rank-0.jsonl", "rank-1.jsonl", "report.json"]


@pytest.mark.timeout(120)
def test_a_node_that_never_reports_fails_within_the_budget(tmp_path: Path) -> None:
    """Rank 1 never starts: rank 0 waits in the rendezvous, then decides at the end of its budget."""
    settings = HealthSettings(time_budget_s=15, port=free_port(), run_name="r")
    started = time.monotonic()
    proc = start_worker(tmp_path, settings, 0)
    out = proc.communicate(timeout=60)[0]
    took = time.monotonic() - started
    assert proc.returncode == 1, out
    assert took < settings.time_budget_s + 10, took
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "quarantine", (report["message"], report["nodes"], report["errors"])
    assert [n for n, _ in report["quarantine"]] == ["127.0.0.1"]
    assert report["quarantine"][0][1] == "hyperlaunch preflight: node.result: no result within 15 s"


def _fi_info(bin_dir: Path, devices: int) -> None:
    """What ``fi_info -p efa -t FI_EP_RDM`` prints on a p5: one block per device (its ``domain``)."""
    blocks = "".join(f"echo 'provider: efa'; echo '    fabric: efa'; echo '    domain: rdmap{79 + i}s0-rdm'; "
                     "echo '    version: 120.10'; echo '    type: FI_EP_RDM'; echo '    protocol: FI_PROTO_EFA'\n"
                     for i in range(devices))
    path = bin_dir / "fi_info"
    path.write_text("#!/bin/bash\n" + blocks)
    path.chmod(0o755)


@pytest.mark.parametrize("devices,status,check", [(32, "32/32", None), (16, "16/32", "efa.devices"),
                                                   (0, "0/32", "efa.software")])
def test_efa_device_count(tmp_path: Path, monkeypatch, devices: int, status: str, check: str | None) -> None:
    _fi_info(tmp_path, devices)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    got, findings = check_efa(32)
    assert got == status and [f.check for f in findings] == ([check] if check else [])
    assert all(f.severity == FAIL for f in findings)


def test_efa_software_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if any((Path(d) / "fi_info").exists() for d in ("/usr/bin", "/bin", "/opt/amazon/efa/bin")):
        pytest.skip("this machine has fi_info")
    status, findings = check_efa(4)
    assert status == "no fi_info" and findings[0].check == "efa.software" and findings[0].figure == "fi_info missing"
    assert check_efa(0) == ("n/a", [])

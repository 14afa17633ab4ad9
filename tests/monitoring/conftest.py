"""A real Prometheus + Pushgateway for the module, and a helper that launches monitored CPU runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from configs.monitoring_config import MonitoringConfig
from monitoring.discovery import scrape_config
from monitoring.launch import rule_files
from tests.monitoring.services import Prometheus, Pushgateway, free_port, free_port_block

ROOT = Path(__file__).resolve().parents[2]
FAKE_NVML_DIR = Path(__file__).resolve().parent / "fake_nvml"


def need(binary: str) -> str:
    """The tool's path. A missing tool FAILS the tests (never a skip: a skipped suite proves nothing)."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed; the monitoring tests run the real one. Install Debian's "
                    "prometheus and prometheus-pushgateway packages (scripts/test.sh does: apt-get install "
                    "prometheus prometheus-pushgateway; promtool comes with prometheus)", pytrace=False)
    return path


def fake_nvml_env(spec: Path) -> dict[str, str]:
    """Environment under which ``import pynvml`` finds tests/monitoring/fake_nvml, serving ``spec``."""
    paths = [str(FAKE_NVML_DIR), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths), "FAKE_NVML_SPEC": str(spec)}


@dataclass
class Stack:
    root: Path
    runs: Path
    targets: Path
    prometheus: Prometheus
    pushgateway: Pushgateway


@dataclass
class Launched:
    proc: subprocess.CompletedProcess
    run_dir: Path
    start: float
    end: float

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def wandb_records(self) -> list[dict]:
        return wandb_records(self.run_dir / "wandb" / "latest-run")


def wandb_records(path: Path) -> list[dict]:
    """Every record of an offline W&B run (history, alert, metric, exit...), one dict each."""
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need("prometheus")
    need("prometheus-pushgateway")
    root = tmp_path_factory.mktemp("monitoring-stack")
    runs = root / "runs"
    targets = runs / "prometheus-targets"
    targets.mkdir(parents=True)  # before Prometheus starts, so its file watch is in place
    pushgateway = Pushgateway(root)
    cfg = MonitoringConfig(scrape_interval_s=1, pushgateway_url=pushgateway.url, targets_dir=str(targets))
    prometheus = Prometheus(scrape_config(cfg, str(runs / "any"), None, rule_files(None), refresh_s=1), root)
    try:
        yield Stack(root, runs, targets, prometheus, pushgateway)
    finally:
        prometheus.stop()
        pushgateway.stop()


def launch(stack: Stack, overrides: list[str], env: dict[str, str], timeout_s: float = 150) -> Launched:
    """``python -m launcher config=tiny_local`` with 2 CPU ranks and Prometheus monitoring."""
    base = free_port_block(4)
    cmd = [sys.executable, "-m", "launcher", "config=tiny_local", "cluster.gpus_per_node=2",
           f"runs_root={stack.runs}", "monitoring.prometheus=true", f"monitoring.targets_dir={stack.targets}",
           f"monitoring.port_base={base}", "monitoring.scrape_interval_s=1",
           # node_exporter=auto probes for HyperPod's exporters: nothing answers on these
           f"monitoring.dcgm_exporter_port={free_port()}", f"monitoring.efa_exporter_port={free_port()}", *overrides]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYPERLAUNCH_", "FAKE_NVML"))}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **env})
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=full_env)
    end = time.time()
    match = re.search(r"run directory: (\S+)", proc.stdout)
    assert match, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Launched(proc, Path(match.group(1)), start, end)

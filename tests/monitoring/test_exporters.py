"""The exporters themselves: dcgm-exporter's units and labels from the real NVML reader (over the fake
pynvml), no ``_created`` series, histograms, Pushgateway groups deleted at a clean end, and the node
exporter filling in what an existing dcgm-exporter lacks (or saying which rules are blind)."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from configs.monitoring_config import MonitoringConfig
from monitoring.events import Outcome, RankIdentity, RunInfo, StepSample
from monitoring.gpu import DcgmCollector, open_gpu_source
from monitoring.prometheus_sink import PrometheusSink
from tests.monitoring.conftest import FAKE_NVML_DIR, ROOT, Stack, fake_nvml_env
from tests.monitoring.fakes import write_nvml_spec
from tests.monitoring.services import free_port, free_port_block, wait_for
from tests.monitoring.test_rules import HYPERPOD_BASIC


@pytest.fixture
def nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake pynvml as ``pynvml`` in this process; yields its spec file."""
    spec_file = write_nvml_spec(tmp_path / "nvml.json", driver="550.127.05", xid={"1": 79})
    monkeypatch.setenv("FAKE_NVML_SPEC", str(spec_file))
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    yield spec_file


def _exposition(*collectors: object) -> str:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_nvml_reader_gives_dcgm_exporter_units(nvml: Path) -> None:
    source, why = open_gpu_source()
    assert source is not None, why
    dev = source.devices()[0]
    first = source.read(dev)
    time.sleep(0.2)
    v = source.read(dev)
    assert v["DCGM_FI_DEV_FB_USED"] == 63112 and v["DCGM_FI_DEV_FB_RESERVED"] == 512  # whole MiB, as DCGM
    assert v["DCGM_FI_DEV_FB_FREE"] == 81559 - 63112 - 512 - 1  # the used bytes were not whole MiB
    assert 400 < v["DCGM_FI_DEV_POWER_USAGE"] < 700  # W from mW
    assert "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL" not in first  # a rate: needs two samples
    assert v["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] == pytest.approx(2 * 150e6 / 1024, rel=0.05)  # MiB/s
    assert v["DCGM_FI_DEV_POWER_VIOLATION"] == pytest.approx(v["DCGM_FI_DEV_THERMAL_VIOLATION"] + 1, abs=1e6)
    assert 0 < v["DCGM_FI_DEV_POWER_VIOLATION"] < 1e6 * 60  # microseconds throttled (2% of the time)
    assert 0 < v["DCGM_FI_PROF_SM_ACTIVE"] <= 1  # ratio from GPM percent


def test_collector_labels_xid_and_driver_as_dcgm_exporter(nvml: Path) -> None:
    source, _ = open_gpu_source()
    assert source is not None
    collector = DcgmCollector(source, "node-a")
    try:
        wait_for(lambda: collector.last_xid.get(1) == 79, 10, "the XID event")
        text = _exposition(collector)
    finally:
        collector.close()
    xid = re.search(r'^DCGM_FI_DEV_XID_ERRORS\{([^}]*gpu="1"[^}]*)\} 79\.0$', text, re.M)
    assert xid and 'err_code="79"' in xid.group(1) and 'err_msg="GPU has fallen off the bus"' in xid.group(1), text
    assert 'DCGM_FI_DRIVER_VERSION="550.127.05"' in xid.group(1) and 'Hostname="node-a"' in xid.group(1)
    zero = re.search(r'^DCGM_FI_DEV_XID_ERRORS\{([^}]*gpu="0"[^}]*)\} 0\.0$', text, re.M)
    assert zero and 'err_code="0"' in zero.group(1)
    only = DcgmCollector(source, "node-a", only=frozenset({"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"}))
    only.close()
    names = set(re.findall(r"^(DCGM_FI_\w+)\{", _exposition(only), re.M))
    assert names == {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"}


def test_malformed_fake_spec_is_a_clear_error(nvml: Path) -> None:
    nvml.write_text(json.dumps({"gpus": "two"}))
    source, why = open_gpu_source()
    assert source is None
    assert why == f"FakeNvmlSpecError: fake NVML spec {nvml}: 'gpus' must be an integer >= 0, got 'two'"


def _sample(step: int) -> StepSample:
    return StepSample(step=step, total_steps=10, loss=2.0, grad_norm=1.0, lr=1e-4, step_time_s=0.3,
                      tokens_per_s=1e4, tokens=4096, tflops_per_gpu=1.0, mfu_percent=None, compute_s=0.2,
                      data_wait_s=0.002)


def _sink(rank: int, pushgateway: str | None = None) -> PrometheusSink:
    cfg = MonitoringConfig(prometheus=True, port_base=free_port_block(4), bind_address="127.0.0.1",
                           pushgateway_url=pushgateway, push_interval_s=60)
    return PrometheusSink(cfg, RankIdentity(rank=rank, local_rank=rank, host="h", gpu=str(rank)), "127.0.0.1",
                          lambda component, message: None)


def test_rank_exporter_serves_histograms_and_no_created_series() -> None:
    sink = _sink(0)
    for step in range(1, 4):
        sink.step(_sample(step))
    text = generate_latest(sink.registry).decode()
    assert "_created" not in text
    for name in ("train_step_duration_seconds", "train_compute_duration_seconds", "train_data_wait_duration_seconds"):
        assert f"# TYPE hyperlaunch_{name} histogram" in text
        assert f'hyperlaunch_{name}_count 3.0' in text
    assert 'hyperlaunch_train_step_duration_seconds_bucket{le="0.5"} 3.0' in text
    assert 'hyperlaunch_train_step_duration_seconds_bucket{le="0.25"} 0.0' in text
    assert 'hyperlaunch_train_data_wait_duration_seconds_bucket{le="0.005"} 3.0' in text


def test_pushgateway_groups_are_deleted_at_a_clean_end_and_by_a_requeue(stack: Stack) -> None:
    def groups(run: str) -> list[dict]:
        return [g["labels"] for g in stack.pushgateway.groups() if g["labels"].get("run") == run]

    clean = RunInfo(run="push-clean", run_name="p", world_size=2, total_steps=10)
    sink = _sink(0, stack.pushgateway.url)
    sink.start(clean)
    assert [g["rank"] for g in groups("push-clean")] == ["0"]
    sink.finish(Outcome("finished", 10))
    assert groups("push-clean") == []

    failed = RunInfo(run="push-failed", run_name="p", world_size=2, total_steps=10)
    rank0, rank1 = _sink(0, stack.pushgateway.url), _sink(1, stack.pushgateway.url)
    rank0.start(failed)
    rank1.start(failed)
    rank1.finish(Outcome("failed", 5, failed_rank=1))
    rank0.finish(Outcome("failed", 5))
    assert sorted(g["rank"] for g in groups("push-failed")) == ["0", "1"]  # kept: HyperlaunchJobFailed
    requeued = _sink(0, stack.pushgateway.url)
    requeued.start(failed)  # the requeued attempt clears the failed state before it pushes "running"
    assert [g["rank"] for g in groups("push-failed")] == ["0"]
    requeued.finish(Outcome("finished", 10))
    assert groups("push-failed") == []


class _FakeDcgmExporter(ThreadingHTTPServer):
    """HyperPod's dcgm-exporter with its basic field list, on loopback."""

    def __init__(self) -> None:
        labels = 'gpu="0",UUID="GPU-x",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="hp-node"'
        body = "".join(f"# HELP {f} x\n# TYPE {f} gauge\n{f}{{{labels}}} 1\n" for f in sorted(HYPERPOD_BASIC)).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _node_exporter(run_dir: Path, targets: Path, env: dict[str, str]) -> tuple[str, str]:
    """Run the node exporter until it serves; (its /metrics, its output)."""
    proc = subprocess.Popen([sys.executable, "-m", "monitoring.node_exporter", "--run-dir", str(run_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        target = targets / f"{run_dir.name}.node-{socket.gethostname()}.json"
        wait_for(lambda: target.exists() or proc.poll() is not None, 60, "the node exporter's target file")
        address = json.loads(target.read_text())[0]["targets"][0]
        metrics = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    return metrics, output


def test_node_exporter_serves_what_dcgm_exporter_lacks_or_says_which_rules_are_blind(tmp_path: Path) -> None:
    dcgm = _FakeDcgmExporter()
    targets = tmp_path / "targets"
    try:
        out = subprocess.run([sys.executable, "-m", "launcher", "config=tiny_local", "dry_run=true",
                              f"runs_root={tmp_path / 'runs'}", "monitoring.prometheus=true",
                              f"monitoring.targets_dir={targets}", f"monitoring.port_base={free_port_block(4)}",
                              f"monitoring.dcgm_exporter_port={dcgm.server_address[1]}",
                              f"monitoring.efa_exporter_port={free_port()}", "cluster.gpu_type=h100-80gb"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        run_dir = next(p for p in (tmp_path / "runs").iterdir() if (p / "config.yaml").exists())
        coverage = run_dir / "monitoring" / f"gpu-coverage-{socket.gethostname()}.json"
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPERLAUNCH_", "FAKE_NVML"))}
        metrics, output = _node_exporter(run_dir, targets, {**env, **fake_nvml_env(write_nvml_spec(tmp_path / "a.json"))})
        served = set(re.findall(r"^(DCGM_FI_\w+)\{", metrics, re.M))
        assert served and not served & HYPERPOD_BASIC, served  # nothing twice
        assert {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
                "DCGM_FI_PROF_SM_ACTIVE"} <= served
        record = json.loads(coverage.read_text())
        assert record["gpu_source"] == "dcgm-exporter+nvml" and record["blind_rules"] == [], record
        assert set(record["served_from_nvml"]) == served
        assert 'hyperlaunch_monitoring_degraded{component="dcgm_fields"} 0.0' in metrics

        no_nvml = write_nvml_spec(tmp_path / "b.json", error="LibraryNotFound")
        metrics, output = _node_exporter(run_dir, targets, {**env, **fake_nvml_env(no_nvml)})
        record = json.loads(coverage.read_text())
        assert record["blind_rules"] == ["GpuEccDoubleBit", "GpuEccSingleBitStorm", "GpuNvlinkErrors"], record
        assert "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL" in record["missing"] and record["served_from_nvml"] == []
        assert output.count("these alerts cannot fire on this node: GpuEccDoubleBit, GpuEccSingleBitStorm, "
                            "GpuNvlinkErrors") == 1, output
        assert 'hyperlaunch_monitoring_degraded{component="dcgm_fields"} 1.0' in metrics
        assert not re.search(r"^DCGM_FI_", metrics, re.M)
    finally:
        dcgm.shutdown()

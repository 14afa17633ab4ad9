"""Fake hardware for a GPU- and EFA-less machine: a sysfs tree written by the test, a spec for the fake
pynvml (tests/monitoring/fake_nvml/pynvml.py; conftest.fake_nvml_env puts it on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from monitoring.efa import COUNTERS

DEVICES = ("rdmap16s27", "rdmap32s27")


def write_efa_tree(root: Path, devices: tuple[str, ...] = DEVICES, value: int = 0) -> Path:
    for dev in devices:
        hw = root / dev / "ports" / "1" / "hw_counters"
        hw.mkdir(parents=True, exist_ok=True)
        for counter in (*COUNTERS, "lifespan"):
            (hw / counter).write_text(f"{12 if counter == 'lifespan' else value}\n")
    return root


def bump(root: Path, device: str, counter: str, by: int) -> None:
    path = root / device / "ports" / "1" / "hw_counters" / counter
    path.write_text(f"{int(path.read_text()) + by}\n")


class HardwareTimeline(threading.Thread):
    """EFA counters move like a training job's (steady traffic, then a retransmit burst, impaired and
    unresponsive remotes) and a double-bit ECC error appears, all once the node exporter serves.

    Given a Prometheus, the timeline starts only once Prometheus has scraped the node exporter: a counter
    that is already 2 at its first sample has no increase, so an error injected before the first scrape
    (file_sd refresh plus scrape interval, seconds on a loaded machine) would be invisible to the rules."""

    def __init__(self, root: Path, targets: Path, nvml_spec: Path, period_s: float = 0.25,
                 prometheus: Optional[Any] = None, scrape_timeout_s: float = 60.0):
        super().__init__(daemon=True)
        self.root, self.targets, self.nvml_spec, self.period_s = root, targets, nvml_spec, period_s
        self.prometheus, self.scrape_timeout_s = prometheus, scrape_timeout_s
        self.stop = threading.Event()
        self.ticks = 0
        # other runs of the session may have left node target files: wait for THIS run's exporter
        self._earlier = {p.name for p in targets.glob("*.node-*.json")}

    def _new_node_files(self) -> set[str]:
        return {p.name for p in self.targets.glob("*.node-*.json")} - self._earlier

    def _scraped(self, files: set[str]) -> bool:
        """Prometheus holds at least one successful scrape of one of this run's node exporters."""
        for target in self.prometheus.targets():
            path = target.get("discoveredLabels", {}).get("__meta_filepath", "")
            if Path(path).name in files and target.get("health") == "up":
                return True
        return False

    def run(self) -> None:
        while not self.stop.wait(0.2) and not self._new_node_files():
            pass
        if self.prometheus is not None:
            deadline = time.monotonic() + self.scrape_timeout_s
            while (not self.stop.wait(0.2) and time.monotonic() < deadline
                   and not self._scraped(self._new_node_files())):
                pass
        while not self.stop.wait(self.period_s):
            self.ticks += 1
            for dev in DEVICES:
                for counter, by in (("tx_bytes", 200_000_000), ("rx_bytes", 190_000_000), ("tx_pkts", 25_000),
                                    ("rx_pkts", 24_000), ("send_bytes", 150_000_000), ("recv_bytes", 150_000_000),
                                    ("rdma_read_bytes", 40_000_000), ("rdma_write_bytes", 50_000_000)):
                    bump(self.root, dev, counter, by)
            if 8 <= self.ticks <= 40:  # a retransmit burst on one device, with a timeout and impaired remotes
                bump(self.root, DEVICES[1], "retrans_pkts", 400)
                bump(self.root, DEVICES[1], "retrans_bytes", 400 * 8192)
            if self.ticks in (12, 20):
                bump(self.root, DEVICES[1], "impaired_remote_conn_events", 1)
                bump(self.root, DEVICES[1], "unresponsive_remote_events", 1)
                bump(self.root, DEVICES[1], "retrans_timeout_events", 1)
            if self.ticks == 16:
                spec = json.loads(self.nvml_spec.read_text())
                _atomic_write(self.nvml_spec, json.dumps({**spec, "ecc_dbe": {"0": 2}}))


def _atomic_write(path: Path, text: str) -> None:
    """The fake pynvml re-reads its spec while the exporter runs: never let it see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_nvml_spec(path: Path, **spec: object) -> Path:
    _atomic_write(path, json.dumps({"gpus": 2, "model": "NVIDIA H100 80GB HBM3", **spec}))
    return path

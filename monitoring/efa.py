"""EFA counters from sysfs under the AWS EFA node exporter's names (``node_amazonefa_*``).

``<root>/<device>/ports/<port>/hw_counters/<counter>`` (root: /sys/class/infiniband; a p5 has 32
devices named rdmapNNs0). Each file holds one monotonically increasing integer; the AWS exporter
(a node_exporter fork, port 9109) exposes it as ``node_amazonefa_<counter>{device, port}`` with no
``_total`` suffix, plus ``node_amazonefa_info{device} 1``. ``lifespan`` (the counters' refresh
period) is not a counter and is skipped. The reader takes the root as a parameter: tests point
it at a directory tree written by the test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prometheus_client.core import Metric

PREFIX = "node_amazonefa_"
COUNTERS = ("tx_bytes", "rx_bytes", "tx_pkts", "rx_pkts", "rx_drops", "send_bytes", "recv_bytes", "send_wrs",
            "recv_wrs", "rdma_read_bytes", "rdma_write_bytes", "rdma_read_wrs", "rdma_write_wrs",
            "rdma_read_resp_bytes", "rdma_write_recv_bytes", "rdma_read_wr_err", "rdma_write_wr_err",
            "retrans_bytes", "retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events",
            "impaired_remote_conn_events")
SKIP = {"lifespan"}


@dataclass(frozen=True)
class PortCounters:
    device: str
    port: str
    counters: dict[str, int]


class EfaSysfs:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def devices(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self._is_efa(p))

    @staticmethod
    def _is_efa(dev: Path) -> bool:
        driver = dev / "device" / "driver"
        if driver.exists():  # real sysfs: keep EFA devices only (a node may also have other HCAs)
            return driver.resolve().name == "efa"
        return (dev / "ports").is_dir()

    def read(self) -> list[PortCounters]:
        out = []
        for dev in self.devices():
            ports = self.root / dev / "ports"
            for port in sorted(p for p in ports.iterdir() if p.is_dir()):
                hw = port / "hw_counters"
                values: dict[str, int] = {}
                if hw.is_dir():
                    for f in sorted(hw.iterdir()):
                        if f.name in SKIP or not f.is_file():
                            continue
                        try:
                            values[f.name] = int(f.read_text().strip() or 0)
                        except (OSError, ValueError):
                            continue
                out.append(PortCounters(dev, port.name, values))
        return out


class EfaCollector:
    def __init__(self, reader: EfaSysfs):
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        ports = self.reader.read()
        info = Metric(PREFIX + "info", "Non-numeric data from /sys/class/infiniband/<device>, value is always 1.",
                      "gauge")
        for dev in sorted({p.device for p in ports}):
            info.add_sample(PREFIX + "info", {"device": dev}, 1.0)
        yield info
        names = sorted({c for p in ports for c in p.counters})
        for counter in names:
            # untyped: the AWS exporter's names carry no _total, which prometheus_client would add
            metric = Metric(PREFIX + counter, f"Number of {counter.replace('_', ' ')} (EFA hw_counters).", "unknown")
            for p in ports:
                if counter in p.counters:
                    metric.add_sample(PREFIX + counter, {"device": p.device, "port": p.port}, float(p.counters[counter]))
            yield metric

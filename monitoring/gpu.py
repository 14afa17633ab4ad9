"""GPU metrics under dcgm-exporter's names, read through a narrow source interface (NVML: monitoring.nvml).

dcgm-exporter is what HyperPod and most clusters run; when a node has none, the node exporter
serves the same series from NVML (nvidia-ml-py), so dashboards and rules do not care which one
ran. Labels follow dcgm-exporter: ``gpu, UUID, pci_bus_id, device, modelName, Hostname`` and the
``DCGM_FI_DRIVER_VERSION`` label field; the XID series also carries ``err_code`` and ``err_msg``
(dcgm-exporter >= 3.3.6), so a new XID is a new series. Units are dcgm-exporter's: framebuffer in
MiB, power in W, energy in mJ, throttling (violation) time in microseconds.
No job id goes on these series (a long-lived exporter would multiply them per job); the
``hyperlaunch_gpu_job_info`` series maps (Hostname, gpu) to the run for joins.

Tests put a fake ``pynvml`` module on PYTHONPATH (tests/monitoring/fake_nvml); nothing here is a fake.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

from prometheus_client.core import Metric


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # gauge | counter (counters keep dcgm-exporter's names: no _total, exposed untyped)
    help: str


FIELDS: tuple[Field, ...] = (
    Field("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    Field("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    Field("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    Field("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    Field("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    Field("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."),
    Field("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    Field("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    Field("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    Field("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %)."),
    Field("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %)."),
    Field("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    Field("DCGM_FI_DEV_POWER_VIOLATION", "counter", "Throttling duration due to power constraints (in us)."),
    Field("DCGM_FI_DEV_THERMAL_VIOLATION", "counter", "Throttling duration due to thermal constraints (in us)."),
    Field("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    Field("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    Field("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."),
    Field("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    Field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    Field("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors"),
    Field("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"),
    Field("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
    # DCGM publishes a rate here although dcgm-exporter's CSV types it counter (dcgm-exporter#658)
    Field("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "gauge", "NVLink throughput of all links, TX + RX (KiB/s / 1000)."),
    Field("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink flow-control CRC errors."),
    Field("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink data CRC errors."),
    Field("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink retries."),
    Field("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink recovery errors."),
    Field("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active."),
    Field("DCGM_FI_PROF_SM_ACTIVE", "gauge", "The ratio of cycles an SM has at least 1 warp assigned."),
    Field("DCGM_FI_PROF_SM_OCCUPANCY", "gauge", "The ratio of number of warps resident on an SM."),
    Field("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active."),
    Field("DCGM_FI_PROF_DRAM_ACTIVE", "gauge", "Ratio of cycles the device memory interface is active."),
    Field("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge", "The rate of data transmitted over the PCIe bus (bytes/s)."),
    Field("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge", "The rate of data received over the PCIe bus (bytes/s)."),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
XID = "DCGM_FI_DEV_XID_ERRORS"
DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"  # a dcgm-exporter "label" field: one label on every GPU series
JOB_INFO = "hyperlaunch_gpu_job_info"
CRITICAL_XIDS = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140)  # ECC, row remap, NVLink, fell off the bus
XID_MESSAGES = {  # err_msg of the common XIDs (NVIDIA's XID catalogue); others carry an empty err_msg
    0: "No Error", 13: "Graphics Engine Exception", 31: "GPU memory page fault", 43: "GPU stopped processing",
    48: "Double Bit ECC Error", 63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure", 74: "NVLINK Error",
    79: "GPU has fallen off the bus", 92: "High single-bit ECC error rate", 94: "Contained ECC error",
    95: "Uncontained ECC error", 119: "GSP RPC Timeout", 120: "GSP Error", 140: "Unrecovered ECC Error",
}


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    minor: int


class GpuSource(Protocol):
    """What the exporter needs from NVML: devices, one sample per device, XID events."""

    def devices(self) -> list[GpuDevice]: ...

    def driver_version(self) -> str: ...

    def read(self, device: GpuDevice) -> dict[str, float]: ...

    def poll_xid(self, timeout_s: float) -> list[tuple[int, int]]:
        """(gpu index, XID) events seen within timeout_s; may return early."""
        ...


class DcgmCollector:
    """A prometheus_client collector: one sample of every device per scrape (cached 1 s).

    ``only``: serve just these fields (the ones an existing dcgm-exporter lacks; see
    monitoring.dcgm_coverage), so the two exporters never serve the same series.
    """

    def __init__(self, source: GpuSource, hostname: str, min_interval_s: float = 1.0,
                 only: Optional[frozenset[str]] = None):
        self.source = source
        self.hostname = hostname
        self.min_interval_s = min_interval_s
        self.fields = tuple(f for f in FIELDS if only is None or f.name in only)
        self.devices = source.devices()
        self.driver = source.driver_version()
        self.last_xid: dict[int, int] = {d.index: 0 for d in self.devices}
        self._cache: tuple[float, dict[int, dict[str, float]]] = (0.0, {})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._xid_thread = threading.Thread(target=self._watch_xids, name="xid-events", daemon=True)
        self._xid_thread.start()

    def _watch_xids(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.source.poll_xid(1.0)
            except Exception:
                self._stop.wait(1.0)
                continue
            with self._lock:
                for index, xid in events:
                    if index in self.last_xid:
                        self.last_xid[index] = xid  # latched, as DCGM's last-XID field

    def close(self) -> None:
        self._stop.set()

    def labels(self, d: GpuDevice) -> dict[str, str]:
        labels = {"gpu": str(d.index), "UUID": d.uuid, "pci_bus_id": d.pci_bus_id, "device": f"nvidia{d.minor}",
                  "modelName": d.name, "Hostname": self.hostname}
        if self.driver:
            labels[DRIVER_LABEL] = self.driver
        return labels

    def _samples(self) -> dict[int, dict[str, float]]:
        with self._lock:
            at, cached = self._cache
            if time.monotonic() - at < self.min_interval_s and cached:
                return cached
            samples = {}
            for d in self.devices:
                values = dict(self.source.read(d))
                values[XID] = float(self.last_xid.get(d.index, 0))
                samples[d.index] = values
            self._cache = (time.monotonic(), samples)
            return samples

    def collect(self) -> Iterator[Metric]:
        samples = self._samples()
        for f in self.fields:
            metric = Metric(f.name, f.help, "gauge" if f.kind == "gauge" else "unknown")
            for d in self.devices:
                value = samples.get(d.index, {}).get(f.name)
                if value is None:
                    continue
                labels = self.labels(d)
                if f.name == XID:
                    labels.update(err_code=str(int(value)), err_msg=XID_MESSAGES.get(int(value), ""))
                metric.add_sample(f.name, labels, value)
            if metric.samples:
                yield metric
        info = Metric(JOB_INFO, "Maps (Hostname, gpu) to the run the target labels name (join on it).", "gauge")
        for d in self.devices:
            info.add_sample(JOB_INFO, {"Hostname": self.hostname, "gpu": str(d.index), "UUID": d.uuid}, 1.0)
        yield info


def open_gpu_source() -> tuple[Optional[GpuSource], str]:
    """(source, "") or (None, why): NVML missing (no driver, no GPU) is a normal answer here."""
    try:
        from monitoring.nvml import NvmlSource

        return NvmlSource(), ""
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound / DriverNotLoaded / ImportError
        return None, f"{type(exc).__name__}: {exc}"

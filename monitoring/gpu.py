"""GPU metrics under dcgm-exporter's names, read through NVML (or a fake) behind a narrow interface.

dcgm-exporter is what HyperPod and most clusters run; when a node has none, the node exporter
serves the same series from NVML (nvidia-ml-py), so dashboards and rules do not care which one
ran. Labels follow dcgm-exporter 3.x: ``gpu, UUID, pci_bus_id, device, modelName, Hostname``.
No job id goes on these series (a long-lived exporter would multiply them per job); the
``hyperlaunch_gpu_job_info`` series maps (Hostname, gpu) to the run for joins.

``FakeGpuSource`` serves realistic, slowly varying values from a JSON spec that tests may rewrite
while it runs (to inject an XID or ECC errors); it is selected only by ``HYPERLAUNCH_FAKE_NVML``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

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
    Field("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    Field("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    Field("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."),
    Field("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    Field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    Field("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors"),
    Field("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"),
    Field("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
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
JOB_INFO = "hyperlaunch_gpu_job_info"
CRITICAL_XIDS = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140)  # ECC, row remap, NVLink, fell off the bus


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

    def read(self, device: GpuDevice) -> dict[str, float]: ...

    def poll_xid(self, timeout_s: float) -> list[tuple[int, int]]:
        """(gpu index, XID) events seen within timeout_s; may return early."""
        ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSource:
    """nvidia-ml-py. Fields a GPU does not support are left out (as dcgm-exporter does)."""

    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._gpm_prev: dict[int, Any] = {}
        self._gpm_ok: dict[int, bool] = {}
        self._events: Any = None
        try:
            self._events = pynvml.nvmlEventSetCreate()
            for h in self._handles:
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._events)
        except pynvml.NVMLError:
            self._events = None  # no XID events (e.g. inside some containers); the rest still works

    def devices(self) -> list[GpuDevice]:
        nv, out = self.nv, []
        for i, h in enumerate(self._handles):
            try:
                minor = nv.nvmlDeviceGetMinorNumber(h)
            except nv.NVMLError:
                minor = i
            out.append(GpuDevice(i, _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h)),
                                 _text(nv.nvmlDeviceGetPciInfo(h).busId), minor))
        return out

    def read(self, device: GpuDevice) -> dict[str, float]:
        nv, h, v = self.nv, self._handles[device.index], {}

        def put(name: str, fn: Any, *args: Any, scale: float = 1.0) -> None:
            try:
                v[name] = float(fn(h, *args)) * scale
            except (nv.NVMLError, TypeError, ValueError):
                pass

        put("DCGM_FI_DEV_SM_CLOCK", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM)
        put("DCGM_FI_DEV_MEM_CLOCK", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM)
        put("DCGM_FI_DEV_GPU_TEMP", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        put("DCGM_FI_DEV_POWER_USAGE", nv.nvmlDeviceGetPowerUsage, scale=1e-3)
        put("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", nv.nvmlDeviceGetTotalEnergyConsumption)
        put("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", nv.nvmlDeviceGetPcieReplayCounter)
        put("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            nv.NVML_VOLATILE_ECC)
        put("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nv.NVML_VOLATILE_ECC)
        put("DCGM_FI_PROF_PCIE_TX_BYTES", nv.nvmlDeviceGetPcieThroughput, nv.NVML_PCIE_UTIL_TX_BYTES, scale=1024.0)
        put("DCGM_FI_PROF_PCIE_RX_BYTES", nv.nvmlDeviceGetPcieThroughput, nv.NVML_PCIE_UTIL_RX_BYTES, scale=1024.0)
        put("DCGM_FI_DEV_ENC_UTIL", lambda hh: nv.nvmlDeviceGetEncoderUtilization(hh)[0])
        put("DCGM_FI_DEV_DEC_UTIL", lambda hh: nv.nvmlDeviceGetDecoderUtilization(hh)[0])
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            v["DCGM_FI_DEV_GPU_UTIL"], v["DCGM_FI_DEV_MEM_COPY_UTIL"] = float(util.gpu), float(util.memory)
        except nv.NVMLError:
            pass
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
            v["DCGM_FI_DEV_FB_RESERVED"] = mem.reserved / 2**20
        except (nv.NVMLError, TypeError, AttributeError):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except nv.NVMLError:
                mem = None
        if mem is not None:
            v["DCGM_FI_DEV_FB_FREE"], v["DCGM_FI_DEV_FB_USED"] = mem.free / 2**20, mem.used / 2**20
        try:
            corr, unc, _pending, failed = nv.nvmlDeviceGetRemappedRows(h)
            v["DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"] = float(corr)
            v["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"] = float(unc)
            v["DCGM_FI_DEV_ROW_REMAP_FAILURE"] = float(failed)
        except nv.NVMLError:
            pass
        v.update(self._memory_temp(h))
        v.update(self._nvlink_errors(h))
        v.update(self._gpm(device.index, h))
        return v

    def _memory_temp(self, h: Any) -> dict[str, float]:
        nv = self.nv
        try:
            fv = nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_MEMORY_TEMP])[0]
        except nv.NVMLError:
            return {}
        if fv.nvmlReturn != nv.NVML_SUCCESS:
            return {}
        member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(fv.valueType, "uiVal")
        return {"DCGM_FI_DEV_MEMORY_TEMP": float(getattr(fv.value, member))}

    def _nvlink_errors(self, h: Any) -> dict[str, float]:
        nv, totals = self.nv, {}  # type: Any, dict[str, float]
        kinds = (("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", nv.NVML_NVLINK_ERROR_DL_CRC_FLIT),
                 ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", nv.NVML_NVLINK_ERROR_DL_CRC_DATA),
                 ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", nv.NVML_NVLINK_ERROR_DL_REPLAY),
                 ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", nv.NVML_NVLINK_ERROR_DL_RECOVERY))
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                    continue
            except nv.NVMLError:
                continue
            for name, counter in kinds:
                try:
                    totals[name] = totals.get(name, 0.0) + float(nv.nvmlDeviceGetNvLinkErrorCounter(h, link, counter))
                except nv.NVMLError:
                    pass
        return totals

    def _gpm(self, index: int, h: Any) -> dict[str, float]:
        """Hopper+ profiling metrics (GPM) between this sample and the previous one."""
        nv = self.nv
        if self._gpm_ok.get(index) is False:
            return {}
        ids = (("DCGM_FI_PROF_GR_ENGINE_ACTIVE", nv.NVML_GPM_METRIC_GRAPHICS_UTIL),
               ("DCGM_FI_PROF_SM_ACTIVE", nv.NVML_GPM_METRIC_SM_UTIL),
               ("DCGM_FI_PROF_SM_OCCUPANCY", nv.NVML_GPM_METRIC_SM_OCCUPANCY),
               ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL),
               ("DCGM_FI_PROF_DRAM_ACTIVE", nv.NVML_GPM_METRIC_DRAM_BW_UTIL))
        try:
            if index not in self._gpm_ok:
                self._gpm_ok[index] = bool(nv.nvmlGpmQueryDeviceSupport(h).isSupportedDevice)
                if not self._gpm_ok[index]:
                    return {}
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(h, sample)
            prev, self._gpm_prev[index] = self._gpm_prev.get(index), sample
            if prev is None:
                return {}
            request = nv.c_nvmlGpmMetricsGet_t()
            request.version = nv.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(ids)
            request.sample1, request.sample2 = prev, sample
            for i, (_, metric) in enumerate(ids):
                request.metrics[i].metricId = metric
            nv.nvmlGpmMetricsGet(request)
            nv.nvmlGpmSampleFree(prev)
            return {name: request.metrics[i].value / 100.0 for i, (name, _) in enumerate(ids)
                    if request.metrics[i].nvmlReturn == nv.NVML_SUCCESS}
        except (nv.NVMLError, AttributeError, TypeError):
            self._gpm_ok[index] = False
            return {}

    def poll_xid(self, timeout_s: float) -> list[tuple[int, int]]:
        nv = self.nv
        if self._events is None:
            time.sleep(timeout_s)
            return []
        try:
            data = nv.nvmlEventSetWait_v2(self._events, int(timeout_s * 1000))
        except nv.NVMLError:  # NVML_ERROR_TIMEOUT: nothing happened
            return []
        try:
            index = nv.nvmlDeviceGetIndex(data.device)
        except nv.NVMLError:
            index = -1
        return [(index, int(data.eventData))]


class FakeGpuSource:
    """Realistic H100 values from a JSON spec (re-read on every sample, so a test can inject faults).

    Spec: ``{"gpus": 2, "model": "...", "xid": {"1": 79}, "ecc_dbe": {"0": 1}, "ecc_sbe": {...},
    "remap_failure": {"0": 1}, "temp_offset": {"1": 30}}`` (keys are GPU indices).
    """

    def __init__(self, spec_path: str):
        self.path = Path(spec_path)
        self.t0 = time.time()
        self._reported_xids: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def _spec(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def devices(self) -> list[GpuDevice]:
        spec = self._spec()
        model = spec.get("model", "NVIDIA H100 80GB HBM3")
        return [GpuDevice(i, f"GPU-fa4e{i:04x}-0000-4000-8000-00000000{i:04x}", model,
                          f"00000000:{0x53 + 0x10 * i:02X}:00.0", i) for i in range(int(spec.get("gpus", 8)))]

    def read(self, device: GpuDevice) -> dict[str, float]:
        spec = self._spec()
        i, t = device.index, time.time() - self.t0
        key = str(i)
        wave = math.sin(t / 7.0 + i)
        power = 560.0 + 90.0 * wave
        return {
            "DCGM_FI_DEV_SM_CLOCK": 1980.0, "DCGM_FI_DEV_MEM_CLOCK": 2619.0,
            "DCGM_FI_DEV_GPU_TEMP": 58.0 + 6.0 * wave + spec.get("temp_offset", {}).get(key, 0),
            "DCGM_FI_DEV_MEMORY_TEMP": 66.0 + 5.0 * wave,
            "DCGM_FI_DEV_POWER_USAGE": power,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 3.6e9 + t * 560.0 * 1000.0 + i * 1e6,
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 0.0,
            "DCGM_FI_DEV_GPU_UTIL": min(100.0, 93.0 + 6.0 * wave), "DCGM_FI_DEV_MEM_COPY_UTIL": 41.0 + 9.0 * wave,
            "DCGM_FI_DEV_ENC_UTIL": 0.0, "DCGM_FI_DEV_DEC_UTIL": 0.0,
            "DCGM_FI_DEV_FB_FREE": 81559.0 - 63112.0 - 512.0, "DCGM_FI_DEV_FB_USED": 63112.0,
            "DCGM_FI_DEV_FB_RESERVED": 512.0,
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": float(spec.get("ecc_sbe", {}).get(key, 0)),
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": float(spec.get("ecc_dbe", {}).get(key, 0)),
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": float(spec.get("ecc_dbe", {}).get(key, 0)),
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 0.0,
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": float(spec.get("remap_failure", {}).get(key, 0)),
            "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": 0.0, "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": 0.0,
            "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": 0.0, "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": 0.0,
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.93 + 0.05 * wave, "DCGM_FI_PROF_SM_ACTIVE": 0.88 + 0.05 * wave,
            "DCGM_FI_PROF_SM_OCCUPANCY": 0.41, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.52 + 0.08 * wave,
            "DCGM_FI_PROF_DRAM_ACTIVE": 0.37 + 0.05 * wave,
            "DCGM_FI_PROF_PCIE_TX_BYTES": 1.1e9, "DCGM_FI_PROF_PCIE_RX_BYTES": 1.3e9,
        }

    def poll_xid(self, timeout_s: float) -> list[tuple[int, int]]:
        time.sleep(timeout_s)
        with self._lock:
            new = [(int(g), int(x)) for g, x in self._spec().get("xid", {}).items()
                   if (int(g), int(x)) not in self._reported_xids]
            self._reported_xids.update(new)
        return new


class DcgmCollector:
    """A prometheus_client collector: one sample of every device per scrape (cached 1 s)."""

    def __init__(self, source: GpuSource, hostname: str, min_interval_s: float = 1.0):
        self.source = source
        self.hostname = hostname
        self.min_interval_s = min_interval_s
        self.devices = source.devices()
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
                time.sleep(1.0)
                continue
            with self._lock:
                for index, xid in events:
                    if index in self.last_xid:
                        self.last_xid[index] = xid  # latched, as DCGM's last-XID field

    def close(self) -> None:
        self._stop.set()

    def labels(self, d: GpuDevice) -> dict[str, str]:
        return {"gpu": str(d.index), "UUID": d.uuid, "pci_bus_id": d.pci_bus_id, "device": f"nvidia{d.minor}",
                "modelName": d.name, "Hostname": self.hostname}

    def _samples(self) -> dict[int, dict[str, float]]:
        with self._lock:
            at, cached = self._cache
            if time.monotonic() - at < self.min_interval_s and cached:
                return cached
            samples = {}
            for d in self.devices:
                values = dict(self.source.read(d))
                values["DCGM_FI_DEV_XID_ERRORS"] = float(self.last_xid.get(d.index, 0))
                samples[d.index] = values
            self._cache = (time.monotonic(), samples)
            return samples

    def collect(self) -> Iterator[Metric]:
        samples = self._samples()
        for f in FIELDS:
            metric = Metric(f.name, f.help, "gauge" if f.kind == "gauge" else "unknown")
            for d in self.devices:
                value = samples.get(d.index, {}).get(f.name)
                if value is not None:
                    metric.add_sample(f.name, self.labels(d), value)
            if metric.samples:
                yield metric
        info = Metric(JOB_INFO, "Maps (Hostname, gpu) to the run the target labels name (join on it).", "gauge")
        for d in self.devices:
            info.add_sample(JOB_INFO, {"Hostname": self.hostname, "gpu": str(d.index), "UUID": d.uuid}, 1.0)
        yield info


def open_gpu_source(fake_spec: Optional[str]) -> tuple[Optional[GpuSource], str]:
    """(source, "") or (None, why): NVML missing (no driver, no GPU) is a normal answer here."""
    if fake_spec:
        return FakeGpuSource(fake_spec), ""
    try:
        return NvmlSource(), ""
    except Exception as exc:  # pynvml.NVMLError_LibraryNotFound / DriverNotLoaded / ImportError
        return None, f"{type(exc).__name__}: {exc}"

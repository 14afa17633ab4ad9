"""The NVML reader behind monitoring.gpu: nvidia-ml-py values converted to dcgm-exporter's fields and units.

Fields a GPU does not support are left out (as dcgm-exporter does). Conversions: memory bytes ->
MiB (whole MiB, as DCGM), power mW -> W, violation (throttling) time ns -> us, NVLink data
counters (cumulative KiB) -> MiB/s between two samples, GPM percentages -> ratios 0-1.
"""

from __future__ import annotations

import time
from typing import Any

from monitoring.gpu import GpuDevice

MIB = 2**20


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSource:
    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._gpm_prev: dict[int, Any] = {}
        self._gpm_ok: dict[int, bool] = {}
        self._nvlink_prev: dict[int, tuple[float, float]] = {}  # index -> (monotonic time, TX+RX KiB)
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

    def driver_version(self) -> str:
        try:
            return _text(self.nv.nvmlSystemGetDriverVersion())
        except self.nv.NVMLError:
            return ""

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
        put("DCGM_FI_DEV_POWER_VIOLATION", lambda hh: nv.nvmlDeviceGetViolationStatus(
            hh, nv.NVML_PERF_POLICY_POWER).violationTime, scale=1e-3)
        put("DCGM_FI_DEV_THERMAL_VIOLATION", lambda hh: nv.nvmlDeviceGetViolationStatus(
            hh, nv.NVML_PERF_POLICY_THERMAL).violationTime, scale=1e-3)
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            v["DCGM_FI_DEV_GPU_UTIL"], v["DCGM_FI_DEV_MEM_COPY_UTIL"] = float(util.gpu), float(util.memory)
        except nv.NVMLError:
            pass
        v.update(self._memory(h))
        try:
            corr, unc, _pending, failed = nv.nvmlDeviceGetRemappedRows(h)
            v["DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"] = float(corr)
            v["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"] = float(unc)
            v["DCGM_FI_DEV_ROW_REMAP_FAILURE"] = float(failed)
        except nv.NVMLError:
            pass
        v.update(self._field_values(device.index, h))
        v.update(self._nvlink_errors(h))
        v.update(self._gpm(device.index, h))
        return v

    def _memory(self, h: Any) -> dict[str, float]:
        """Framebuffer in whole MiB, as DCGM (and dcgm-exporter) report it."""
        nv, out = self.nv, {}  # type: Any, dict[str, float]
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
            out["DCGM_FI_DEV_FB_RESERVED"] = float(mem.reserved // MIB)
        except (nv.NVMLError, TypeError, AttributeError):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except nv.NVMLError:
                return out
        out["DCGM_FI_DEV_FB_FREE"], out["DCGM_FI_DEV_FB_USED"] = float(mem.free // MIB), float(mem.used // MIB)
        return out

    def _field_values(self, index: int, h: Any) -> dict[str, float]:
        """HBM temperature and NVLink throughput (cumulative KiB counters; the rate needs two samples)."""
        nv, out = self.nv, {}  # type: Any, dict[str, float]
        ids = (nv.NVML_FI_DEV_MEMORY_TEMP, nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
               nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)
        try:
            values = nv.nvmlDeviceGetFieldValues(h, list(ids))
        except nv.NVMLError:
            return out
        got = {fv.fieldId: _field_value(nv, fv) for fv in values if fv.nvmlReturn == nv.NVML_SUCCESS}
        if ids[0] in got:
            out["DCGM_FI_DEV_MEMORY_TEMP"] = got[ids[0]]
        if ids[1] in got and ids[2] in got:
            now, total = time.monotonic(), got[ids[1]] + got[ids[2]]
            prev, self._nvlink_prev[index] = self._nvlink_prev.get(index), (now, total)
            if prev is not None and now > prev[0] and total >= prev[1]:
                out["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = (total - prev[1]) / (now - prev[0]) / 1024.0
        return out

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


def _field_value(nv: Any, fv: Any) -> float:
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(fv.valueType, "uiVal")
    return float(getattr(fv.value, member))

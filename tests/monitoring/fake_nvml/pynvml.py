"""A fake ``pynvml`` (nvidia-ml-py) for GPU-less machines: put this directory first on PYTHONPATH.

The product's real NVML reader (monitoring.nvml) then runs unchanged against H100-like values in
NVML's raw units (mW, bytes, ns, KiB), so its conversions to dcgm-exporter's units are tested too.
The values come from the JSON file named by ``FAKE_NVML_SPEC``, re-read when it changes, so a test
injects faults while the exporter runs (write it atomically: write a temporary file, os.replace)::

    {"gpus": 2, "model": "NVIDIA H100 80GB HBM3", "driver": "550.127.05",
     "xid": {"1": 79}, "ecc_dbe": {"0": 2}, "ecc_sbe": {}, "remap_failure": {"0": 1},
     "temp_offset": {"1": 30}, "thermal_throttle": {"1": 0.5}, "error": "LibraryNotFound"}

Keys are GPU indices; ``thermal_throttle`` is the share of time throttled; ``error`` makes nvmlInit
fail as it does without a driver. A malformed spec raises FakeNvmlSpecError naming the file and key.
Each XID in ``xid`` is delivered once per process as an NVML event.
"""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace
from typing import Any

SPEC_ENV = "FAKE_NVML_SPEC"
_PER_GPU = ("xid", "ecc_dbe", "ecc_sbe", "remap_failure", "temp_offset", "thermal_throttle")
_KEYS = {"gpus", "model", "driver", "error", *_PER_GPU}


class FakeNvmlSpecError(ValueError):
    pass


class NVMLError(Exception):
    def __init__(self, value: int = 999, message: str = "Unknown Error"):
        super().__init__(message)
        self.value = value


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(3, "Not Supported")


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12, "NVML Shared Library Not Found")


class NVMLError_Timeout(NVMLError):
    def __init__(self) -> None:
        super().__init__(10, "Timeout")


NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_TIMEOUT = 0, 3, 10
NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 0, 1, 0
NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1
NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 82, 138, 139
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_NVLINK_MAX_LINKS, NVML_FEATURE_ENABLED = 36, 1
NVML_NVLINK_ERROR_DL_REPLAY, NVML_NVLINK_ERROR_DL_RECOVERY = 0, 1
NVML_NVLINK_ERROR_DL_CRC_FLIT, NVML_NVLINK_ERROR_DL_CRC_DATA = 2, 3
NVML_GPM_METRIC_GRAPHICS_UTIL, NVML_GPM_METRIC_SM_UTIL, NVML_GPM_METRIC_SM_OCCUPANCY = 1, 2, 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL, NVML_GPM_METRIC_DRAM_BW_UTIL, NVML_GPM_METRICS_GET_VERSION = 5, 10, 1
nvmlEventTypeXidCriticalError = 8
nvmlMemory_v2 = 33554472
_LINKS = 18  # H100 SXM
_TOTAL_MEM = 81559 * 2**20

_state: dict[str, Any] = {"t0": time.monotonic(), "spec": None, "stamp": None, "reported": set()}


def _check(spec: Any, path: str) -> dict[str, Any]:
    def bad(key: str, why: str) -> FakeNvmlSpecError:
        return FakeNvmlSpecError(f"fake NVML spec {path}: {key!r} {why}")

    if not isinstance(spec, dict):
        raise bad("(top level)", f"must be a JSON object, got {type(spec).__name__}")
    for key in spec:
        if key not in _KEYS:
            raise bad(key, f"is not a known key ({', '.join(sorted(_KEYS))})")
    if not isinstance(spec.get("gpus", 8), int) or spec.get("gpus", 8) < 0:
        raise bad("gpus", f"must be an integer >= 0, got {spec.get('gpus')!r}")
    for key in _PER_GPU:
        for gpu, value in spec.get(key, {}).items():
            if not gpu.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, f"must map GPU indices to numbers, got {gpu!r}: {value!r}")
    if spec.get("error") not in (None, "LibraryNotFound"):
        raise bad("error", f"must be \"LibraryNotFound\" or absent, got {spec['error']!r}")
    return spec


def _spec() -> dict[str, Any]:
    path = os.environ.get(SPEC_ENV)
    if not path:
        raise FakeNvmlSpecError(f"the fake pynvml is on PYTHONPATH but {SPEC_ENV} is unset")
    st = os.stat(path)
    stamp = (st.st_ino, st.st_mtime_ns)
    if stamp != _state["stamp"]:
        try:
            loaded = json.loads(open(path).read())
        except ValueError as exc:
            raise FakeNvmlSpecError(f"fake NVML spec {path} is not JSON: {exc}") from None
        _state["spec"], _state["stamp"] = _check(loaded, path), stamp
    return _state["spec"]


def _per_gpu(key: str, h: int) -> float:
    return float(_spec().get(key, {}).get(str(h), 0))


def _elapsed() -> float:
    return time.monotonic() - _state["t0"]


def _wave(h: int) -> float:
    return math.sin(_elapsed() / 7.0 + h)


def nvmlInit() -> None:
    if _spec().get("error") == "LibraryNotFound":
        raise NVMLError_LibraryNotFound()


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return str(_spec().get("driver", "550.127.05"))


def nvmlDeviceGetCount() -> int:
    return int(_spec().get("gpus", 8))


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    return i


def nvmlDeviceGetIndex(h: int) -> int:
    return h


def nvmlDeviceGetMinorNumber(h: int) -> int:
    return h


def nvmlDeviceGetUUID(h: int) -> str:
    return f"GPU-fa4e{h:04x}-0000-4000-8000-00000000{h:04x}"


def nvmlDeviceGetName(h: int) -> str:
    return str(_spec().get("model", "NVIDIA H100 80GB HBM3"))


def nvmlDeviceGetPciInfo(h: int) -> Any:
    return SimpleNamespace(busId=f"00000000:{0x53 + 0x10 * h:02X}:00.0".encode())


def nvmlDeviceGetClockInfo(h: int, kind: int) -> int:
    return 1980 if kind == NVML_CLOCK_SM else 2619


def nvmlDeviceGetTemperature(h: int, sensor: int) -> int:
    return int(58 + 6 * _wave(h) + _per_gpu("temp_offset", h))


def nvmlDeviceGetPowerUsage(h: int) -> int:
    return int((560.0 + 90.0 * _wave(h)) * 1000)  # mW


def nvmlDeviceGetTotalEnergyConsumption(h: int) -> int:
    return int(3.6e9 + _elapsed() * 560.0 * 1000.0 + h * 1e6)  # mJ


def nvmlDeviceGetPcieReplayCounter(h: int) -> int:
    return 0


def nvmlDeviceGetTotalEccErrors(h: int, kind: int, counter: int) -> int:
    return int(_per_gpu("ecc_sbe" if kind == NVML_MEMORY_ERROR_TYPE_CORRECTED else "ecc_dbe", h))


def nvmlDeviceGetPcieThroughput(h: int, kind: int) -> int:
    return 1_100_000 if kind == NVML_PCIE_UTIL_TX_BYTES else 1_300_000  # KB/s


def nvmlDeviceGetEncoderUtilization(h: int) -> list[int]:
    return [0, 167000]


nvmlDeviceGetDecoderUtilization = nvmlDeviceGetEncoderUtilization


def nvmlDeviceGetUtilizationRates(h: int) -> Any:
    return SimpleNamespace(gpu=int(min(100.0, 93 + 6 * _wave(h))), memory=int(41 + 9 * _wave(h)))


def nvmlDeviceGetMemoryInfo(h: int, version: int = 1) -> Any:
    used, reserved = 63112 * 2**20 + 123456, 512 * 2**20  # not whole MiB: the reader must round down
    return SimpleNamespace(total=_TOTAL_MEM, used=used, reserved=reserved, free=_TOTAL_MEM - used - reserved)


def nvmlDeviceGetRemappedRows(h: int) -> tuple[int, int, int, int]:
    dbe = int(_per_gpu("ecc_dbe", h))
    return 0, dbe, 0, int(_per_gpu("remap_failure", h))


def nvmlDeviceGetViolationStatus(h: int, policy: int) -> Any:
    share = _per_gpu("thermal_throttle", h) if policy == NVML_PERF_POLICY_THERMAL else 0.02
    return SimpleNamespace(referenceTime=int(time.time() * 1e6), violationTime=int(_elapsed() * share * 1e9))


def nvmlDeviceGetFieldValues(h: int, ids: list[int]) -> list[Any]:
    kib = _elapsed() * 150e6  # 150 GB/s each way
    values = {NVML_FI_DEV_MEMORY_TEMP: 66 + 5 * _wave(h), NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: kib,
              NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: kib}
    return [SimpleNamespace(fieldId=i, nvmlReturn=NVML_SUCCESS if i in values else NVML_ERROR_NOT_SUPPORTED,
                            valueType=NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                            value=SimpleNamespace(ullVal=int(values.get(i, 0)))) for i in ids]


def nvmlDeviceGetNvLinkState(h: int, link: int) -> int:
    return NVML_FEATURE_ENABLED if link < _LINKS else 0


def nvmlDeviceGetNvLinkErrorCounter(h: int, link: int, counter: int) -> int:
    return 0


def nvmlGpmQueryDeviceSupport(h: int) -> Any:
    return SimpleNamespace(isSupportedDevice=1)


def nvmlGpmSampleAlloc() -> Any:
    return SimpleNamespace(h=None, t=0.0)


def nvmlGpmSampleGet(h: int, sample: Any) -> None:
    sample.h, sample.t = h, _elapsed()


def nvmlGpmSampleFree(sample: Any) -> None:
    pass


def c_nvmlGpmMetricsGet_t() -> Any:
    return SimpleNamespace(version=0, numMetrics=0, sample1=None, sample2=None,
                           metrics=[SimpleNamespace(metricId=0, value=0.0, nvmlReturn=0) for _ in range(98)])


def nvmlGpmMetricsGet(request: Any) -> None:
    h = request.sample2.h
    percent = {NVML_GPM_METRIC_GRAPHICS_UTIL: 93 + 5 * _wave(h), NVML_GPM_METRIC_SM_UTIL: 88 + 5 * _wave(h),
               NVML_GPM_METRIC_SM_OCCUPANCY: 41.0, NVML_GPM_METRIC_ANY_TENSOR_UTIL: 52 + 8 * _wave(h),
               NVML_GPM_METRIC_DRAM_BW_UTIL: 37 + 5 * _wave(h)}
    for m in request.metrics[:request.numMetrics]:
        m.value, m.nvmlReturn = percent.get(m.metricId, 0.0), NVML_SUCCESS if m.metricId in percent else 3


def nvmlEventSetCreate() -> Any:
    return SimpleNamespace()


def nvmlDeviceRegisterEvents(h: int, kinds: int, event_set: Any) -> None:
    pass


def nvmlEventSetWait_v2(event_set: Any, timeout_ms: int) -> Any:
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        for gpu, xid in sorted(_spec().get("xid", {}).items()):
            if (gpu, xid) not in _state["reported"]:
                _state["reported"].add((gpu, xid))
                return SimpleNamespace(device=int(gpu), eventType=nvmlEventTypeXidCriticalError, eventData=int(xid))
        if time.monotonic() >= deadline:
            raise NVMLError_Timeout()
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

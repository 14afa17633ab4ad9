"""GPU health of one node: ``dcgmi diag`` when DCGM is there, NVML checks always (nvidia-ml-py).

Parsers and verdicts are pure functions of recorded outputs (tests/cluster/fixtures/health/):

* ``dcgmi diag -r <level> -j``: DCGM 4.x prints ``{"DCGM Diagnostic": {"test_categories": [...]},
  "entity_groups": [...], "metadata": {...}}`` with one result per entity (``entity_group``/``entity_id``),
  DCGM 3.x ``{"DCGM GPU Diagnostic": {"test_categories": [...]}}`` with ``gpu_ids`` strings (NVIDIA/DCGM:
  dcgmi/Diag.cpp ``HelperJsonBuildOutput``, nvvs/include/NvvsJsonStrings.h,
  testing/python3/dcgm_diag_schema.json). A 4.x result that is only a warning is still printed as
  ``"Fail"`` (``HelperDisplayDiagResult`` hides Warn by default), so the verdict reads each error's
  ``error_severity`` (dcgmlib/dcgm_errors.h): MONITOR (1) and CONFIG (5) warn, the others fail.
* NVML (``read_nvml``): GPU count; uncorrectable ECC errors (volatile: since the driver loaded ->
  fail; aggregate: lifetime -> warn); row remapping (Ampere+: pending -> the GPU needs a reset, failed
  -> replace) or retired pages (older GPUs: pending, or 63 or more in total as DCGM's
  DCGM_LIMIT_MAX_RETIRED_PAGES); clock event reasons at idle (hardware slowdown, hardware thermal
  slowdown, power brake -> fail; software thermal slowdown -> warn); XID events while the check
  listens (the critical ones fail).
* The kernel log's ``NVRM: Xid (PCI:...): <n>, ...`` lines since boot are history: a critical XID
  there is a warning (the state checks above tell whether the GPU is still affected).

Critical XIDs (NVIDIA Xid catalog, https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html:
resolution RESET_GPU / RESTART_BM / CONTACT_SUPPORT): 48 double-bit ECC, 64 row-remapper failure,
74 NVLink error, 79 fallen off the bus, 92 high single-bit ECC rate, 94/95 contained/uncontained ECC,
119/120 GSP timeout/error, 140 unrecovered ECC. Application XIDs (13, 31, 43, 45) are not node faults.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from typing import Any, Optional

from cluster.health_records import FAIL, INFO, WARN, Finding

CRITICAL_XIDS = {48: "double-bit ECC error", 64: "row remapper failure", 74: "NVLink error",
                 79: "GPU has fallen off the bus", 92: "high single-bit ECC error rate",
                 94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP RPC timeout",
                 120: "GSP error", 140: "unrecovered ECC error"}
# nvmlClocksEventReason* (nvml.h; the older name is nvmlClocksThrottleReason*)
CLOCK_REASONS_FAIL = {0x8: "hardware slowdown", 0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}
CLOCK_REASONS_WARN = {0x20: "software thermal slowdown"}
MAX_RETIRED_PAGES = 63  # DCGM common/DcgmGPUHardwareLimits.h DCGM_LIMIT_MAX_RETIRED_PAGES
DCGM_SEVERITY_WARN = {1, 5}  # dcgmErrorSeverity_t: DCGM_ERROR_MONITOR, DCGM_ERROR_CONFIG
_XID_LINE = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.\d)?)\): (\d+)")


# ---- dcgmi diag ----------------------------------------------------------------------------------

def parse_dcgmi_diag(text: str) -> Optional[list[Finding]]:
    """Findings of a ``dcgmi diag -j`` run; None when the output holds no diagnostic (dcgmi unusable)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except ValueError:
        return None
    root = data.get("DCGM Diagnostic") or data.get("DCGM GPU Diagnostic") if isinstance(data, dict) else None
    if not isinstance(root, dict):
        return None
    findings: list[Finding] = []
    error = root.get("runtime_error") or data.get("runtime_error")
    if error:
        return [Finding("gpu.dcgmi", FAIL, f"dcgmi diag could not run: {error}", figure="dcgmi runtime error")]
    categories = root.get("test_categories") or []
    if not categories:
        return None
    for category in categories:
        for test in (category or {}).get("tests") or []:
            if not isinstance(test, dict):
                continue  # DCGM 3.x writes null between tests
            name = f"{category.get('category', '?')}/{test.get('name', '?')}"
            results = [r for r in test.get("results") or [] if isinstance(r, dict)]
            for result in results:
                finding = _dcgmi_result(name, result)
                if finding is not None:
                    findings.append(finding)
            summary = test.get("test_summary") or {}
            if not results and _status(summary.get("status")) == "fail":
                findings.append(_dcgmi_result(name, summary) or Finding("gpu.dcgmi", FAIL, f"{name} failed"))
    return findings


def _status(raw: Any) -> str:
    text = str(raw or "").strip().lower()
    return {"pass": "pass", "fail": "fail", "warn": "warn", "warning": "warn", "skip": "skip",
            "skipped": "skip"}.get(text, "not run")


def _dcgmi_result(test: str, result: dict[str, Any]) -> Optional[Finding]:
    status = _status(result.get("status"))
    if status not in ("fail", "warn"):
        return None
    gpu: Optional[int] = None
    if str(result.get("entity_group", "GPU")).upper() == "GPU" and isinstance(result.get("entity_id"), int):
        gpu = result["entity_id"]
    ids = str(result.get("gpu_ids", result.get("gpu_id", "")))
    if gpu is None and ids.isdigit():
        gpu = int(ids)
    where = f"GPU {gpu}" if gpu is not None else (f"GPUs {ids}" if ids else "node")
    texts, severities = [], []
    for warning in result.get("warnings") or []:
        if isinstance(warning, dict):
            texts.append(str(warning.get("warning", "")).strip())
            if isinstance(warning.get("error_severity"), int):
                severities.append(warning["error_severity"])
        else:
            texts.append(str(warning).strip())
    severity = WARN if status == "warn" or (severities and all(s in DCGM_SEVERITY_WARN for s in severities)) else FAIL
    detail = "; ".join(t for t in texts if t) or f"status {result.get('status')}"
    return Finding("gpu.dcgmi", severity, f"{test} on {where}: {detail}", figure=f"{test} {status} on {where}",
                   gpu=gpu)


def run_dcgmi(level: int, timeout_s: float) -> tuple[Optional[list[Finding]], str]:
    """(findings or None when dcgmi is missing or has no host engine, what ran or why not)."""
    dcgmi = shutil.which("dcgmi")
    if dcgmi is None:
        return None, "dcgmi not installed"
    try:
        out = subprocess.run([dcgmi, "diag", "-r", str(level), "-j"], capture_output=True, text=True,
                             timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        return [Finding("gpu.dcgmi", FAIL, f"dcgmi diag -r {level} did not finish within {timeout_s:.0f} s",
                        figure=f"dcgmi diag -r {level} > {timeout_s:.0f} s")], f"dcgmi diag -r {level}"
    except OSError as exc:
        return None, f"dcgmi failed to start ({exc})"
    findings = parse_dcgmi_diag(out.stdout)
    if findings is None:
        first = (out.stdout.strip() or out.stderr.strip()).splitlines()[:1]
        return None, f"dcgmi diag gave no result ({first[0][:120] if first else f'exit {out.returncode}'})"
    return findings, f"dcgmi diag -r {level}"


# ---- NVML ----------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_nvml(nv: Any, xid_window_s: float = 1.0) -> dict[str, Any]:
    """What the NVML checks look at, per GPU, as plain JSON values (``nv`` is the pynvml module).

    A value the GPU does not support is None. Raises nv.NVMLError when NVML cannot start."""
    nv.nvmlInit()
    try:
        def get(fn_name: str, *args: Any) -> Any:
            fn = getattr(nv, fn_name, None)
            if fn is None:
                return None
            try:
                return fn(*args)
            except nv.NVMLError:
                return None

        count = nv.nvmlDeviceGetCount()
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for i, h in enumerate(handles):
            rows = get("nvmlDeviceGetRemappedRows", h)
            pending = get("nvmlDeviceGetRetiredPagesPendingStatus", h)
            sbe = get("nvmlDeviceGetRetiredPages", h, nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
            dbe = get("nvmlDeviceGetRetiredPages", h, nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
            reasons = get("nvmlDeviceGetCurrentClocksEventReasons", h)
            if reasons is None:
                reasons = get("nvmlDeviceGetCurrentClocksThrottleReasons", h)
            pci = get("nvmlDeviceGetPciInfo", h)
            gpus.append({
                "index": i, "name": _text(get("nvmlDeviceGetName", h) or ""), "uuid": _text(get("nvmlDeviceGetUUID", h) or ""),
                "pci_bus_id": _text(pci.busId) if pci is not None else "",
                "ecc_uncorrected_volatile": get("nvmlDeviceGetTotalEccErrors", h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                nv.NVML_VOLATILE_ECC),
                "ecc_uncorrected_aggregate": get("nvmlDeviceGetTotalEccErrors", h,
                                                 nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC),
                "remapped_rows": [int(x) for x in rows] if rows is not None else None,  # corr, unc, pending, failure
                "retired_pages_pending": bool(pending) if pending is not None else None,
                "retired_pages": {"sbe": len(sbe), "dbe": len(dbe)} if sbe is not None and dbe is not None else None,
                "clocks_event_reasons": int(reasons) if reasons is not None else None,
            })
        return {"driver": _text(get("nvmlSystemGetDriverVersion") or ""), "count": count, "gpus": gpus,
                "xid_events": _listen_for_xids(nv, handles, xid_window_s)}
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass


def _listen_for_xids(nv: Any, handles: list[Any], window_s: float) -> Optional[list[list[int]]]:
    """[[gpu index, xid], ...] of critical-error events within the window; None when events are unavailable."""
    try:
        events = nv.nvmlEventSetCreate()
        for h in handles:
            nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, events)
    except (nv.NVMLError, AttributeError):
        return None
    seen: list[list[int]] = []
    deadline = time.monotonic() + window_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = nv.nvmlEventSetWait_v2(events, max(int(left * 1000), 1))
            except nv.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing happened
            try:
                index = nv.nvmlDeviceGetIndex(data.device)
            except nv.NVMLError:
                index = -1
            seen.append([int(index), int(data.eventData)])
    finally:
        try:
            nv.nvmlEventSetFree(events)
        except (nv.NVMLError, AttributeError):
            pass
    return seen


def nvml_findings(snapshot: dict[str, Any], expected_gpus: int) -> list[Finding]:
    """The verdict on a ``read_nvml`` snapshot (pure)."""
    out: list[Finding] = []
    count = int(snapshot.get("count", 0))
    if count < expected_gpus:
        out.append(Finding("gpu.count", FAIL, f"{count} of {expected_gpus} GPUs visible to NVML",
                           figure=f"{count}/{expected_gpus} GPUs"))
    for g in snapshot.get("gpus", []):
        i = int(g["index"])
        vol, agg = g.get("ecc_uncorrected_volatile"), g.get("ecc_uncorrected_aggregate")
        if vol:
            out.append(Finding("gpu.ecc", FAIL, f"GPU {i}: {vol} uncorrectable ECC errors since the driver loaded",
                               figure=f"GPU {i} {vol} volatile DBE", gpu=i))
        elif agg:
            out.append(Finding("gpu.ecc", WARN, f"GPU {i}: {agg} uncorrectable ECC errors in its lifetime", gpu=i))
        rows = g.get("remapped_rows")
        if rows is not None:
            corr, unc, pending, failure = (list(rows) + [0, 0, 0, 0])[:4]
            if failure:
                out.append(Finding("gpu.row_remap", FAIL, f"GPU {i}: row remapping failed (replace the GPU)",
                                   figure=f"GPU {i} row remap failure", gpu=i))
            elif pending:
                out.append(Finding("gpu.row_remap", FAIL, f"GPU {i}: row remapping pending (reset the GPU)",
                                   figure=f"GPU {i} row remap pending", gpu=i))
            elif unc:
                out.append(Finding("gpu.row_remap", INFO, f"GPU {i}: {unc} rows remapped after uncorrectable errors",
                                   gpu=i))
        if g.get("retired_pages_pending"):
            out.append(Finding("gpu.retired_pages", FAIL, f"GPU {i}: page retirement pending (reset the GPU)",
                               figure=f"GPU {i} page retirement pending", gpu=i))
        pages = g.get("retired_pages")
        if pages and pages.get("sbe", 0) + pages.get("dbe", 0) >= MAX_RETIRED_PAGES:
            total = pages.get("sbe", 0) + pages.get("dbe", 0)
            out.append(Finding("gpu.retired_pages", FAIL, f"GPU {i}: {total} retired pages (limit {MAX_RETIRED_PAGES})",
                               figure=f"GPU {i} {total} retired pages", gpu=i))
        reasons = g.get("clocks_event_reasons")
        if reasons:
            bad = [name for bit, name in CLOCK_REASONS_FAIL.items() if reasons & bit]
            soft = [name for bit, name in CLOCK_REASONS_WARN.items() if reasons & bit]
            if bad:
                out.append(Finding("gpu.throttle", FAIL, f"GPU {i}: clocks held down at idle by {', '.join(bad)}",
                                   figure=f"GPU {i} {bad[0]} (reasons 0x{reasons:x})", gpu=i))
            elif soft:
                out.append(Finding("gpu.throttle", WARN, f"GPU {i}: {', '.join(soft)} (reasons 0x{reasons:x})", gpu=i))
    for index, xid in snapshot.get("xid_events") or []:
        if xid in CRITICAL_XIDS:
            out.append(Finding("gpu.xid", FAIL, f"GPU {index}: XID {xid} ({CRITICAL_XIDS[xid]}) during the check",
                               figure=f"GPU {index} XID {xid}", gpu=index))
    return out


# ---- kernel log ----------------------------------------------------------------------------------

def parse_kernel_xids(text: str) -> list[tuple[str, int]]:
    """(PCI bus id, xid) of every ``NVRM: Xid`` line of a kernel log."""
    return [(m.group(1).lower(), int(m.group(2))) for m in _XID_LINE.finditer(text)]


def _pci_key(bus_id: str) -> Optional[tuple[int, int, int]]:
    """(domain, bus, device) of ``00000000:53:00.0`` (NVML) or ``0000:53:00`` (kernel log)."""
    parts = bus_id.strip().split(".")[0].split(":")
    try:
        return (int(parts[-3], 16), int(parts[-2], 16), int(parts[-1], 16)) if len(parts) >= 3 else None
    except ValueError:
        return None


def kernel_xid_findings(xids: list[tuple[str, int]], bus_ids: dict[str, int]) -> list[Finding]:
    """Critical XIDs since boot, as warnings (history; the state checks decide). ``bus_ids``: PCI id -> GPU."""
    gpus = {_pci_key(bus): index for bus, index in bus_ids.items()}
    out, seen = [], set()
    for pci, xid in xids:
        if xid not in CRITICAL_XIDS or (pci, xid) in seen:
            continue
        seen.add((pci, xid))
        gpu = gpus.get(_pci_key(pci))
        where = f"GPU {gpu}" if gpu is not None else f"PCI {pci}"
        out.append(Finding("gpu.xid", WARN, f"{where}: XID {xid} ({CRITICAL_XIDS[xid]}) in the kernel log since boot",
                           gpu=gpu))
    return out


def read_kernel_log(timeout_s: float = 5.0) -> Optional[str]:
    dmesg = shutil.which("dmesg")
    if dmesg is None:
        return None
    try:
        out = subprocess.run([dmesg], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


# ---- the node's GPU check ------------------------------------------------------------------------

def check_gpus(expected_gpus: int, diag_level: int, timeout_s: float) -> tuple[str, list[Finding]]:
    """(what ran, findings) on this node: dcgmi when usable, NVML always."""
    findings: list[Finding] = []
    ran: list[str] = []
    if diag_level > 0:
        dcgmi, what = run_dcgmi(diag_level, timeout_s * 0.8)
        if dcgmi is not None:
            findings += dcgmi
        ran.append(what)
    try:
        import pynvml

        snapshot = read_nvml(pynvml)
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError ...
        findings.append(Finding("gpu.driver", FAIL, f"NVML unavailable ({type(exc).__name__}: {exc}): no usable "
                                "GPU driver", figure="NVML unavailable"))
        return "; ".join(ran + ["nvml unavailable"]), findings
    ran.append(f"nvml (driver {snapshot.get('driver') or '?'})")
    findings += nvml_findings(snapshot, expected_gpus)
    log = read_kernel_log()
    if log is not None:
        buses = {str(g.get("pci_bus_id", "")).lower(): int(g["index"]) for g in snapshot.get("gpus", [])}
        findings += kernel_xid_findings(parse_kernel_xids(log), buses)
    return "; ".join(ran), findings

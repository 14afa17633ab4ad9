"""GPU health checks against recorded outputs (tests/cluster/fixtures/health/README.md says where each
format comes from): dcgmi diag JSON of DCGM 3.x and 4.x, NVML values, kernel-log XIDs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster import health_gpu
from cluster.health_gpu import (kernel_xid_findings, nvml_findings, parse_dcgmi_diag, parse_kernel_xids,
                                read_nvml)
from cluster.health_records import FAIL, INFO, WARN

FIXTURES = Path(__file__).parent / "fixtures" / "health"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def by_severity(findings: list, severity: str) -> list:
    return [f for f in findings if f.severity == severity]


# ---- dcgmi diag ----------------------------------------------------------------------------------

def test_dcgm4_level1_all_pass_has_no_findings() -> None:
    assert parse_dcgmi_diag(fixture("dcgmi_diag_r1_dcgm4_pass.json")) == []


def test_dcgm4_pending_row_remap_fails_the_gpu_with_dcgms_message() -> None:
    findings = parse_dcgmi_diag(fixture("dcgmi_diag_r1_dcgm4_row_remap_pending.json"))
    assert findings is not None and len(findings) == 1
    f = findings[0]
    assert (f.check, f.severity, f.gpu) == ("gpu.dcgmi", FAIL, 3)
    assert "Deployment/software on GPU 3" in f.message and "row remappings are pending" in f.message
    assert f.figure == "Deployment/software fail on GPU 3"


def test_dcgm4_monitor_severity_printed_as_fail_is_only_a_warning() -> None:
    """dcgmi prints a warning as "Fail" in JSON; the error's severity (MONITOR) says what it is."""
    findings = parse_dcgmi_diag(fixture("dcgmi_diag_r2_dcgm4_thermal_warning.json"))
    assert findings is not None
    assert [(f.severity, f.gpu) for f in findings] == [(WARN, 6)]
    assert "thermal violation in GPU 6" in findings[0].message and "Hardware/memory" in findings[0].message


def test_dcgm3_format_with_nulls_and_gpu_id_strings() -> None:
    findings = parse_dcgmi_diag(fixture("dcgmi_diag_r1_dcgm3_fail.json"))
    assert findings is not None and [(f.severity, f.gpu) for f in findings] == [(FAIL, 5)]
    assert "Page Retirement/Row Remap" in findings[0].message and "row remapping failed" in findings[0].message


@pytest.mark.parametrize("text", [fixture("dcgmi_diag_no_hostengine.txt"), "", "not json {", '{"other": 1}'])
def test_output_without_a_diagnostic_means_dcgmi_is_unusable(text: str) -> None:
    assert parse_dcgmi_diag(text) is None


def test_leading_noise_and_runtime_error() -> None:
    text = "WARNING: something\n" + json.dumps({"DCGM Diagnostic": {"runtime_error": "GPUs are in use"}})
    findings = parse_dcgmi_diag(text)
    assert findings is not None and findings[0].severity == FAIL and "GPUs are in use" in findings[0].message


def test_dcgmi_missing_or_without_host_engine_falls_back_to_nvml(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert health_gpu.run_dcgmi(1, 10) == (None, "dcgmi not installed")
    stub = tmp_path / "dcgmi"
    stub.write_text(f"#!/bin/sh\ncat {FIXTURES / 'dcgmi_diag_no_hostengine.txt'}\nexit 255\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    findings, what = health_gpu.run_dcgmi(1, 10)
    assert findings is None and what == ("dcgmi diag gave no result (Error: unable to establish a connection to the "
                                         "specified host: localhost)")
    stub.write_text(f"#!/bin/sh\n[ \"$1 $2 $3 $4\" = 'diag -r 2 -j' ] || exit 9\n"
                    f"cat {FIXTURES / 'dcgmi_diag_r1_dcgm4_row_remap_pending.json'}\nexit 226\n")
    findings, what = health_gpu.run_dcgmi(2, 10)
    assert what == "dcgmi diag -r 2" and findings is not None and findings[0].gpu == 3


# ---- NVML ----------------------------------------------------------------------------------------

def test_healthy_h100_node_passes() -> None:
    assert nvml_findings(json.loads(fixture("nvml_h100_healthy.json")), expected_gpus=8) == []


def test_h100_faults_each_named_with_its_gpu_and_figure() -> None:
    findings = nvml_findings(json.loads(fixture("nvml_h100_faults.json")), expected_gpus=8)
    fails = {(f.check, f.gpu) for f in by_severity(findings, FAIL)}
    assert fails == {("gpu.count", None), ("gpu.ecc", 2), ("gpu.row_remap", 4), ("gpu.row_remap", 5),
                     ("gpu.throttle", 6), ("gpu.xid", 3)}
    warns = {(f.check, f.gpu) for f in by_severity(findings, WARN)}
    assert warns == {("gpu.ecc", 0), ("gpu.throttle", 1)}  # lifetime ECC history; software thermal slowdown
    figures = {f.check + str(f.gpu): f.figure for f in findings if f.severity == FAIL}
    assert figures["gpu.countNone"] == "7/8 GPUs"
    assert figures["gpu.ecc2"] == "GPU 2 2 volatile DBE"
    assert figures["gpu.row_remap4"] == "GPU 4 row remap pending" and figures["gpu.row_remap5"] == "GPU 5 row remap failure"
    assert figures["gpu.throttle6"] == "GPU 6 hardware thermal slowdown (reasons 0x41)"
    assert figures["gpu.xid3"] == "GPU 3 XID 48"  # XID 13 (an application fault) is not a node fault


def test_retired_pages_on_older_gpus() -> None:
    findings = nvml_findings(json.loads(fixture("nvml_v100_retired_pages.json")), expected_gpus=2)
    assert {(f.check, f.gpu, f.severity) for f in findings} == {("gpu.retired_pages", 1, FAIL)}
    assert len(findings) == 2  # pending, and 64 >= 63 retired pages
    assert any("64 retired pages (limit 63)" in f.message for f in findings)


def test_remapped_rows_without_pending_or_failure_are_information() -> None:
    snapshot = json.loads(fixture("nvml_h100_healthy.json"))
    snapshot["gpus"][0]["remapped_rows"] = [2, 1, 0, 0]
    assert [(f.check, f.severity) for f in nvml_findings(snapshot, 8)] == [("gpu.row_remap", INFO)]


class FakeNvml:
    """pynvml's calling convention over a recorded snapshot: read_nvml must give the snapshot back."""

    class NVMLError(Exception):
        pass

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC = 1, 0, 1
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 0, 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.s = snapshot
        self.pending_events = [SimpleNamespace(device=i, eventData=x) for i, x in snapshot["xid_events"] or []]

    def _value(self, h: int, key: str) -> Any:
        value = self.s["gpus"][h][key]
        if value is None:
            raise self.NVMLError("Not Supported")
        return value

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return self.s["count"]
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlDeviceGetIndex(self, h: int) -> int: return h
    def nvmlSystemGetDriverVersion(self) -> str: return self.s["driver"]
    def nvmlDeviceGetName(self, h: int) -> bytes: return self._value(h, "name").encode()
    def nvmlDeviceGetUUID(self, h: int) -> str: return self._value(h, "uuid")
    def nvmlDeviceGetPciInfo(self, h: int) -> Any: return SimpleNamespace(busId=self._value(h, "pci_bus_id").encode())
    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple: return tuple(self._value(h, "remapped_rows"))
    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int: return int(self._value(h, "retired_pages_pending"))
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int: return self._value(h, "clocks_event_reasons")

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return self._value(h, "ecc_uncorrected_volatile" if counter == self.NVML_VOLATILE_ECC
                           else "ecc_uncorrected_aggregate")

    def nvmlDeviceGetRetiredPages(self, h: int, cause: int) -> list[int]:
        pages = self._value(h, "retired_pages")
        return list(range(pages["dbe" if cause else "sbe"]))

    def nvmlEventSetCreate(self) -> str:
        if self.s["xid_events"] is None:
            raise self.NVMLError("Not Supported")
        return "events"

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, events: str) -> None: ...
    def nvmlEventSetFree(self, events: str) -> None: ...

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> Any:
        if not self.pending_events:
            raise self.NVMLError("Timeout")
        return self.pending_events.pop(0)


@pytest.mark.parametrize("name", ["nvml_h100_healthy.json", "nvml_h100_faults.json", "nvml_v100_retired_pages.json"])
def test_read_nvml_records_what_the_verdict_reads(name: str) -> None:
    snapshot = json.loads(fixture(name))
    assert read_nvml(FakeNvml(snapshot), xid_window_s=0.05) == snapshot


# ---- kernel log ----------------------------------------------------------------------------------

def test_kernel_log_xids_are_history_warnings_for_the_critical_ones() -> None:
    xids = parse_kernel_xids(fixture("dmesg_xid.txt"))
    assert xids == [("0000:64:00", 13), ("0000:64:00", 13), ("0000:86:00", 94), ("0000:86:00", 94),
                    ("0000:ca:00", 79)]
    buses = {g["pci_bus_id"]: g["index"] for g in json.loads(fixture("nvml_h100_healthy.json"))["gpus"]}
    findings = kernel_xid_findings(xids, buses)
    assert [(f.severity, f.gpu) for f in findings] == [(WARN, 3), (WARN, 7)]  # 94 on 86:00, 79 on CA:00; 13 ignored
    assert "XID 79 (GPU has fallen off the bus)" in findings[1].message


def test_check_gpus_without_a_driver_is_an_environment_failure(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as on a node without the driver's library
    monkeypatch.setenv("PATH", "/nonexistent")
    what, findings = health_gpu.check_gpus(8, 1, 10)
    assert "dcgmi not installed" in what and [(f.check, f.severity) for f in findings] == [("gpu.driver", FAIL)]

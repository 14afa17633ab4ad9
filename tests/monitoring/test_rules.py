"""The alerting rules: `promtool check rules`, `promtool test rules` (a unit test for every alert),
and the map from rules and panels to the DCGM fields they need (monitoring.dcgm_coverage)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from monitoring.dcgm_coverage import panel_fields, plan, rule_fields
from monitoring.launch import RULES_DIR
from tests.monitoring.conftest import need

TESTS_DIR = RULES_DIR / "tests"
# HyperPod's basic dcgm-exporter field list (dcgm-metrics-basic.csv; see docs/monitoring.md)
HYPERPOD_BASIC = frozenset({
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_POWER_VIOLATION", "DCGM_FI_DEV_THERMAL_VIOLATION",
    "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"})


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, timeout=120,
                          cwd=TESTS_DIR)


def _alerts() -> set[str]:
    return {r["alert"] for p in RULES_DIR.glob("*.yml") for g in yaml.safe_load(p.read_text())["groups"]
            for r in g["rules"] if "alert" in r}


def test_promtool_check_rules() -> None:
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    assert files
    out = _promtool("check", "rules", *files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass() -> None:
    tests = sorted(p.name for p in TESTS_DIR.glob("*.yml"))
    out = _promtool("test", "rules", *tests)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(tests), out.stdout


def test_every_alert_has_a_promtool_test_that_expects_it_to_fire() -> None:
    fired: set[str] = set()
    for path in TESTS_DIR.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            fired |= {t["alertname"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert _alerts() - fired == set(), "alerts without a promtool test that makes them fire"
    assert len(_alerts()) >= 24


def test_rules_name_our_host_label_not_hostname_or_instance() -> None:
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for text in rule.get("annotations", {}).values():
                    assert "$labels.Hostname" not in text and "$labels.instance" not in text, (rule["alert"], text)


def test_rule_and_panel_fields_follow_recording_rules() -> None:
    fields = rule_fields()
    assert fields["GpuXidCritical"] == {"DCGM_FI_DEV_XID_ERRORS"}  # through hyperlaunch:gpu_new_xid
    assert fields["GpuEccDoubleBit"] == {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"}
    assert "HyperlaunchStraggler" not in fields
    assert any("DCGM_FI_PROF_SM_ACTIVE" in f for f in panel_fields().values())


def test_hyperpod_basic_leaves_ecc_nvlink_and_sm_rules_blind_unless_nvml_fills_in() -> None:
    blind = plan(HYPERPOD_BASIC, frozenset())
    assert set(blind.blind_rules) == {"GpuEccDoubleBit", "GpuEccSingleBitStorm", "GpuNvlinkErrors"}
    assert {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_PROF_SM_ACTIVE"} <= blind.missing
    assert any("SM active" in p for p in blind.blind_panels)
    filled = plan(HYPERPOD_BASIC, frozenset(f for fs in rule_fields().values() for f in fs) | blind.missing)
    assert filled.blind_rules == () and filled.missing == frozenset()
    assert filled.from_nvml == blind.missing  # only what the exporter lacks: no series is served twice


def test_promtool_missing_is_a_failure_not_a_skip(monkeypatch) -> None:
    import pytest

    monkeypatch.setenv("PATH", str(Path("/nonexistent")))
    with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
        need("promtool")

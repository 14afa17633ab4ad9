"""What a preflight leaves behind: the report, the table, the event line, the quarantine file for the batch
script, and the push to a real Pushgateway (Debian's prometheus-pushgateway, as the monitoring tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster import health_report as out
from cluster.bandwidth import expected_bandwidth
from cluster.health_net import link_verdict
from cluster.health_records import Endpoint, HealthSettings, LinkSample, Measurements, NodeReport
from cluster.health_verdict import Verdict, decide

GB = 1e9
SETTINGS = HealthSettings(run_name="tiny-20260101-000000")


def slow_node2() -> tuple[dict, Verdict]:
    m = Measurements(links=[LinkSample(Endpoint(a), Endpoint(b), rate * GB, 6) for a, b, rate in (
        ("node1", "node2", 1.6), ("node2", "node1", 0.0012), ("node1", "node3", 1.5), ("node3", "node1", 1.4),
        ("node2", "node3", 0.0011), ("node3", "node2", 1.5))])
    expected = expected_bandwidth(instance_type=None, gpu_type="cpu", ranks_per_node=1)
    nodes = ["node1", "node2", "node3"]
    verdict = decide(nodes, {n: NodeReport(n, n, 0.1, "n/a (gpu_type=cpu)", "n/a") for n in nodes},
                     link_verdict(m, expected, 0.5, 1), SETTINGS)
    return out.report_dict(verdict, SETTINGS, "1013.0", m, expected, 100.0, 109.3), verdict


def test_report_table_event_and_quarantine_file(tmp_path: Path) -> None:
    report, verdict = slow_node2()
    assert report["status"] == "quarantine" and report["duration_s"] == 9.3
    assert [(n["node"], n["status"]) for n in report["nodes"]] == [("node1", "pass"), ("node2", "fail"),
                                                                     ("node3", "pass")]
    table = out.render_table(report)
    assert "preflight 1013.0: QUARANTINE in 9 s" in table and "verdict: 1 of 3 nodes failed (node2: net.link)" in table
    row = next(line for line in table.splitlines() if line.startswith("│ node2"))
    assert "fail" in row and "0.00115" in row
    path = tmp_path / "control" / out.QUARANTINE_FILE
    out.write_quarantine(path, verdict)
    node, reason = path.read_text().rstrip("\n").split("\t")
    assert node == "node2" and reason.startswith("hyperlaunch preflight: net.link: node2 sends 0.00115 GB/s <")
    events = tmp_path / "events.jsonl"
    out.append_event(events, out.event_dict(report, SETTINGS, "/r/preflight/1013.0.json"))
    event = json.loads(events.read_text())
    assert (event["status"], event["quarantined"], event["action"], event["run"]) == (
        "quarantine", ["node2"], "drain, exclude and requeue", "tiny-20260101-000000")
    assert event["failed"] == {"node2": reason} and event["time"].endswith("Z")
    assert out.previous_quarantines(events) == 1 and out.previous_quarantines(tmp_path / "none") == 0
    out.write_report(tmp_path / "r.json", report)
    assert json.loads((tmp_path / "r.json").read_text())["quarantine"] == [["node2", reason]]


def test_nothing_to_quarantine_writes_no_file(tmp_path: Path) -> None:
    nodes = ["n1", "n2"]
    verdict = decide(nodes, {n: NodeReport(n, n, 0.1, "nvml", "n/a") for n in nodes}, None, SETTINGS)
    out.write_quarantine(tmp_path / "q", verdict)
    assert not (tmp_path / "q").exists()


def test_push_to_a_real_pushgateway(tmp_path: Path) -> None:
    if shutil.which("prometheus-pushgateway") is None:
        pytest.fail("prometheus-pushgateway is not installed (scripts/test.sh installs it)", pytrace=False)
    from tests.monitoring.services import Pushgateway

    gateway = Pushgateway(tmp_path)
    try:
        report, _ = slow_node2()
        assert out.push_event(gateway.url, report, SETTINGS) is None
        (group,) = [g for g in gateway.groups() if g["labels"].get("job") == out.PUSH_JOB]
        assert group["labels"]["run"] == "tiny-20260101-000000"

        def values(name: str) -> dict[tuple, float]:
            return {tuple(sorted((k, v) for k, v in m["labels"].items() if k not in ("job", "run", "instance"))):
                    float(m["value"]) for m in group[name]["metrics"]}

        assert values("hyperlaunch_preflight_status")[(("status", "quarantine"),)] == 1.0
        assert values("hyperlaunch_preflight_node_healthy") == {(("node", "node1"),): 1.0, (("node", "node2"),): 0.0,
                                                                (("node", "node3"),): 1.0}
        assert values("hyperlaunch_preflight_quarantined_nodes") == {(): 1.0}
        out_bw = values("hyperlaunch_preflight_link_bandwidth_bytes_per_second")
        assert out_bw[(("direction", "out"), ("node", "node2"))] == pytest.approx(0.00115 * GB)
    finally:
        gateway.stop()
    problem = out.push_event("http://127.0.0.1:9", report, SETTINGS)
    assert problem is not None and "cannot push the preflight result" in problem

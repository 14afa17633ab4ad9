"""What a preflight leaves behind: a report per attempt, a readable table, an event, a Pushgateway push,
and for the batch script the nodes to quarantine.

In a run directory (``<run>/preflight/``):

* ``<attempt>.json``: every node's findings, every measured link, the verdict (attempt =
  ``<job id>.<restart count>``); ``<attempt>/`` holds the raw per-node and per-rank files;
* ``events.jsonl``: one line per preflight (time, run, attempt, status, failed and quarantined nodes,
  the action) for the run's monitoring to pick up;
* ``<run>/control/preflight_quarantine``: ``node<TAB>reason`` lines the batch script drains, excludes
  and requeues without (removed by it).

With ``monitoring.pushgateway_url`` the verdict is also pushed to the Pushgateway (job
``hyperlaunch-preflight``, grouping key ``run``; each attempt replaces the run's group).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from cluster.bandwidth import Expectation
from cluster.health_records import FAIL, HealthSettings, Measurements, sample_to_dict
from cluster.health_verdict import QUARANTINE, Verdict

EVENTS_FILE = "events.jsonl"
QUARANTINE_FILE = "preflight_quarantine"  # in the run's control directory
PUSH_JOB = "hyperlaunch-preflight"


def _gbs(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 1e9:.3g}"


def report_dict(verdict: Verdict, settings: HealthSettings, attempt: str, measurements: Measurements,
                expected: Expectation, started: float, finished: float) -> dict[str, Any]:
    return {
        "attempt": attempt, "run": settings.run_name, "status": verdict.status, "message": verdict.message,
        "started": started, "finished": finished, "duration_s": round(finished - started, 2),
        "settings": dataclasses.asdict(settings),
        "expected": dataclasses.asdict(expected),
        "link_baseline_bytes_per_s": verdict.link_baseline, "link_baseline_source": verdict.link_baseline_source,
        "nodes": [{"node": n.node, "status": n.status, "reason": n.reason() if n.status == FAIL else "",
                   "gpu": n.report.gpu_source if n.report else None, "efa": n.report.efa if n.report else None,
                   "seconds": n.report.seconds if n.report else None,
                   "tx_bytes_per_s": verdict.tx.get(n.node), "rx_bytes_per_s": verdict.rx.get(n.node),
                   "findings": [dataclasses.asdict(f) for f in n.findings]} for n in verdict.nodes],
        "quarantine": [list(q) for q in verdict.quarantine],
        "warnings": [dataclasses.asdict(w) for w in verdict.warnings],
        "links": [sample_to_dict(s) for s in measurements.links],
        "intra_node": [sample_to_dict(s) for s in measurements.intra],
        "all_nodes": sample_to_dict(measurements.all_nodes) if measurements.all_nodes else None,
        "errors": list(measurements.errors),
    }


def render_table(report: dict[str, Any], *, color: bool = False, width: int = 140) -> str:
    """The per-node table (rich) and the verdict line, as text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"preflight {report['attempt']}: {report['status'].upper()} in {report['duration_s']:.0f} s",
                  title_justify="left")
    for column in ("node", "result", "GPU", "EFA", "out GB/s", "in GB/s", "findings"):
        table.add_column(column, overflow="fold")
    style = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    for n in report["nodes"]:
        findings = "; ".join(f"{f['severity']}: {f['message']}" for f in n["findings"]) or "-"
        table.add_row(n["node"], f"[{style.get(n['status'], '')}]{n['status']}[/]", n["gpu"] or "-", n["efa"] or "-",
                      _gbs(n["tx_bytes_per_s"]), _gbs(n["rx_bytes_per_s"]), findings)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, no_color=not color, highlight=False)
    console.print(table)
    base = report.get("link_baseline_bytes_per_s")
    if base:
        console.print(f"links compared with {_gbs(base)} GB/s ({report['link_baseline_source']}); "
                      f"{len(report['links'])} directions measured", highlight=False)
    if report.get("all_nodes"):
        console.print(f"all-reduce across all nodes: {_gbs(report['all_nodes']['bytes_per_s'])} GB/s bus bandwidth "
                      f"({report['all_nodes']['ranks']} ranks)", highlight=False)
    for w in report["warnings"]:
        console.print(f"warning: {w['message']}", highlight=False)
    console.print(f"verdict: {report['message']}", highlight=False)
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(path: Path, report: dict[str, Any]) -> None:
    _atomic_write(path, json.dumps(report, indent=1, sort_keys=True) + "\n")


def write_quarantine(path: Path, verdict: Verdict) -> None:
    """``node<TAB>reason`` lines for the batch script (only when the verdict is a quarantine)."""
    if verdict.status != QUARANTINE:
        return
    lines = [f"{node}\t{' '.join(reason.split())}" for node, reason in verdict.quarantine]
    _atomic_write(path, "\n".join(lines) + "\n")


def previous_quarantines(events_path: Path) -> int:
    """How many preflights of this run quarantined nodes (and so requeued it)."""
    count = 0
    try:
        for line in events_path.read_text().splitlines():
            try:
                count += json.loads(line).get("status") == QUARANTINE
            except ValueError:
                continue
    except OSError:
        return 0
    return count


def event_dict(report: dict[str, Any], settings: HealthSettings, report_path: str) -> dict[str, Any]:
    quarantined = [node for node, _ in report["quarantine"]]
    action = "none"
    if quarantined:
        action = ("mark for replacement (Action:Replace) and requeue" if settings.quarantine_action == "replace"
                  else "drain, exclude and requeue")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report["finished"])), "event": "preflight",
            "run": settings.run_name, "attempt": report["attempt"], "status": report["status"],
            "message": report["message"], "nodes": [n["node"] for n in report["nodes"]],
            "failed": {n["node"]: n["reason"] for n in report["nodes"] if n["status"] == FAIL},
            "quarantined": quarantined, "action": action, "duration_s": report["duration_s"], "report": report_path}


def append_event(path: Path, event: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(event, sort_keys=True) + "\n")


def push_event(url: str, report: dict[str, Any], settings: HealthSettings) -> Optional[str]:
    """Push the verdict to the Pushgateway; returns a problem (the preflight goes on) or None."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    status = Gauge("hyperlaunch_preflight_status", "Outcome of the run's latest preflight (1 for the current one).",
                   ["status"], registry=registry)
    for s in ("pass", "warn", "quarantine", "fail"):
        status.labels(s).set(1 if s == report["status"] else 0)
    healthy = Gauge("hyperlaunch_preflight_node_healthy", "1 if the node passed the latest preflight.", ["node"],
                    registry=registry)
    bandwidth = Gauge("hyperlaunch_preflight_link_bandwidth_bytes_per_second",
                      "Median bandwidth of the node's links in the latest preflight.", ["node", "direction"],
                      registry=registry)
    for n in report["nodes"]:
        healthy.labels(n["node"]).set(0 if n["status"] == FAIL else 1)
        for direction, key in (("out", "tx_bytes_per_s"), ("in", "rx_bytes_per_s")):
            if n[key] is not None:
                bandwidth.labels(n["node"], direction).set(n[key])
    Gauge("hyperlaunch_preflight_quarantined_nodes", "Nodes the latest preflight quarantined.",
          registry=registry).set(len(report["quarantine"]))
    Gauge("hyperlaunch_preflight_duration_seconds", "How long the latest preflight took.",
          registry=registry).set(report["duration_s"])
    Gauge("hyperlaunch_preflight_timestamp_seconds", "When the latest preflight ended (Unix time).",
          registry=registry).set(report["finished"])
    try:
        push_to_gateway(url, job=PUSH_JOB, registry=registry, timeout=5,
                        grouping_key={"run": settings.run_name or "unknown"})
    except Exception as exc:  # the preflight's verdict stands without the push
        return f"cannot push the preflight result to the Pushgateway {url} ({type(exc).__name__}: {exc})"
    return None

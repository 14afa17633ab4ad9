"""Preflight verdicts as alerts: what the job's health checks did before this attempt trained.

The preflight step of the batch script (cluster.healthcheck) appends one line per run of it to
``<run>/preflight/events.jsonl``. A quarantine ends that attempt before any rank starts, so the
alert is sent by the next attempt's rank 0 (the one that trains on the remaining nodes), once per
event: the number of events already reported is kept in ``<run>/monitoring/preflight_reported``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monitoring.events import Alert, Level

EVENTS = Path("preflight") / "events.jsonl"  # cluster.health_report.EVENTS_FILE under <run>/preflight
REPORTED = Path("monitoring") / "preflight_reported"


def pending_alerts(run_dir: str) -> list[Alert]:
    """Alerts for the preflight events not reported yet (quarantines and failures; a pass is silent)."""
    root = Path(run_dir)
    try:
        lines = (root / EVENTS).read_text().splitlines()
    except OSError:
        return []
    try:
        done = int((root / REPORTED).read_text().strip() or 0)
    except (OSError, ValueError):
        done = 0
    alerts = []
    for line in lines[done:]:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        status = event.get("status")
        if status not in ("quarantine", "fail"):
            continue
        failed = "; ".join(f"{node}: {reason}" for node, reason in (event.get("failed") or {}).items())
        where = f"attempt {event.get('attempt')}, {len(event.get('nodes') or [])} node(s) checked"
        if status == "quarantine":
            alerts.append(Alert("Preflight quarantined nodes",
                                f"run {event.get('run')}: {', '.join(event.get('quarantined') or [])} failed the "
                                f"preflight ({where}) -> {event.get('action')}: {failed or event.get('message')}",
                                Level.WARN))
        else:
            alerts.append(Alert("Preflight failed", f"run {event.get('run')}: {event.get('message')} ({where})"
                                + (f": {failed}" if failed else ""), Level.ERROR))
    try:
        (root / REPORTED).parent.mkdir(parents=True, exist_ok=True)
        tmp = (root / REPORTED).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{len(lines)}\n")
        os.replace(tmp, root / REPORTED)
    except OSError:
        pass
    return alerts

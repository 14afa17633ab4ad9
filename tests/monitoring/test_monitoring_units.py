

def test_preflight_events_become_alerts_once(tmp_path) -> None:
    """A quarantine in <run>/preflight/events.jsonl is alerted by the next attempt, once; a pass is silent."""
    from cluster.health_report import EVENTS_FILE, append_event
    from monitoring.events import Level
    from monitoring.preflight_events import pending_alerts

    events = tmp_path / "preflight" / EVENTS_FILE
    append_event(events, {"event": "preflight", "run": "r1", "attempt": "0", "status": "quarantine",
                          "message": "1 node failed", "nodes": ["node1", "node2"],
                          "failed": {"node2": "hyperlaunch preflight: net.link: node2 sends 0.001 GB/s < 0.7 GB/s"},
                          "quarantined": ["node2"], "action": "drain, exclude and requeue"})
    append_event(events, {"event": "preflight", "run": "r1", "attempt": "1", "status": "pass", "message": "ok",
                          "nodes": ["node1", "node3"], "failed": {}, "quarantined": [], "action": "none"})
    alerts = pending_alerts(str(tmp_path))
    assert [(a.title, a.level) for a in alerts] == [("Preflight quarantined nodes", Level.WARN)]
    assert "node2 failed the preflight (attempt 0, 2 node(s) checked) -> drain, exclude and requeue" in alerts[0].text
    assert "node2 sends 0.001 GB/s" in alerts[0].text
    assert pending_alerts(str(tmp_path)) == []  # reported once
    append_event(events, {"event": "preflight", "run": "r1", "attempt": "2", "status": "fail",
                          "message": "too many nodes failed (2 of 3 > 50%)", "nodes": ["a", "b", "c"],
                          "failed": {"a": "gpu.xid: 79", "b": "gpu.xid: 79"}, "quarantined": [], "action": "none"})
    (fail,) = pending_alerts(str(tmp_path))
    assert fail.title == "Preflight failed" and fail.level == Level.ERROR and "a: gpu.xid: 79" in fail.text
    assert pending_alerts(str(tmp_path / "no-such-run")) == []

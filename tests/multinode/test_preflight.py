"""The preflight health checks on the 3-node test Slurm (tests/multinode_cluster.py), for real: gloo
bandwidth tests between network namespaces, the verdict, the drain, the job's own requeue.

* one node's link throttled (tbf, 10 Mbit/s egress) -> the bandwidth check names that node -> it is
  drained and excluded -> the 2-node job requeues itself, runs on the other two nodes and trains;
* a healthy cluster passes, well within the time budget, with no node named, run after run;
* the operator command names a slow node in its table and exits 1.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import ROOT
from tests.multinode.test_training import by_step, log_text, submit, wait_done
from tests.multinode_cluster import MultiNodeSlurm

pytestmark = [pytest.mark.preflight, pytest.mark.multinode]
BUDGET_S = 90


def healthcheck(cluster: MultiNodeSlurm, out: Path, *args: str, timeout_s: float = 240):
    import subprocess

    return subprocess.run([sys.executable, "-m", "cluster.healthcheck", "--nodes", "node[1-3]",
                           "--time-budget", str(BUDGET_S), "--out", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s, env=cluster.client_env())


def node_fields(cluster: MultiNodeSlurm, node: str) -> dict[str, str]:
    out = cluster.run("scontrol", "-o", "show", "node", node).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    reason = re.search(r"Reason=(.*?)(?: \[|$)", out)  # the reason has spaces
    fields["Reason"] = reason.group(1) if reason else ""
    return fields


@pytest.mark.timeout(420)
def test_a_slow_node_is_named_drained_and_the_job_trains_on_the_others(multinode: MultiNodeSlurm,
                                                                       tmp_path: Path) -> None:
    multinode.shape("node2", "10mbit")  # node2's egress: Slurm gives a 2-node job node[1-2] first
    started = time.monotonic()
    try:
        run, job_id = submit(multinode, tmp_path / "runs", "cluster.nodes=2", "cluster.gpus_per_node=1",
                             f"cluster.preflight.time_budget_s={BUDGET_S}",
                             "monitoring.straggler.enabled=true")  # the monitoring callback: console alerts
        assert wait_done(multinode, run, timeout_s=300) == "COMPLETED"
        took = time.monotonic() - started
        text = log_text(run)
        first = json.loads((run / "preflight" / f"{job_id}.0.json").read_text())
        assert re.search(r"job \d+ on node\[1-2\] \(restart 0\)", text), text[:2000]
        assert first["status"] == "quarantine" and [n for n, _ in first["quarantine"]] == ["node2"], first["message"]
        reason = first["quarantine"][0][1]
        assert re.fullmatch(r"hyperlaunch preflight: net\.link: node2 sends [0-9.e-]+ GB/s < [0-9.]+ GB/s \(50% of the "
                            r"median of all links [0-9.]+ GB/s\)", reason), reason
        assert first["duration_s"] < BUDGET_S
        node2 = node_fields(multinode, "node2")
        assert "DRAIN" in node2["State"] and node2["Reason"] == reason, node2
        assert "ExcNodeList=node2" in multinode.run("scontrol", "-o", "show", "job", job_id).stdout
        # the requeued attempt ran on the two others, passed its preflight and trained every step
        assert re.search(r"job \d+ on node\[1,3\] \(restart 1\)", text), text[-3000:]
        second = json.loads((run / "preflight" / f"{job_id}.1.json").read_text())
        assert second["status"] in ("pass", "warn") and {n["node"] for n in second["nodes"]} == {"node1", "node3"}
        assert sorted(by_step(text)) == list(range(1, 17))
        assert "preflight: draining node2: hyperlaunch preflight: net.link" in text
        assert "preflight: requeued without node2" in text
        # the attempt that trained reported what the preflight did before it (W&B and the console)
        assert "monitoring: [WARN] Preflight quarantined nodes: run" in text and "node2 failed the preflight" in text
        events = [json.loads(line) for line in (run / "preflight" / "events.jsonl").read_text().splitlines()]
        assert [(e["status"], e["quarantined"], e["action"]) for e in events] == [
            ("quarantine", ["node2"], "drain, exclude and requeue"), (second["status"], [], "none")]
        print(f"slow node2 drained, job COMPLETED on node[1,3] {took:.0f} s after submit; preflights "
              f"{first['duration_s']:.1f} s and {second['duration_s']:.1f} s")
    finally:
        multinode.unshape("node2")
        multinode.run("scontrol", "update", "nodename=node2", "state=resume")


@pytest.mark.timeout(300)
def test_a_healthy_cluster_passes_every_time_within_the_budget(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
    durations = []
    for attempt in range(3):
        proc = healthcheck(multinode, tmp_path / f"hc{attempt}")
        report = json.loads((tmp_path / f"hc{attempt}" / "report.json").read_text())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert report["status"] in ("pass", "warn") and report["quarantine"] == [], report["message"]
        assert all(n["status"] != "fail" for n in report["nodes"])
        assert len(report["links"]) == 6 and all(x["complete"] and x["transfers"] >= 2 for x in report["links"])
        assert report["duration_s"] < BUDGET_S / 3
        durations.append(report["duration_s"])
    assert set(multinode.node_states().values()) == {"idle"}  # nothing drained
    print(f"3 healthy preflights on node[1-3]: {', '.join(f'{d:.1f}' for d in durations)} s")


@pytest.mark.timeout(300)
def test_the_operator_command_names_a_slow_node(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
    multinode.shape("node3", "10mbit")
    try:
        proc = healthcheck(multinode, tmp_path / "hc")
    finally:
        multinode.unshape("node3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("│ node")}
    assert "fail" in rows["node3"] and "node3 sends at" in rows["node3"], proc.stdout
    assert "pass" in rows["node1"] and "pass" in rows["node2"]
    assert "to drain: scontrol update nodename=node3 state=drain reason='hyperlaunch preflight: net.link" in proc.stdout
    assert set(multinode.node_states().values()) == {"idle"}  # the operator command only reports

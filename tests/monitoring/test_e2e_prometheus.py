"""A real Prometheus scrapes a real 2-rank CPU training run (torchrun via the launcher).

One monitored run, shared by the tests below: rank 1 becomes 16x slower in its compute section
for 40 steps (test-only fault injection in trainer.timing), a fake pynvml (tests/monitoring/fake_nvml)
under the product's real NVML reader serves two H100s with an XID 79 and a double-bit ECC error, a fake EFA sysfs tree shows traffic with a retransmit burst
and impaired/unresponsive remotes, W&B runs offline. Checkpointing is real: async saves every 10
steps, replicated to a real S3 server on loopback (moto) that is killed once the first step is
in S3, so replication starts failing the way it does when S3 becomes unreachable.
Then every dashboard panel and variable query and every alerting rule runs against Prometheus
over the run's time window, as Grafana and Prometheus would.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.faults import FAULT_ENV, PLUGIN
import yaml

from monitoring import dashboards
from monitoring.launch import RULES_DIR
from tests.checkpointing.s3_services import CREDENTIALS, MotoServer
from tests.monitoring.conftest import Launched, Stack, fake_nvml_env, launch
from tests.monitoring.fakes import HardwareTimeline, write_efa_tree, write_nvml_spec

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]

RUN_STEPS = 200  # 5 windows of 10 steps before the fault (the throughput baseline), 9 after it
FIRING = {  # alerts whose condition this run creates
    "HyperlaunchStraggler", "HyperlaunchThroughputDrop", "HyperlaunchReplicationFailing", "GpuXidCritical",
    "GpuXidError", "GpuEccDoubleBit", "GpuRowRemapFailure", "EfaImpairedRemoteConnection", "EfaUnresponsiveRemote",
    "EfaRetransmitBurst", "EfaRetransmitTimeouts",
}
# the failure and bad-input runs (test_e2e_failures.py) cover HyperlaunchJobFailed, HyperlaunchRankDown and
# HyperlaunchMonitoringDegraded; the rest must stay silent here while their inputs exist
_METRIC = re.compile(r"\b((?:hyperlaunch|DCGM|node_amazonefa)_[A-Za-z0-9_]+|up)\b(?!\s*\()")


class S3Outage(threading.Thread):
    """Kills the S3 server once the replicator reports its first replicated step."""

    def __init__(self, server: MotoServer, checkpoint_dir: Path):
        super().__init__(daemon=True)
        self.server, self.status = server, checkpoint_dir / "replication" / "status.json"
        self.stop = threading.Event()
        self.killed_after_step: int | None = None

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                step = json.loads(self.status.read_text()).get("last_replicated_step")
            except (OSError, ValueError):
                continue
            if step is not None:
                self.server.kill()
                self.killed_after_step = step
                return


@pytest.fixture(scope="module")
def healthy_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    hw = tmp_path_factory.mktemp("hw")
    efa = write_efa_tree(hw / "infiniband", value=1000)
    spec = write_nvml_spec(hw / "nvml.json", xid={"1": 79})
    timeline = HardwareTimeline(efa, stack.targets, spec, prometheus=stack.prometheus)
    s3 = MotoServer(hw / "moto", env=CREDENTIALS).start()
    s3.client().create_bucket(Bucket="monitoring-ckpt")
    checkpoints = hw / "checkpoints"
    outage = S3Outage(s3, checkpoints)
    timeline.start()
    outage.start()
    try:
        run = launch(stack, [
            f"training.train_steps={RUN_STEPS}", "cluster.gpu_type=h100-80gb", "cluster.efa_devices=2",
            "checkpoint.enabled=true", f"checkpoint.dir={checkpoints}", "checkpoint.save_interval=10",
            "checkpoint.s3.bucket=monitoring-ckpt", f"checkpoint.s3.endpoint_url={s3.endpoint}",
            "checkpoint.s3.max_attempts=1", "checkpoint.s3.final_upload_timeout_s=3",
            f"monitoring.efa_sysfs_dir={efa}", "monitoring.wandb=true", "monitoring.wandb_mode=offline",
            f"monitoring.pushgateway_url={stack.pushgateway.url}", "monitoring.push_interval_s=1",
            "monitoring.straggler.enabled=true", "monitoring.straggler.interval_steps=10",
            # thresholds far from the defaults: two CPU ranks sharing two cores with Prometheus, S3, W&B and
            # the replicator (and, in the loaded-core check, a CPU hog) differ by up to 3x for seconds, and
            # the job's tokens/s by 2-3x between windows; the benchmark, not this test, measures sensitivity
            "monitoring.straggler.warmup_steps=20", "monitoring.straggler.raise_score=0.3",
            "monitoring.straggler.clear_score=0.6", "monitoring.straggler.consecutive=2",
            "monitoring.straggler.throughput_drop=0.6", "monitoring.alerts.min_interval_s=0",
            "monitoring.alerts.max_per_hour=1000",  # every replication failure alerts (min_interval_s=0)
            "cluster.price_per_node_hour=98.32",  # the goodput ledger's cost (p5.48xlarge on demand, us-east-1)
        ], env={
            **fake_nvml_env(spec),
            FAULT_ENV: "slow:rank=1,factor=16,from=65,to=105", "HYPERLAUNCH_PLUGINS": PLUGIN,
            **CREDENTIALS,
        }, timeout_s=200)
    finally:
        timeline.stop.set()
        outage.stop.set()
        s3.kill()
    assert run.proc.returncode == 0, run.output[-5000:]
    assert outage.killed_after_step is not None, "the replicator never reported a replicated step"
    yield run


def _substitute(expr: str, run: str) -> str:
    return (expr.replace("$run", run).replace("$host", ".*")
            .replace("$__rate_interval", "4s"))


def test_every_dashboard_panel_returns_data(stack: Stack, healthy_run: Launched) -> None:
    run = healthy_run.run_dir.name
    empty = []
    checked = 0
    for d in dashboards.DASHBOARDS:
        for panel in d.panels:
            for q in panel.queries:
                result = stack.prometheus.query_range(_substitute(q.expr, run), healthy_run.start, healthy_run.end + 5)
                checked += 1
                if not result:
                    empty.append(f"{d.title} / {panel.title}: {q.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert checked >= 50


def test_dashboard_files_are_current_and_variables_resolve(stack: Stack, healthy_run: Launched) -> None:
    for name, text in dashboards.render_all().items():
        assert (dashboards.OUT_DIR / name).read_text() == text, f"regenerate: python -m monitoring.dashboards ({name})"
        model = json.loads(text)
        for var in model["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.match(r"label_values\((.*), (\w+)\)$", var["query"]["query"])
            assert m, var
            values = stack.prometheus.label_values(m.group(2), _substitute(m.group(1), healthy_run.run_dir.name),
                                                   healthy_run.start, healthy_run.end + 5)
            assert values, f"{name}: variable {var['name']} has no values"


def _rules() -> list[dict]:
    """The alerting rules (recording rules feed them and are judged through them)."""
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [r for r in group["rules"] if "alert" in r]
    return rules


def _this_run(series: list[dict], run: str) -> list[dict]:
    """Series of this run, or without a run label (node-level); the session's other runs (the failure
    tests share this Prometheus and Pushgateway, whose pushed series never expire) are not judged here."""
    return [s for s in series if s["metric"].get("run", run) == run]


def test_alert_rules_fire_where_expected_and_stay_silent_elsewhere(stack: Stack, healthy_run: Launched) -> None:
    window = (healthy_run.start, healthy_run.end + 5)
    run = healthy_run.run_dir.name
    problems = []
    for rule in _rules():
        name, expr = rule["alert"], rule["expr"]
        result = _this_run(stack.prometheus.query_range(expr, *window), run)
        if name in FIRING and not result:
            problems.append(f"{name} should fire in this run but its expression returns nothing: {expr}")
        if name not in FIRING:
            # a `for:` clause is part of the rule: judge those by Prometheus' own evaluation
            firing = f'ALERTS{{alertname="{name}", alertstate="firing"}}'
            silent = (not _this_run(stack.prometheus.query_range(firing, *window), run)
                      if "for" in rule else not result)
            if not silent:
                problems.append(f"{name} fires although nothing in this run should trigger it: {result[:2]}")
        for metric in set(_METRIC.findall(expr)):
            if not stack.prometheus.query_range(f"count({metric})", *window):
                problems.append(f"{name}: metric {metric} has no series at all (typo, or not exported?)")
    assert not problems, "\n".join(problems)


def test_prometheus_itself_evaluated_the_rules(stack: Stack, healthy_run: Launched) -> None:
    groups = {g["name"] for g in stack.prometheus.rules()}
    assert {"hyperlaunch-training", "hyperlaunch-gpu", "hyperlaunch-efa"} <= groups
    window = (healthy_run.start, healthy_run.end + 5)
    fired = stack.prometheus.query_range('ALERTS{alertname="HyperlaunchStraggler", alertstate="firing"}', *window)
    assert {s["metric"]["rank"] for s in fired} == {"1"}, fired
    assert fired[0]["metric"]["host"] and fired[0]["metric"]["gpu"] == "1"
    xid = stack.prometheus.query_range('ALERTS{alertname="GpuXidCritical", alertstate="firing"}', *window)
    assert {s["metric"]["gpu"] for s in xid} == {"1"}


def test_detector_flags_exactly_the_slow_rank(stack: Stack, healthy_run: Launched) -> None:
    window = (healthy_run.start, healthy_run.end + 5)
    run = healthy_run.run_dir.name
    flagged = stack.prometheus.query_range(f'hyperlaunch_straggler_flagged{{run="{run}"}} == 1', *window)
    assert {s["metric"]["rank"] for s in flagged} == {"1"}
    log = (healthy_run.run_dir / "logs" / "local.out").read_text()
    raised = [ln for ln in log.splitlines() if "Straggler detected" in ln]
    assert raised and all("rank 1 on" in ln and "GPU 1" in ln for ln in raised), raised
    assert "Straggler cleared: rank 1" in log
    # a straggler slows the whole job: the throughput watch saw it, and saw it recover
    assert "Throughput drop" in log and "Throughput recovered" in log


def test_targets_recorded_in_run_dir_and_removed_after_a_clean_finish(stack: Stack, healthy_run: Launched) -> None:
    endpoints = sorted(p.name for p in (healthy_run.run_dir / "monitoring" / "endpoints").iterdir())
    assert endpoints == [f"node-{socket.gethostname()}.json", "rank-00000.json", "rank-00001.json"]
    record = json.loads((healthy_run.run_dir / "monitoring" / "endpoints" / "rank-00001.json").read_text())
    assert record[0]["labels"]["rank"] == "1" and record[0]["labels"]["gpu"] == "1"
    assert not list(stack.targets.glob(f"{healthy_run.run_dir.name}.*.json"))  # clean finish: unregistered
    config = (healthy_run.run_dir / "prometheus.yml").read_text()
    assert f"{healthy_run.run_dir.name}.rank-*.json" in config and "rules/hyperlaunch.yml" in config


def test_pushgateway_had_the_running_state_and_lost_the_group_at_the_clean_end(stack: Stack,
                                                                                healthy_run: Launched) -> None:
    run = healthy_run.run_dir.name
    window = (healthy_run.start, healthy_run.end + 5)
    pushed = stack.prometheus.query_range(
        f'hyperlaunch_job_state{{job="hyperlaunch", run="{run}", state="running"}} == 1', *window)
    assert pushed and all(s["metric"].get("rank") == "0" for s in pushed), pushed
    assert run not in json.dumps(stack.pushgateway.groups())  # deleted when the run finished


def test_wandb_offline_run_has_alerts_and_metrics(healthy_run: Launched) -> None:
    records = healthy_run.wandb_records()
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    titles = [a["title"] for a in alerts]
    for expected in ("Job started", "Straggler detected: rank 1", "Straggler cleared: rank 1", "Throughput drop",
                     "Throughput recovered", "Checkpoint replication failing", "Job finished",
                     *(f"Milestone {m}%" for m in (10, 25, 50, 75, 90, 100)), "Plan drift"):
        assert expected in titles, titles
    detected = next(a for a in alerts if a["title"] == "Straggler detected: rank 1")
    assert re.search(r"rank 1 on \S+, GPU 1 \(cpu\): score 0\.\d\d", detected["text"]), detected
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    losses = [h for h in history if "train/loss" in h]
    assert len(losses) == RUN_STEPS and [int(h["train/step"]) for h in losses] == list(range(1, RUN_STEPS + 1))
    assert any("straggler/min_score" in h for h in history) and any("train/mfu" in h for h in history)
    progress = [h for h in history if "progress/fraction" in h]
    assert progress and float(progress[-1]["progress/fraction"]) == 1.0 and int(progress[-1]["train/step"]) == RUN_STEPS
    assert 0 < float(progress[-1]["goodput/ratio"]) < 1 and float(progress[-1]["plan/step_time_ratio"]) > 0
    exit_record = [r for r in records if r["type"] == "exit"]
    assert exit_record and exit_record[-1]["exit"].get("exit_code", 0) == 0


def test_checkpoint_series_come_from_the_real_saves(stack: Stack, healthy_run: Launched) -> None:
    window = (healthy_run.start, healthy_run.end + 5)
    run = healthy_run.run_dir.name
    saves = stack.prometheus.query_range(
        f'hyperlaunch_checkpoint_operations_total{{run="{run}", operation="save", outcome="ok"}}', *window)
    counted = {s["metric"]["rank"] for s in saves if max(float(v) for _, v in s["values"]) > 0}
    assert counted == {"0", "1"}, saves  # every rank reports its share
    assert max(float(v) for s in saves for _, v in s["values"]) >= 5  # saves every 10 of 200 steps
    sizes = {float(v) for s in stack.prometheus.query_range(f'hyperlaunch_checkpoint_size_bytes{{run="{run}"}}',
                                                            *window) for _, v in s["values"]} - {0.0}  # 0 before the first save
    manifests = [json.loads(p.read_text()) for p in _checkpoint_dir(healthy_run).glob("step_*/manifest.json")]
    assert manifests and sizes and sizes <= {float(sum(f["size"] for f in m["files"].values())) for m in manifests}
    blocking = stack.prometheus.query_range(f'hyperlaunch_checkpoint_blocking_seconds{{run="{run}"}}', *window)
    stalls = [float(v) for s in blocking for _, v in s["values"]]
    assert stalls and max(stalls) > 0 and all(0 <= v < 30 for v in stalls)  # 0 until the first save
    replicated = stack.prometheus.query_range(
        f'hyperlaunch_checkpoint_operations_total{{run="{run}", operation="replication", outcome="ok"}}', *window)
    counted = {s["metric"]["rank"] for s in replicated if max(float(v) for _, v in s["values"]) > 0}
    assert counted == {"0"}, replicated  # the replicator belongs to rank 0 (the others' series stay at 0)


def _checkpoint_dir(run: Launched) -> Path:
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    return Path(config["checkpoint"]["dir"])


def test_progress_and_goodput_series(stack: Stack, healthy_run: Launched) -> None:
    """The run-level series of rank 0: progress reaches 1, the ledger's parts add up to the elapsed wall
    time, the cost follows the price, the plan ratio is there."""
    run = healthy_run.run_dir.name
    window = (healthy_run.start, healthy_run.end + 5)

    def last(metric: str) -> dict[str, float]:
        series = stack.prometheus.query_range(f'{metric}{{run="{run}", job="hyperlaunch-ranks"}}', *window)
        return {s["metric"].get("category", ""): float(s["values"][-1][1]) for s in series}

    assert last("hyperlaunch_progress_ratio")[""] >= 0.9  # the last scrape may come a few steps before the end
    assert last("hyperlaunch_progress_milestone_percent")[""] >= 90
    parts = last("hyperlaunch_wall_seconds")
    assert {"productive", "startup", "checkpoint", "straggler"} <= {k for k, v in parts.items() if v > 0}, parts
    ledger = json.loads((healthy_run.run_dir / "goodput.json").read_text())
    elapsed = ledger["last_update"] - ledger["first_start"]
    assert abs(sum(ledger["seconds"].values()) - elapsed) < 0.5, (ledger["seconds"], elapsed)
    assert parts["straggler"] > 1.0  # rank 1 ran 16x slower for 40 steps: the whole job waited for it
    goodput = last("hyperlaunch_goodput_ratio")[""]
    assert abs(goodput - parts["productive"] / sum(parts.values())) < 0.02
    cost = last("hyperlaunch_cost_usd")[""]
    scraped_total = sum(parts.values())
    assert abs(cost - scraped_total / 3600 * 98.32) < 0.02 * cost  # one node (values of one scrape, +-1 step)
    assert last("hyperlaunch_plan_step_time_ratio")[""] > 0

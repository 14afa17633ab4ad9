"""Unit tests of monitoring/: sinks and fan-out isolation, the alert rate limiter, straggler hysteresis,
the throughput watch, alert texts and secret redaction. Pure and fast; the e2e tests prove the wiring."""

from __future__ import annotations

import io

import pytest

from configs.monitoring_config import AlertConfig, StragglerConfig
from monitoring.alerts import RateLimiter, redact, straggler_alerts, throughput_alert
from monitoring.events import Alert, Level, Outcome, RankIdentity, RunInfo, StepSample
from monitoring.sinks import ConsoleSink, FanOut, MetricSink
from monitoring.straggler import RankWindow, StragglerDetector, ThroughputWatch
from monitoring.wandb_sink import failure_alert

STEP = StepSample(step=1, total_steps=2, loss=1.0, grad_norm=None, lr=0.1, step_time_s=0.1, tokens_per_s=1.0,
                  tokens=1, tflops_per_gpu=1.0, mfu_percent=None, compute_s=0.1, data_wait_s=0.0)


class Recorder(MetricSink):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[str] = []

    def step(self, sample: StepSample) -> None:
        self.events.append(f"step {sample.step}")

    def finish(self, outcome: Outcome) -> None:
        self.events.append(f"finish {outcome.state}")


class Broken(MetricSink):
    name = "broken"

    def step(self, sample: StepSample) -> None:
        raise ConnectionError("exporter gone")


def test_fan_out_isolates_a_failing_sink_and_reports_it_once() -> None:
    err, after = io.StringIO(), Recorder()
    fan = FanOut([Broken(), after], err=err)
    for _ in range(3):
        fan.step(STEP)
    fan.start(RunInfo(run="r", run_name="r", world_size=1, total_steps=2))  # the no-op base: nothing raised
    fan.finish(Outcome("finished", 2))
    assert after.events == ["step 1", "step 1", "step 1", "finish finished"]
    assert err.getvalue().count("the broken sink failed in step: ConnectionError: exporter gone") == 1


def test_console_prints_alerts_on_rank_0_and_each_problem_once_per_rank() -> None:
    lines: list[str] = []
    rank0, rank1 = ConsoleSink(0, lines.append), ConsoleSink(1, lines.append)
    for sink in (rank0, rank1):
        sink.alert(Alert("Throughput drop", "run r: 10 tokens/s\nsecond line", Level.WARN))
        sink.degraded("pushgateway", "cannot push")
        sink.degraded("pushgateway", "cannot push, again")
    assert lines == ["monitoring: [WARN] Throughput drop: run r: 10 tokens/s", "monitoring: rank 0: cannot push",
                     "monitoring: rank 1: cannot push"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_per_title_interval_hourly_cap_and_terminal_alerts() -> None:
    clock = Clock()
    limiter = RateLimiter(AlertConfig(min_interval_s=600, max_per_hour=3), clock=clock)
    drop = Alert("Throughput drop", "slow")
    assert limiter.admit(drop) == drop
    clock.now += 599
    assert limiter.admit(drop) is None and limiter.admit(drop) is None
    clock.now += 1
    again = limiter.admit(drop)
    assert again is not None and again.text == "slow\n(2 similar alerts suppressed by the rate limit)"
    assert limiter.admit(Alert("Straggler detected: rank 3", "x")) is not None  # another title: 3rd this hour
    assert limiter.admit(Alert("Straggler detected: rank 4", "x")) is None  # the hourly cap
    final = Alert("Job failed", "boom", Level.ERROR, terminal=True)
    assert limiter.admit(final) == final  # never dropped
    clock.now += 3601
    assert limiter.admit(Alert("Straggler detected: rank 4", "x")) is not None


def _windows(medians: dict[int, float]) -> list[RankWindow]:
    return [RankWindow(rank=r, group=0, median_s=m) for r, m in medians.items()]


def test_straggler_hysteresis_raises_after_consecutive_intervals_and_does_not_flap() -> None:
    det = StragglerDetector(StragglerConfig(raise_score=0.93, clear_score=0.96, consecutive=2, peer_tolerance=0.0))
    healthy = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    slow = {**healthy, 2: 1.2}  # score 1 / 1.2 = 0.83
    between = {**healthy, 2: 1.0 / 0.945}  # 0.945: neither raise nor clear
    reports = [det.update(i, _windows(m)) for i, m in enumerate([healthy, healthy, healthy, slow, healthy, slow,
                                                                 slow, between, between, healthy, healthy])]
    raised = [(r.step, r.raised) for r in reports if r.raised]
    cleared = [(r.step, r.cleared) for r in reports if r.cleared]
    assert raised == [(6, (2,))]  # one slow interval alone (step 3) does not raise
    assert cleared == [(10, (2,))]  # in the band between the thresholds it stays flagged
    assert [r.flagged for r in reports][6:10] == [(2,)] * 4
    assert reports[3].scores[2].score == pytest.approx(1 / 1.2)


def test_a_job_wide_slowdown_flags_no_rank_but_the_throughput_watch_sees_it() -> None:
    cfg = StragglerConfig(consecutive=2, throughput_drop=0.2)
    det, watch = StragglerDetector(cfg), ThroughputWatch(cfg)
    changes = []
    for i, (factor, tps) in enumerate([(1.0, 100)] * 6 + [(1.5, 60)] * 3 + [(1.0, 100)] * 2):
        report = det.update(i, _windows({r: factor * (1 + 0.01 * r) for r in range(8)}))
        assert report.flagged == ()
        t = watch.update(i, tps)
        if t.changed:
            changes.append((i, t.dropped))
    assert changes == [(7, True), (10, False)]


def test_throughput_baseline_ignores_lucky_windows_and_jitter() -> None:
    watch = ThroughputWatch(StragglerConfig(consecutive=2, throughput_drop=0.2, baseline_intervals=30))
    jitter = [100.0, 95, 300, 105, 100, 97, 98, 103] * 4  # normal, with a lucky window now and then
    series = jitter + [60.0] * 5 + [100.0] * 4
    changes = [(i, r.dropped) for i, r in enumerate(watch.update(i, t) for i, t in enumerate(series)) if r.changed]
    assert changes == [(33, True), (38, False)]  # the best-window baseline (300) flagged the jitter itself


def test_alert_texts_name_rank_host_gpu_and_numbers() -> None:
    det = StragglerDetector(StragglerConfig(consecutive=1, peer_tolerance=0.0))
    who = {1: RankIdentity(rank=1, local_rank=1, host="ip-10-1-2-3", gpu="1", gpu_uuid="GPU-8f1c")}
    report = det.update(40, _windows({0: 0.375, 1: 0.461}), who)
    (alert,) = straggler_alerts("run-a", report)
    assert alert.title == "Straggler detected: rank 1" and alert.level is Level.WARN
    assert alert.text == ("rank 1 on ip-10-1-2-3, GPU 1 GPU-8f1c: score 0.81 (relative 0.81, individual 1.00); "
                          "compute 461.0 ms per step, +23% vs its peers' reference 375.0 ms\n(run run-a, step 40)")
    many = det.update(41, _windows({0: 0.1, 1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2, 6: 0.1, 7: 0.1, 8: 0.1, 9: 0.1}))
    assert straggler_alerts("r", many)[0].title == "Straggler detected: ranks 2, 3, 4 (+1 more)"
    watch = ThroughputWatch(StragglerConfig(consecutive=1))
    for step in range(5):
        watch.update(step, 1000.0)
    drop = throughput_alert("run-a", watch.update(5, 500.0), [1])
    assert drop is not None and drop.text == ("run run-a, step 5: 500 tokens/s, 50% below its baseline "
                                              "1,000 tokens/s; straggler ranks: 1")
    failed = failure_alert({"rank": 1, "who": "rank 1 on h, GPU 1 (cpu)", "step": 7, "reason": "OOM",
                            "details": "--- traceback"}, "run-a")
    assert failed.terminal and failed.text == "run run-a: rank 1 on h, GPU 1 (cpu) failed at step 7: OOM\n--- traceback"


def test_redact_removes_secret_values_and_key_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-123456789")
    monkeypatch.setenv("CUSTOM_CRED", "hunter2-secret")
    text = ("token tok-123456789 in url; custom hunter2-secret; aws AKIAABCDEFGHIJKLMNOP; wandb "
            "0123456789abcdef0123456789abcdef01234567; password=s3cr3t! api_key: 'abc'; step 1234567890")
    assert redact(text, ("CUSTOM_CRED",)) == ("token [redacted] in url; custom [redacted]; aws [redacted]; wandb "
                                              "[redacted]; password=[redacted] api_key: [redacted]'; step 1234567890")
    assert "hunter2-secret" in redact(text)  # a name that does not look secret is redacted only when listed

"""Progress, ETA, the goodput ledger and plan vs actual.

Unit tests of the pure parts (synthetic clocks), then a real CPU run through the launcher that is
killed mid-run (SIGKILL of the trainer: torchrun restarts it inside the job, which resumes from
the last commit): the ledger's parts add up to the wall time, the redone steps are counted, the
restart's cost is logged, and the ETA converges to the real end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from configs.monitoring_config import PlanCheckConfig
from tests.e2e import ROOT, only_run
from tests.faults import fault_env
from trainer import metrics
from trainer.goodput import GoodputLedger, process_start_time
from trainer.plan_check import Measured, Prediction, compare
from trainer.progress import Progress


def test_ledger_books_phases_steps_and_redone_work(tmp_path: Path) -> None:
    t0 = 1000.0
    ledger = GoodputLedger(str(tmp_path), active=True, process_start=t0)
    ledger.transition("resume", t0 + 4.0)  # 4 s of start-up
    ledger.transition("step_end", t0 + 6.0)  # 2 s loading the checkpoint (start-up too)
    t = t0 + 6.0
    for step in range(1, 21):
        ledger.transition("step", t + 0.1)  # 0.1 s between steps: other
        duration = 3.0 if step == 15 else 1.0  # one slow step: 3 s against a 1 s median
        ledger.transition("step_end", t + 0.1 + duration)
        ledger.step(step, duration, data_wait_s=0.2)
        t += 0.1 + duration
    ledger.transition("checkpoint", t)
    ledger.transition("step_end", t + 5.0)  # a 5 s checkpoint stall
    s = ledger.state.seconds
    assert s["startup"] == pytest.approx(6.0) and s["checkpoint"] == pytest.approx(5.0)
    assert s["data_wait"] == pytest.approx(20 * 0.2) and s["other"] == pytest.approx(20 * 0.1)
    assert s["straggler"] == pytest.approx(3.0 - 1.25 * 1.0)  # the excess over 1.25 x the median
    assert s["productive"] == pytest.approx(20 * 0.8 + 2.0 - 1.75)
    assert ledger.state.total == pytest.approx(t + 5.0 - t0)  # the parts add up to the wall time
    ledger.save(force=True)
    saved = ledger.state.last_update

    # the next attempt: 30 s after the last save, resumed from step 16 -> steps 17..20 are redone
    again = GoodputLedger(str(tmp_path), active=True, process_start=saved + 30.0)
    assert again.state.attempts == 2 and again.state.seconds["restarts"] == pytest.approx(30.0)
    productive = again.state.seconds["productive"]
    redone, seconds = again.resumed(16)
    assert redone == 4 and seconds == pytest.approx(4 * 0.8)
    assert again.state.seconds["productive"] == pytest.approx(productive - 3.2)
    assert again.state.seconds["restarts"] == pytest.approx(30.0 + 3.2)
    assert again.state.redone_steps == 4


def test_ledger_is_inert_off_rank_zero(tmp_path: Path) -> None:
    ledger = GoodputLedger(str(tmp_path), active=False, process_start=1.0)
    ledger.transition("step", 5.0)
    ledger.step(1, 1.0, 0.0)
    ledger.save(force=True)
    assert not (tmp_path / "goodput.json").exists() and ledger.state.total == 0.0


def test_process_start_is_the_real_start_not_a_whole_second_early() -> None:
    # psutil's create_time adds the start tick to a boot time /proc/stat rounds down to the second:
    # early by up to 1 s (0.35 s on the machine this was written on), which the ledger booked as
    # "reload" instead of "restart"
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; print(time.time(), flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        first_statement = float(child.stdout.readline())
        started = process_start_time(child.pid)
    finally:
        child.kill()
        child.wait()
    assert started is not None
    assert before - 0.03 <= started <= first_statement, (before, started, first_statement)
    assert abs(process_start_time() - psutil.Process().create_time()) < 1.5  # same clock, same process


def test_eta_converges_and_milestones_fire_once() -> None:
    progress = Progress(total_steps=100, tokens_per_step=1000, start_step=0, elapsed_before_s=0.0, now=0.0)
    t, fired = 0.0, []
    for step in range(1, 101):
        t += 2.0 if step <= 20 else 1.0  # slow at first: the ETA must forget the early rate
        report = progress.update(step, now=t)
        fired += [report.milestone] if report.milestone else []
        if step >= 50:
            assert report.eta_s is not None and abs(t + report.eta_s - 120.0) <= 0.1 * 120.0 * 0.5
    assert fired == [10, 25, 50, 75, 90, 100]
    assert report.tokens_done == report.tokens_total == 100_000 and report.fraction == 1.0


def test_step_line_round_trips_progress_fields() -> None:
    line = metrics.format_step_line(metrics.StepMetrics(
        step=5, total_steps=10, loss=1.0, grad_norm=None, lr=1e-3, step_time_s=0.5, tokens_per_s=100.0,
        tflops_per_gpu=0.1, mfu_percent=None, tokens_done=5_000_000, tokens_total=10_000_000, eta_s=90061.0,
        elapsed_s=61.0))
    assert "tokens=5M/10M progress=50.0% eta=1d 1:01:01 elapsed=0:01:01" in line
    parsed = metrics.parse_step_line(line)
    assert parsed is not None and parsed.eta_s == 90061.0 and parsed.elapsed_s == 61.0
    assert metrics.parse_step_line(line.split(" tokens=")[0]) is not None  # the older format still parses


def _measured(step: float, **kw: object) -> Measured:
    base: dict = dict(step_time_s=step, compute_s=(0.5, 0.5), data_wait_share=0.01, slow_share=0.0, peak_bytes=None)
    base.update(kw)
    return Measured(**base)


def test_plan_comparison_names_the_likely_cause() -> None:
    cfg = PlanCheckConfig()
    plan = Prediction(step_time_s=1.0, peak_bytes=60 * 2**30)
    ok = compare(plan, _measured(1.1, peak_bytes=58 * 2**30), cfg)
    assert not ok.drift and ok.causes == () and ok.step_ratio == pytest.approx(1.1)
    data = compare(plan, _measured(1.6, data_wait_share=0.3), cfg)
    assert data.drift and data.causes[0].startswith("data-wait dominated: ranks wait 30%")
    straggler = compare(plan, _measured(1.6, compute_s=(0.5, 0.5, 0.9, 0.5)), cfg)
    assert straggler.causes[0].startswith("a straggler: rank 2 computes 0.9 s")
    memory = compare(plan, _measured(1.0, peak_bytes=20 * 2**30), cfg)
    assert memory.drift and memory.memory_ratio == pytest.approx(1 / 3) and "memory far below" in memory.causes[0]
    model = compare(plan, _measured(0.5), cfg)
    assert model.drift and "faster than the predictor's model" in model.causes[0] and "calibrate" in model.causes[0]
    assert "DRIFT" in model.line() and "x0.50" in model.line()


# -- a real run through the launcher -------------------------------------------------------------

STEP_LINE = re.compile(r"^step=(\d+)/(\d+) .* eta=((?:\d+d )?\d+:\d\d:\d\d) elapsed=((?:\d+d )?\d+:\d\d:\d\d)$")


class Timed:
    """The launcher's output, each line with the wall time it arrived (read by a thread)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines = proc, []  # type: ignore[var-annotated]
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for _, line in self.lines):
            assert self.proc.poll() is None, f"launcher exited early:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"{pattern!r} not seen in {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.05)


def _trainer_pids(launcher_pid: int) -> list[int]:
    kids = psutil.Process(launcher_pid).children(recursive=True)
    return [p.pid for p in kids if "trainer" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())]


def test_killed_run_resumes_and_its_ledger_adds_up(tmp_path: Path) -> None:
    steps, interval = 60, 10
    cmd = [sys.executable, "-m", "launcher", "config=tiny_local", f"runs_root={tmp_path / 'runs'}",
           f"training.train_steps={steps}", "training.precision=fp32", "checkpoint.enabled=true",
           f"checkpoint.save_interval={interval}", "resilience.max_restarts=1", "monitoring.prometheus=false",
           "cluster.price_per_node_hour=10", "monitoring.plan.window_steps=10"]
    env = fault_env("slow:rank=*,factor=6")  # ~0.3 s steps: long enough for second-resolution ETAs
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Timed(proc)
    try:
        out.wait_for(r"^step=25/", timeout=240)  # the step-20 checkpoint was taken at step 20
        killed = time.time()
        last_before_kill = max(int(m.group(1)) for _, ln in out.lines if (m := re.match(r"^step=(\d+)/", ln)))
        pids = _trainer_pids(proc.pid)
        assert pids, "no trainer process found under the launcher"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # as a crashed process: nothing is saved on the way out
        assert proc.wait(timeout=300) == 0, out.text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out.thread.join(timeout=10)
    ended = time.time()
    log = out.text()
    run = only_run(tmp_path / "runs")
    resumed = re.search(r"checkpoint: resumed from \S+ \(step_(\d+)", log)
    assert resumed, log[-4000:]
    resumed_step = int(resumed.group(1))
    assert resumed_step in (20, 30) and resumed_step <= last_before_kill

    ledger = json.loads((run / "goodput.json").read_text())
    parts = ledger["seconds"]
    assert ledger["attempts"] == 2
    # the redone steps: everything the first attempt trained after the step it resumed from (the steps
    # printed before the kill, and possibly one or two in flight that the log line had not shown yet)
    assert last_before_kill - resumed_step <= ledger["redone_steps"] <= last_before_kill - resumed_step + 2
    wall = ledger["last_update"] - ledger["first_start"]
    assert abs(sum(parts.values()) - wall) < 0.5, (parts, wall)  # the parts add up to the wall time
    # ... which is the wall time an outside clock saw: from the launch (minus the launcher's own start-up,
    # before the first trainer process) to the end (minus the launcher's exit after the last save)
    assert launched <= ledger["first_start"] <= launched + 30 and ended - 15 <= ledger["last_update"] <= ended
    assert parts["restarts"] >= 0.5 and parts["productive"] > 0 and parts["startup"] > 0
    restart = ledger["restarts"][0]
    assert restart["redone_steps"] == ledger["redone_steps"] and restart["resumed_step"] == resumed_step
    assert restart["down_s"] + restart["reload_s"] >= 0.5
    line = next(ln for _, ln in out.lines if ln.startswith("restart: attempt 2 resumed after step"))
    assert f"redone {ledger['redone_steps']} steps" in line and "reload" in line and "down" in line

    # the ETA over the second half of the run: the predicted end within 10% of the run's wall time
    # (first start to the last step, the restart included)
    lines = [(t, STEP_LINE.match(ln)) for t, ln in out.lines]
    timed = [(t, int(m.group(1)), metrics.parse_duration(m.group(3)), metrics.parse_duration(m.group(4)))
             for t, m in lines if m]
    end = max(t for t, step, _, _ in timed if step == steps)
    duration = end - ledger["first_start"]
    late = [(t, step, eta) for t, step, eta, _ in timed if step > steps // 2 and t > killed]
    errors = [abs(t + eta - end) for t, step, eta in late]
    print(f"ETA over the last half: {len(errors)} lines, max error {max(errors):.2f} s of a {duration:.1f} s run; "
          f"ledger {json.dumps({k: round(v, 2) for k, v in parts.items()})}, redone {ledger['redone_steps']}")
    assert late and max(errors) <= 0.10 * duration, errors
    # the elapsed time on the step lines counts from the first attempt's start, restarts included
    final_elapsed = next(el for t, step, _, el in timed if step == steps)
    assert abs(final_elapsed - (end - ledger["first_start"])) <= 2.0

    status = subprocess.run([sys.executable, "-m", "launcher", "status", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "over 2 attempt(s)" in status.stdout and f"restart 2: after step {resumed_step}" in status.stdout
    assert re.search(r"cost \$\d+\.\d\d so far", status.stdout) and "plan: step time" in status.stdout
    as_json = json.loads(subprocess.run([sys.executable, "-m", "launcher", "status", str(run), "--json"], cwd=ROOT,
                                        capture_output=True, text=True, timeout=60).stdout)
    assert as_json["goodput"]["attempts"] == 2 and as_json["goodput"]["fraction"] == 1.0


def test_slow_data_is_named_as_the_cause_of_plan_drift(tmp_path: Path) -> None:
    """A loader that takes 60 ms per sample (4 per step): the plan check says the run drifts and why."""
    proc = subprocess.run([sys.executable, "-m", "launcher", "config=tiny_local", f"runs_root={tmp_path}",
                           "training.train_steps=16", "monitoring.plan.warmup_steps=2", "monitoring.plan.window_steps=6",
                           "monitoring.straggler.enabled=true"], cwd=ROOT, env=fault_env("dataslow:seconds=0.06"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    plan = [ln for ln in proc.stdout.splitlines() if ln.startswith("plan: step time")]
    assert plan and "DRIFT: likely data-wait dominated: ranks wait" in plan[0], plan
    share = int(re.search(r"ranks wait (\d+)% of each step", plan[0]).group(1))  # type: ignore[union-attr]
    assert 50 <= share <= 100  # 0.24 s of waiting in a step of ~0.3 s
    assert "monitoring: [WARN] Plan drift: run" in proc.stdout  # the alert (W&B and the console)
    assert "milestone: 50% of the tokens (4,096 of 8,192)" in proc.stdout
    ledger = json.loads((only_run(tmp_path) / "goodput.json").read_text())
    assert ledger["seconds"]["data_wait"] > 16 * 4 * 0.06 * 0.9 and ledger["plan"]["drift"] is True

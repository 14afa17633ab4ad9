"""The hang watchdog's decision (pure, with synthetic heartbeats) and a real hang on this machine:
detected within the bound, stacks dumped, the worker group restarted by torchrun inside the run,
training resumed from the last commit with the uninterrupted run's losses."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from cluster.heartbeat import Beat
from cluster.watchdog import Limits, StepClock, verdict, waiting_in_collective
from tests.e2e import launcher, losses, only_run
from tests.faults import fault_env

LIMITS = Limits(step_factor=10.0, floor_s=5.0, startup_s=60.0)


def beat(rank: int, step: int, phase: str, t: float, host: str = "n1") -> Beat:
    return Beat(rank, rank, host, 1000 + rank, step, phase, t, "0.0")


def test_no_hang_while_ranks_progress_and_a_hang_names_the_laggard() -> None:
    clock = StepClock()
    for s in range(1, 6):
        clock.observe([beat(0, s, "step_end", 100.0 + s)])
    assert clock.median() == pytest.approx(1.0)
    beats = [beat(0, 6, "step", 106.0), beat(1, 5, "step_end", 105.0), beat(2, 6, "step", 106.0)]
    assert verdict(beats, 110.9, clock, LIMITS) is None  # allowance max(10 x 1 s, 5 s) = 10 s
    hang = verdict(beats, 116.5, clock, LIMITS)
    assert hang is not None and hang.laggards == [(1, "n1")] and hang.step == 5 and hang.phase == "step_end"
    assert "rank 1 on n1 stopped in step 5" in hang.describe()


def test_long_phases_get_the_startup_allowance_and_export_is_never_a_hang() -> None:
    clock = StepClock()
    for s in range(1, 4):
        clock.observe([beat(0, s, "step_end", float(s))])
    saving = [beat(0, 3, "checkpoint", 3.0), beat(1, 3, "checkpoint", 3.0)]
    assert verdict(saving, 50.0, clock, LIMITS) is None and verdict(saving, 64.0, clock, LIMITS) is not None
    assert verdict([beat(0, 9, "export", 0.0), beat(1, 9, "finished", 0.0)], 1e9, clock, LIMITS) is None
    assert verdict([beat(0, 2, "startup", 0.0)], 59.0, StepClock(), LIMITS) is None  # no median yet


def test_a_hang_after_the_first_steps_gets_the_floor_even_without_a_median() -> None:
    """Short steps and a checkpoint between two polls: no two step boundaries timed yet, but steps have
    completed, so the floor applies, not the start-up allowance (found by benchmarks/recovery_time.py:
    one hang in eight took 120 s to detect instead of ~6 s)."""
    hung = [beat(0, 16, "step", 100.0), beat(1, 16, "step", 100.0)]
    hang = verdict(hung, 105.5, StepClock(), LIMITS)
    assert hang is not None and hang.allowance_s == LIMITS.floor_s
    first = [beat(0, 1, "step", 100.0), beat(1, 1, "step", 100.0)]  # the first step may compile: start-up
    assert verdict(first, 159.0, StepClock(), LIMITS) is None and verdict(first, 161.0, StepClock(), LIMITS)


def test_no_false_alarm_in_a_long_noisy_healthy_run() -> None:
    """20,000 steps with log-normal step times (and a slow checkpoint every 500): never a hang."""
    rng = random.Random(7)
    clock, t = StepClock(), 0.0
    for s in range(1, 20001):
        duration = rng.lognormvariate(0.0, 0.35) * (1.0 if s % 500 else 3.0)
        for probe in (t + duration * 0.5, t + duration):  # the watchdog looks mid-step and at the end
            beats = [beat(0, s - 1, "step_end", t), beat(1, s, "step", t)]
            assert verdict(beats, probe, clock, LIMITS) is None, (s, duration)
        t += duration
        clock.observe([beat(0, s, "step_end", t)])


def test_stacks_tell_waiting_ranks_from_the_stuck_one() -> None:
    assert waiting_in_collective("Thread 1 (idle): all_reduce (torch/distributed/distributed_c10d.py:2810)")
    assert not waiting_in_collective("Thread 1 (active): _after (tests/faults.py:101)\n  sleep")


@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_hung_rank_is_detected_and_the_job_restarts_in_place(tmp_path: Path) -> None:
    common = ["cluster.gpus_per_node=2", "training.train_steps=10", "training.precision=fp32",
              "checkpoint.enabled=true", "checkpoint.save_interval=2", "monitoring.prometheus=false"]
    clean = launcher("config=tiny_local", f"runs_root={tmp_path / 'clean'}", *common, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = losses((only_run(tmp_path / "clean") / "logs" / "local.out").read_text())
    proc = launcher("config=tiny_local", f"runs_root={tmp_path / 'hang'}", *common, "resilience.max_restarts=1",
                    "resilience.floor_s=6", "resilience.startup_s=120", "resilience.poll_s=1",
                    env=fault_env("hang:rank=1,step=6"), timeout=360)
    run = only_run(tmp_path / "hang")
    log = (run / "logs" / "local.out").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "watchdog: HANG:" in log and "rank 1 on" in log
    events = list((run / "hangs").glob("attempt-*.json"))
    assert len(events) == 1
    event = json.loads(events[0].read_text())
    assert event["laggards"][0][0] == 1 or [1, event["laggards"][0][1]] in event["suspects"]
    assert event["detected"] - event["last_progress"] < 6 + 3 * 1 + 5  # the bound: floor + a few polls
    dump = next((run / "hangs").glob("*.txt")).read_text()
    assert "=== rank 1" in dump and "faults.py" in dump  # py-spy shows where the rank is stuck
    assert "checkpoint: resumed from" in log
    # what the restart cost: a log line, the ledger (and from there a metric and an alert)
    restart = json.loads((run / "goodput.json").read_text())["restarts"][0]
    assert restart["detection_s"] == pytest.approx(event["detected"] - event["last_progress"], abs=0.01)
    assert restart["lost_s"] >= restart["detection_s"] + restart["reload_s"]
    assert re.search(r"^restart: attempt 2 resumed after step \d+ \(hang: rank 1 on \S+ stopped in step 6 "
                     r"\(step\)\): lost [\d.]+ s = detection [\d.]+ s \+ down", log, re.M), log[-3000:]
    got = losses(log)  # steps 1..5 of the first attempt, then the restart from the last commit
    by_step: dict[int, float] = {}
    for line in log.splitlines():
        if line.startswith("step="):
            step = int(line.split("/")[0].removeprefix("step="))
            by_step[step] = losses(line)[0]
    assert [by_step[s] for s in range(1, 11)] == pytest.approx(reference, abs=2e-4), (got, reference)

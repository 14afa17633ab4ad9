"""Plans that include failures: the Llama 3 rate, expected vs ideal duration, Young's checkpoint interval."""

from __future__ import annotations

import json
import math

import pytest

from memory_predictor import constants as C
from memory_predictor.cli import main
from memory_predictor.errors import PredictorError
from memory_predictor.failures import FailureModel, expected_factor, mtbf_s, young_interval_s
from memory_predictor.plan import MILESTONES, make_plan

P5 = dict(global_batch=1024, seq_length=8192, nodes=32, gpus_per_node=8)  # 256 GPUs


def test_default_rate_is_llama3_unexpected_interruptions_as_published() -> None:
    # 419 unexpected of 466 interruptions, 54 days, 16,384 GPUs (Dubey et al. 2024, section 3.3.4)
    assert C.FAILURES_PER_GPU_HOUR == pytest.approx(419 / (16384 * 54 * 24))
    assert mtbf_s(C.FAILURES_PER_GPU_HOUR, 16384) / 3600 == pytest.approx(54 * 24 / 419)  # ~3.1 h on 16K GPUs
    assert mtbf_s(C.FAILURES_PER_GPU_HOUR, 256) / 86400 == pytest.approx(8.25, rel=0.01)  # ~8 days on 256
    assert mtbf_s(0.0, 256) == math.inf


@pytest.mark.parametrize("stall,mtbf", [(30.0, 198 * 3600.0), (5.0, 3 * 3600.0), (120.0, 3600.0 * 24)])
def test_young_interval_minimises_expected_lost_time(stall: float, mtbf: float) -> None:
    """Lost time per unit of work, stall / tau + tau / (2 MTBF), is smallest at sqrt(2 stall MTBF)."""
    def lost(tau: float) -> float:
        return stall / tau + tau / (2 * mtbf)

    tau = young_interval_s(stall, mtbf)
    assert tau == pytest.approx(math.sqrt(2 * stall * mtbf))
    grid = [tau * f for f in (0.25, 0.5, 0.8, 0.95, 1.05, 1.25, 2, 4)]
    assert all(lost(tau) < lost(t) for t in grid)


def test_plan_suggests_young_interval_and_it_beats_shorter_and_longer_ones() -> None:
    step = 30.0
    plan = make_plan(step_time_s=step, tokens=314 * 10**9, **P5)
    it = plan.interruptions
    assert it.mtbf_hours is not None and it.suggested_interval_steps is not None
    assert it.suggested_interval_s == pytest.approx(math.sqrt(2 * C.CHECKPOINT_STALL_S * it.mtbf_hours * 3600))
    assert it.suggested_interval_steps == round(it.suggested_interval_s / step)

    def expected(interval: int) -> float:
        return make_plan(step_time_s=step, tokens=314 * 10**9, checkpoint_interval_steps=interval, **P5).expected_s

    best = expected(it.suggested_interval_steps)
    assert it.expected_s_at_suggested == pytest.approx(best)
    for factor in (0.25, 0.5, 2.0, 4.0):
        assert best < expected(max(1, round(it.suggested_interval_steps * factor)))


@pytest.mark.parametrize("rate", [C.FAILURES_PER_GPU_HOUR, 1e-4, 1e-3])
def test_expected_is_at_least_ideal_and_adds_up(rate: float) -> None:
    plan = make_plan(step_time_s=29.3, tokens=314 * 10**9, failures=FailureModel(failures_per_gpu_hour=rate), **P5)
    it = plan.interruptions
    assert plan.ideal_s == pytest.approx(plan.steps * 29.3)
    assert plan.ideal_s < plan.duration_s < plan.expected_s
    assert plan.duration_s == pytest.approx(plan.ideal_s + it.checkpoint_stalls_s + it.job_starts_s)
    # T = P + (T / MTBF) x cost per failure
    assert plan.expected_s == pytest.approx(plan.duration_s + plan.expected_s / (it.mtbf_hours * 3600)
                                            * it.cost_per_failure_s)
    assert it.expected_failures == pytest.approx(plan.expected_s / (it.mtbf_hours * 3600))
    assert it.cost_per_failure_s == pytest.approx(it.detection_s + it.restart_s + it.redo_s)
    assert it.redo_s == pytest.approx(plan.checkpoint_interval_steps * 29.3 / 2)  # half an interval
    assert it.detection_s == C.DETECTION_FLOOR_S  # max(10 x 29.3 s, 300 s): the hang watchdog's bound
    assert plan.expected_gpu_hours == pytest.approx(plan.expected_s / 3600 * 256)


def test_zero_failure_rate_means_expected_equals_ideal_plus_stalls() -> None:
    plan = make_plan(step_time_s=29.3, tokens=314 * 10**9, failures=FailureModel(failures_per_gpu_hour=0.0), **P5)
    it = plan.interruptions
    assert it.expected_failures == 0 and it.mtbf_hours is None and it.suggested_interval_steps is None
    assert plan.expected_s == plan.duration_s == pytest.approx(plan.ideal_s + it.checkpoint_stalls_s + it.job_starts_s)
    # and with free restarts and saves, the ideal itself
    free = FailureModel(failures_per_gpu_hour=0.0, restart_s=0.0, checkpoint_stall_s=0.0)
    assert make_plan(step_time_s=29.3, tokens=314 * 10**9, failures=free, **P5).expected_s == pytest.approx(plan.ideal_s)


def test_milestones_are_in_order_and_end_at_the_plan() -> None:
    plan = make_plan(step_time_s=29.3, tokens=314 * 10**9, price_per_node_hour=55.0, **P5)
    ms = plan.milestones
    assert [m.fraction for m in ms] == list(MILESTONES)
    for a, b in zip(ms, ms[1:]):
        assert a.step < b.step and a.ideal_hours < b.ideal_hours and a.planned_hours < b.planned_hours
    for m in ms:
        assert m.ideal_hours <= m.planned_hours <= m.expected_hours
    assert ms[-1].step == plan.steps
    assert ms[-1].planned_hours * 3600 == pytest.approx(plan.duration_s)
    assert ms[-1].expected_hours * 3600 == pytest.approx(plan.expected_s)
    assert plan.expected_cost == pytest.approx(plan.expected_s / 3600 * 32 * 55.0)


def test_failures_faster_than_recovery_are_refused_and_bad_values_named() -> None:
    with pytest.raises(PredictorError, match="never finishes"):
        make_plan(step_time_s=30.0, steps=1000, failures=FailureModel(failures_per_gpu_hour=0.01), **P5)
    with pytest.raises(PredictorError) as info:
        make_plan(step_time_s=30.0, steps=1000, failures=FailureModel(failures_per_gpu_hour=-1, restart_s=math.nan), **P5)
    assert {p.field for p in info.value.problems} == {"failures_per_gpu_hour", "restart_s"}
    assert expected_factor(10.0, 5.0) == math.inf


def test_plan_cli_reports_ideal_and_expected(capsys) -> None:
    args = ["plan", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--nodes", "32", "--seq", "8192", "--gbs", "1024",
            "--tokens", "314B", "--json"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ideal_days"] < d["duration_days"] < d["expected_days"]
    assert d["interruptions"]["failures_per_gpu_hour"] == pytest.approx(C.FAILURES_PER_GPU_HOUR)
    assert len(d["milestones"]) == 6 and d["interruptions"]["suggested_interval_steps"] > 0
    assert main([*args, "--failures-per-gpu-hour", "0", "--checkpoint-stall-s", "0", "--restart-s", "0"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero["expected_s"] == pytest.approx(zero["ideal_s"])
    assert main([*args, "--failures-per-gpu-hour", "1"]) == 2
    assert "never finishes" in capsys.readouterr().err

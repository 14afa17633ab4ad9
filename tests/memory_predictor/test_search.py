"""Layout enumeration, the safety rule, ranking, throughput sanity, and the time-to-train plan."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memory_predictor import constants as C
from memory_predictor.models import load_model
from memory_predictor.plan import make_plan
from memory_predictor.search import enumerate_layouts, evaluate, heatmap_rows, search
from memory_predictor.spec import Layout, Options, TrainSpec, hardware, layout_problems

L8, L70, TINY = (load_model(n) for n in ("llama3.1_8b", "llama3.3_70b", "tiny"))
P5_32 = hardware("h100-80gb", nodes=32)


def test_every_enumerated_layout_is_valid() -> None:
    seen = set()
    for layout, train in enumerate_layouts(L70, 8192, 1024, P5_32):
        assert layout_problems(L70, train, layout, P5_32) == []
        assert layout.tp <= 8 and layout.world == 256 and layout.sp == (layout.tp > 1)
        seen.add((layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp))
    assert {(8, 4, 5, 1, 8), (4, 4, 5, 2, 8), (8, 1, 1, 1, 32), (1, 8, 1, 1, 32)} <= seen
    assert all(tp in (1, 2, 4, 8) for tp, *_ in seen)


def test_enumeration_covers_options_and_cpu_rules() -> None:
    items = list(enumerate_layouts(TINY, 64, 8, hardware("cpu", gpus_per_node=2), cpu_trainer=True))
    assert {lay.recompute for lay, _ in items} == {"none", "selective", "full"}
    assert {lay.distributed_optimizer for lay, _ in items} == {True, False}
    assert all(lay.cp == 1 for lay, _ in items)  # no Transformer Engine on CPU
    assert {t.micro_batch_size for _, t in items} >= {1, 2, 4}
    # the plain optimizer is only enumerated where it differs (DP x CP > 1)
    assert all(lay.distributed_optimizer or lay.dp * lay.cp > 1 for lay, _ in items)


def test_search_keeps_only_what_fits_and_ranks_by_throughput() -> None:
    result = search(L70, 8192, 1024, P5_32, Options())
    assert result.ranked and result.rejected_memory > 0
    assert result.evaluated == len(result.ranked) + result.rejected_memory
    speeds = [c.step.tokens_per_s for c in result.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert all(c.peak_bytes <= result.usable_bytes == int(80 * C.GIB * C.DEFAULT_USABLE_FRACTION) for c in result.ranked)
    distinct = result.distinct(5)
    assert len({c.key() for c in distinct}) == 5 and distinct[0] is result.best


def test_usable_fraction_is_the_safety_rule() -> None:
    strict = search(L70, 8192, 1024, P5_32, Options(usable_fraction=0.6))
    loose = search(L70, 8192, 1024, P5_32, Options(usable_fraction=0.95))
    assert len(strict.ranked) < len(loose.ranked)
    assert max(c.peak_bytes for c in strict.ranked) <= 0.6 * 80 * C.GIB


def test_70b_on_32_p5_is_sane() -> None:
    """The public reference deployment (TP8 PP4 VPP5, selective recompute) fits; MFU in the published range."""
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=1024)
    report, step = evaluate(L70, train, Layout(tp=8, pp=4, vpp=5, dp=8, recompute="selective"), Options(), P5_32)
    assert report.fits and report.peak.stage == "first" and 45 * C.GIB < report.peak_bytes < 68 * C.GIB
    assert 0.35 < step.mfu < 0.5
    best = search(L70, 8192, 1024, P5_32, Options()).best
    assert best is not None and 0.35 < best.step.mfu < 0.55 and best.step.tokens_per_s >= step.tokens_per_s


def test_more_nodes_more_throughput_below_linear() -> None:
    speeds = {n: search(L70, 8192, 1024, hardware("h100-80gb", nodes=n), Options()).best.step.tokens_per_s
              for n in (16, 32, 64)}
    assert speeds[16] < speeds[32] < speeds[64] < 4 * speeds[16]


def test_throughput_parts_respond_to_the_layout() -> None:
    train = TrainSpec(seq_length=8192, micro_batch_size=1, global_batch_size=1024)
    _, tp8 = evaluate(L70, train, Layout(tp=8, pp=4, dp=8), Options(), P5_32)
    _, overlap = evaluate(L70, train, Layout(tp=8, pp=4, dp=8), Options(tp_comm_overlap=True), P5_32)
    _, interleaved = evaluate(L70, train, Layout(tp=8, pp=4, vpp=5, dp=8), Options(), P5_32)
    _, full = evaluate(L70, train, Layout(tp=8, pp=4, dp=8, recompute="full"), Options(), P5_32)
    assert overlap.tp_comm_s < tp8.tp_comm_s and overlap.step_time_s < tp8.step_time_s
    assert interleaved.bubble_s == pytest.approx(tp8.bubble_s / 5, rel=0.01)
    assert full.compute_s > tp8.compute_s * 1.25 and full.tflops_per_gpu < tp8.tflops_per_gpu
    # model FLOPs, as the trainer logs them: recompute never inflates tflops_per_gpu
    assert tp8.tflops_per_gpu * tp8.step_time_s == pytest.approx(full.tflops_per_gpu * full.step_time_s)


def test_heatmap_rows() -> None:
    result = search(L8, 8192, 64, hardware("h100-80gb", nodes=1), Options())
    rows = heatmap_rows(L8, result, Options(), hardware("h100-80gb", nodes=1), rows=5, micro_batches=(1, 2, 4, 8))
    assert len(rows) == 5 and all(len(fractions) == 4 for _, fractions in rows)
    first = [f for f in rows[0][1] if f is not None]
    assert first == sorted(first)  # more memory with a larger micro batch


def test_plan_splits_into_jobs_with_checkpoints() -> None:
    plan = make_plan(step_time_s=30.0, global_batch=1024, seq_length=8192, nodes=32, gpus_per_node=8,
                     tokens=10**12, price_per_node_hour=100.0, checkpoint_interval_steps=500, job_hours=48)
    assert plan.steps == -(-10**12 // (1024 * 8192))
    assert sum(p.last_step - p.first_step + 1 for p in plan.phases) == plan.steps
    assert all(p.duration_hours <= 48 for p in plan.phases) and len(plan.phases) > 1
    assert plan.phases[1].start_hours == pytest.approx(plan.phases[0].duration_hours)
    saves = [s for p in plan.phases for s in p.checkpoint_steps]
    assert all(s % 500 == 0 or s == p.last_step for p in plan.phases for s in p.checkpoint_steps)
    assert len(saves) >= plan.steps // 500
    overhead = len(plan.phases) * C.RESTART_OVERHEAD_S + len(saves) * C.CHECKPOINT_STALL_S
    assert plan.duration_s == pytest.approx(plan.steps * 30.0 + overhead)
    assert plan.gpu_hours == pytest.approx(plan.duration_s / 3600 * 256)
    assert plan.cost == pytest.approx(plan.node_hours * 100.0)
    assert make_plan(step_time_s=30.0, global_batch=8, seq_length=8, nodes=1, gpus_per_node=8, steps=10).cost is None


def test_tiny_on_cpu_predicts_process_memory() -> None:
    """CPU (gloo) runs: a runtime base instead of CUDA context / NCCL; nothing is checked against RAM."""
    hw = hardware("cpu", gpus_per_node=2)
    train = TrainSpec(seq_length=64, micro_batch_size=2, global_batch_size=8)
    report, step = evaluate(TINY, train, Layout(tp=2, dp=1), Options.cpu_trainer(precision="fp32"), hw)
    assert report.fits and report.usable_bytes == 0
    assert report.peak.cuda_context == C.CPU_PROCESS_BASE_BYTES and report.peak.nccl == 0
    assert step.mfu is None and step.tokens_per_s > 0
    assert replace(report.peak, cuda_context=0).total < 10 * 2**20  # the tiny model itself is a few MB

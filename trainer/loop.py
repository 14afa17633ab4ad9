"""The training loop: set up, then one optimizer step per global batch, one log line per step."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from configs.hardware import gpu_type
from cluster.heartbeat import HeartbeatWriter
from configs.errors import ConfigError, Problem
from configs.schema import RootConfig
from configs.derived import padded_vocab_size, train_steps
from memory_predictor import flops
from trainer import control, metrics
from trainer.callbacks import CallbackFactory, StepReport, TrainState, no_callbacks
from trainer.data import build_source, build_validation, microbatches
from trainer.distributed import Layout, init_distributed, shutdown
from trainer.evaluation import evaluate
from trainer.model import build_model, runtime_kernels, transformer_config
from trainer.optim import build_lr_schedule, build_optimizer
from trainer.step import forward_step as _forward_step
from trainer.step import global_mean_loss
from trainer.timing import StepTimer
from trainer.tracker import RunTracker


@dataclass(frozen=True)
class TrainResult:
    steps: int
    losses: list[float]  # global mean loss of every step (the same on every rank)


def train(cfg: RootConfig, make_callbacks: CallbackFactory = no_callbacks) -> TrainResult:
    """Train ``configs.derived.train_steps(cfg)`` steps; rank 0 prints one line per step.

    ``make_callbacks(cfg, layout)`` builds the plugins (checkpointing first: it may resume)."""
    t, m, par = cfg.training, cfg.model, cfg.parallelism
    layout = init_distributed(par, t.seed, cfg.resilience.collective_timeout_s)
    run_dir = os.environ.get("HYPERLAUNCH_RUN_DIR")
    device = torch.device("cpu") if layout.gloo else torch.device("cuda", layout.local_rank)
    total_steps = train_steps(cfg)
    tracker = RunTracker(cfg, layout.rank, layout.world_size, total_steps, run_dir,  # reads the last attempt's beats
                         gather=_gather(device) if layout.world_size > 1 else None, cuda=not layout.gloo)
    heartbeat = HeartbeatWriter(run_dir, layout.rank, layout.local_rank)
    heartbeat.beat(0, "startup")

    kernels = runtime_kernels(cfg.cluster.gpu_type, layout.gloo, cfg.cluster.transformer_engine)
    config = transformer_config(m, par, t.precision, gloo=layout.gloo, kernels=kernels)
    packed = t.data.source == "sft" and t.data.pack_sequences
    packed_thd = packed and kernels.transformer_engine
    if packed_thd and t.micro_batch_size != 1:
        raise ConfigError([Problem("training.micro_batch_size", t.micro_batch_size, "packed SFT sequences with "
                                   "Transformer Engine (THD format) take one packed sequence per micro-batch: set it "
                                   "to 1 (raise training.seq_length to pack more)")])
    model = build_model(m, par, config, seed=t.seed, packed_positions=packed and not packed_thd, kernels=kernels)
    optimizer = build_optimizer(model, t, par)
    lr_schedule = build_lr_schedule(optimizer, t, total_steps)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if par.overlap_grad_reduce:  # as megatron-lm: reduce once per step, started per chunk
        no_sync = [chunk.no_sync for chunk in model]
        grad_sync = [chunk.start_grad_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync

    source = build_source(t, m.vocab_size, total_steps)
    validation = build_validation(t, m.vocab_size) if t.eval_interval else {}
    forward_backward = get_forward_backward_func()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * layout.dp_size)
    flops_per_step = flops.model_flops_per_step(flops.FlopsShape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by),
        seq_length=t.seq_length, kv_channels=m.head_dim), t.global_batch_size)
    peak_tflops = gpu_type(cfg.cluster.gpu_type).peak_bf16_tflops
    timer = StepTimer(cuda=not layout.gloo)
    forward_step = partial(_forward_step, device=device, timer=timer, packed_thd=packed_thd)
    state = TrainState(cfg=cfg, layout=layout, model=model, optimizer=optimizer, lr_schedule=lr_schedule,
                       total_steps=total_steps, heartbeat=heartbeat, on_phase=tracker.phase)
    state.extra["source"] = source
    state.extra["validation"] = validation
    state.extra["tracker"] = tracker
    callbacks = make_callbacks(cfg, layout)
    state.beat("resume")
    for callback in callbacks:
        callback.on_train_start(state)  # a checkpoint callback may resume: state.step > 0
    state.beat("step_end")
    tracker.started(state.step)

    if layout.rank == 0:
        vpp = par.vpp if par.vpp and par.vpp > 1 else 1
        print(f"layout: world={layout.world_size} tp={par.tp} pp={par.pp} vpp={vpp} cp={par.cp} dp={layout.dp_size} "
              f"sp={par.sequence_parallel} backend={layout.backend} micro_batches={num_microbatches} "
              f"steps={total_steps} start_step={state.step + 1}", flush=True)
        print(f"kernels: {kernels.reason} (te={kernels.transformer_engine} flash={kernels.flash_attention} "
              f"swiglu={kernels.fused_swiglu} rope={kernels.rope_fusion} "
              f"wgrad_fusion={kernels.gradient_accumulation_fusion} ce_fusion={kernels.cross_entropy_fusion})", flush=True)

    losses: list[float] = []
    try:
        finished = _run_steps(state, callbacks, timer, forward_step, forward_backward, num_microbatches,
                              flops_per_step, peak_tflops, losses)
    except BaseException as exc:
        tracker.finish(error=exc)
        for callback in callbacks:
            callback.on_train_end(state, finished=False, error=exc)
        raise
    for callback in callbacks:
        callback.on_train_end(state, finished=finished)
    state.beat("finished")
    tracker.finish()
    summary = tracker.summary_line()
    if summary:
        print(summary, flush=True)
    if par.overlap_param_gather and par.distributed_optimizer:
        for chunk in model:  # the last update is otherwise gathered by the next forward only
            chunk.start_param_sync(force_sync=True)
    _report_peak_memory(layout, device)
    if layout.rank == 0 and finished:
        print(metrics.format_final_line(total_steps, losses[-1] if losses else float("nan")), flush=True)
        control.mark_finished()
    shutdown()
    for callback in callbacks:
        callback.after_shutdown(state, finished=finished)
    return TrainResult(steps=len(losses), losses=losses)


def _gather(device: torch.device) -> Callable[[list[float]], list[list[float]]]:
    """All-gather one row of floats per rank (the plan check's one exchange per window)."""

    def gather(row: list[float]) -> list[list[float]]:
        mine = torch.tensor(row, dtype=torch.float64, device=device)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu().tolist()

    return gather


def _report_peak_memory(layout: Layout, device: torch.device) -> None:
    """Rank 0 prints the largest per-rank peak: CUDA allocator peaks, or max RSS on CPU."""
    if layout.gloo:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        peaks = torch.tensor([rss, rss], dtype=torch.float64, device=device)
        kind = "cpu_max_rss"
    else:
        peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()],
                             dtype=torch.float64, device=device)
        kind = "cuda"
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    if layout.rank == 0:
        print(f"memory: kind={kind} max_peak_allocated_bytes={int(peaks[0])} max_peak_reserved_bytes={int(peaks[1])}",
              flush=True)


def _run_steps(state: TrainState, callbacks: list, timer: StepTimer, forward_step: Callable[..., Any],
               forward_backward: Callable[..., Any], num_microbatches: int, flops_per_step: float,
               peak_tflops: float | None, losses: list[float]) -> bool:
    """Train from state.step + 1; True when all steps ran, False when a stop was requested."""
    cfg, layout, model, optimizer, lr_schedule = state.cfg, state.layout, state.model, state.optimizer, state.lr_schedule
    t, total_steps = cfg.training, state.total_steps
    tracker: RunTracker = state.extra["tracker"]
    device = torch.device("cpu") if layout.gloo else torch.device("cuda", layout.local_rank)
    source = state.extra["source"]
    for step in range(state.step + 1, total_steps + 1):
        state.beat("step", step)
        start = time.perf_counter()
        timer.reset()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        # one iterator per model chunk: the first and last virtual stages both read the batch
        iterators = [microbatches(source, t, step - 1, layout.dp_rank, layout.dp_size) for _ in model]
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model,
            num_microbatches=num_microbatches,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        lr_schedule.step(increment=1)  # step k trains with lr(k); see build_lr_schedule
        lr = float(optimizer.param_groups[0]["lr"])
        _, grad_norm, _ = optimizer.step()
        loss, _ = global_mean_loss(reduced, layout, device)
        if not layout.gloo:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(loss)
        state.step = step
        state.beat("step_end")

        achieved = flops.tflops_per_gpu(flops_per_step, elapsed, layout.world_size)
        compute_s = timer.compute_s()
        run, notices = tracker.step(step, elapsed, timer.data_wait_s, compute_s)
        report = StepReport(
            step=step, total_steps=total_steps, loss=loss, grad_norm=None if grad_norm is None else float(grad_norm),
            lr=lr, step_time_s=elapsed, tokens_per_s=t.global_batch_size * t.seq_length / elapsed,
            tflops_per_gpu=achieved, mfu_percent=flops.mfu_percent(achieved, peak_tflops),
            compute_s=compute_s, data_wait_s=timer.data_wait_s, run=run, notices=notices)
        if layout.rank == 0 and (step % t.log_interval == 0 or step == total_steps):
            print(metrics.format_step_line(metrics.StepMetrics(
                step=step, total_steps=total_steps, loss=loss, grad_norm=report.grad_norm, lr=lr,
                step_time_s=elapsed, tokens_per_s=report.tokens_per_s, tflops_per_gpu=achieved,
                mfu_percent=report.mfu_percent, tokens_done=run.tokens_done if run else None,
                tokens_total=run.tokens_total if run else None, eta_s=run.eta_s if run else None,
                elapsed_s=run.elapsed_s if run else None)), flush=True)
        for callback in callbacks:
            callback.on_step_end(state, report)
        validation = state.extra.get("validation")
        if validation and (step % t.eval_interval == 0 or step == total_steps):
            state.beat("validation")
            result = evaluate(state, validation, forward_backward, forward_step, num_microbatches)
            state.beat("step_end")
            if layout.rank == 0:
                print(result.line(), flush=True)
            for callback in callbacks:
                callback.on_validation(state, result)
        if step < total_steps and control.stop_requested(device):
            if layout.rank == 0:
                print(f"stop requested (control file): stopping after step {step}/{total_steps}", flush=True)
            return False
    return True

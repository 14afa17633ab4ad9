"""Training blocking time of a synchronous vs an asynchronous checkpoint save of the same state.

    python benchmarks/checkpoint_async.py [--repeats 5] [--size-gb 1.2] [--dir /tmp]

The state is a real one: the trainer builds a bf16 Llama-style megatron-core GPT with the
distributed optimizer (one gloo process, as ``python -m trainer`` on CPU) and runs one optimizer
step, so Adam's moments exist. The number of layers is chosen so that what is saved (bf16
weights + fp32 main weights + Adam m and v, ~14 bytes per parameter) reaches ``--size-gb``.

Each save goes through the trainer's own ``CheckpointCallback._save`` (what the training loop
calls every ``save_interval`` steps), timed around the call, because that is what the loop waits
for: the parameter all-gather when parameters are sharded, building the sharded state dict (the
periodic ``dp_reshardable`` optimizer format of ``checkpoint.optimizer_format=auto``), then

* sync (``async_save=false``): planning, writing, fsync and commit;
* async: planning and staging into host buffers only. The save is then completed outside the
  timed region (reported as "background").

Saves go through the real CheckpointWriter and CheckpointStore into a temporary directory,
alternating sync/async (ABBA order, so drift and noise hit both alike), after one untimed warm-up
save (megatron's first-save planning and access validation are cached afterwards). Every save
must commit and pass ``CheckpointStore.validate(checksums=True)``. The memcpy floor is a plain
``copy_`` of the same number of bytes between two preallocated, pre-faulted host buffers: the
physical lower bound of staging on CPU.

The last line is ``blocking_ratio=<sync median / async median>`` (target >= 10, aim 20).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 4, 16384
BYTES_PER_PARAM = 2 + 4 + 4 + 4  # bf16 weight, fp32 main weight, Adam exp_avg, exp_avg_sq


def layers_for(size_gb: float) -> int:
    """Transformer layers so that the saved state is at least ``size_gb`` (10^9 bytes)."""
    per_layer = HIDDEN * (HIDDEN + 2 * HIDDEN * KV_HEADS // HEADS) + HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN
    embeddings = 2 * VOCAB * HIDDEN + HIDDEN  # untied input and output embeddings, final norm
    return max(1, math.ceil((size_gb * 1e9 / BYTES_PER_PARAM - embeddings) / per_layer))


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_state(num_layers: int, checkpoint_dir: str) -> Any:
    """The trainer's model, optimizer and schedule after one real training step (gloo, 1 rank)."""
    from hydra import compose, initialize_config_dir

    from configs.loading import to_root
    from configs.schema import register_configs

    overrides = [f"model.num_layers={num_layers}", f"model.hidden_size={HIDDEN}", f"model.ffn_hidden_size={FFN}",
                 f"model.num_attention_heads={HEADS}", f"model.num_query_groups={KV_HEADS}",
                 f"model.vocab_size={VOCAB}", "training.precision=bf16", "training.seq_length=64",
                 "training.global_batch_size=1", "training.micro_batch_size=1", "training.train_steps=1",
                 "checkpoint.enabled=true", "checkpoint.async_save=true", "checkpoint.resume=false",
                 f"checkpoint.dir={checkpoint_dir}"]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = to_root(compose("launcher", overrides=overrides))

    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from trainer import loop
    from trainer.callbacks import TrainState
    from trainer.data import build_source
    from trainer.distributed import init_distributed
    from trainer.model import build_model, transformer_config
    from trainer.optim import build_lr_schedule, build_optimizer
    from trainer.timing import StepTimer

    layout = init_distributed(cfg.parallelism, cfg.training.seed)
    config = transformer_config(cfg.model, cfg.parallelism, cfg.training.precision, gloo=layout.gloo)
    model = build_model(cfg.model, cfg.parallelism, config, seed=cfg.training.seed)
    optimizer = build_optimizer(model, cfg.training, cfg.parallelism)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    state = TrainState(cfg=cfg, layout=layout, model=model, optimizer=optimizer, total_steps=1,
                       lr_schedule=build_lr_schedule(optimizer, cfg.training, 1))
    state.extra["source"] = build_source(cfg.training, cfg.model.vocab_size, 1)
    timer = StepTimer(cuda=False)
    # the trainer's own step function (private, but a copy of the loop here would measure something else);
    # its step line goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        loop._run_steps(state, [], timer, partial(loop._forward_step, device=torch.device("cpu"), timer=timer),
                        get_forward_backward_func(), 1, 1.0, None, [])
    return state


@dataclass(frozen=True)
class Timing:
    blocking_s: float  # what the training loop waited for (wall clock around _save)
    reported_s: float  # what the checkpoint code itself reports as blocking (SaveOutcome.blocking_s)
    background_s: float  # async only: writing + commit after _save returned
    total_bytes: int
    optimizer_format: str


def timed_save(callback: Any, state: Any, step: int, *, blocking: bool, final: bool = False) -> Timing:
    """One save through the trainer's own CheckpointCallback._save (what the loop calls); verified, removed."""
    state.step = step
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its "committed" lines
        outcome = callback._save(state, blocking=blocking, final=final)
    t1 = time.perf_counter()
    if outcome is None:  # async: training would run while the background thread writes
        outcome = callback.writer.wait()
    t2 = time.perf_counter()
    if outcome is None or not outcome.committed:
        raise RuntimeError(f"step {step} did not commit: {outcome}")
    store = callback.store
    valid = store.validate(step, checksums=True)  # manifest, sizes and CRC-32 of every file
    if valid.manifest.total_bytes != outcome.total_bytes:
        raise RuntimeError(f"step {step}: the manifest lists {valid.manifest.total_bytes} bytes, the writer "
                           f"reported {outcome.total_bytes}")
    shutil.rmtree(store.path(step))
    return Timing(blocking_s=t1 - t0, reported_s=outcome.blocking_s, background_s=0.0 if blocking else t2 - t1,
                  total_bytes=outcome.total_bytes, optimizer_format=valid.manifest.optimizer_format)


def memcpy_floor(nbytes: int, repeats: int) -> list[float]:
    """Seconds of one ``copy_`` of ``nbytes`` into a preallocated, already-touched host buffer."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


def row(name: str, values: list[float]) -> str:
    return f"{name:44s} {statistics.median(values):9.3f} {min(values):8.3f} {max(values):8.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="saves of each kind (alternating)")
    parser.add_argument("--size-gb", type=float, default=1.2, help="minimum saved state, 10^9 bytes")
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint directory goes")
    args = parser.parse_args()

    from trainer import cpu_compat, megatron_noise

    megatron_noise.silence()
    if cpu_compat.activate():  # before megatron is imported, as in trainer.__main__
        megatron_noise.silence_cpu_only()
    from checkpointing.training import CheckpointCallback
    from trainer.distributed import shutdown

    layers = layers_for(args.size_gb)
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    t0 = time.perf_counter()
    state = build_state(layers, root)
    log(f"built the model ({layers} layers) and ran one training step in {time.perf_counter() - t0:.1f} s")
    callback = CheckpointCallback(state.cfg, state.layout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            callback.on_train_start(state)  # resume=false: sets up the writer, as in training
        warm = timed_save(callback, state, 1, blocking=False)
        log(f"warm-up save (first planning, not counted): blocked {warm.blocking_s:.2f} s, {warm.total_bytes} bytes")
        sync: list[Timing] = []
        asyn: list[Timing] = []
        step = 2
        for rep in range(args.repeats):
            for blocking in ((True, False) if rep % 2 == 0 else (False, True)):  # ABBA
                timing = timed_save(callback, state, step, blocking=blocking)
                (sync if blocking else asyn).append(timing)
                step += 1
                log(f"repeat {rep + 1}/{args.repeats} {'sync ' if blocking else 'async'}: blocked "
                    f"{timing.blocking_s:.3f} s (reported {timing.reported_s:.3f}, background {timing.background_s:.3f})")
        final = timed_save(callback, state, step, blocking=True, final=True)
        log(f"final save ({final.optimizer_format}): blocked {final.blocking_s:.3f} s")
        floor = memcpy_floor(warm.total_bytes, max(5, args.repeats))
    finally:
        if callback.writer is not None:
            callback.writer.close()
        shutil.rmtree(root, ignore_errors=True)
    shutdown()

    nbytes = warm.total_bytes
    print(f"state saved per checkpoint: {nbytes} bytes ({nbytes / 1e9:.3f} GB, {nbytes / 2**30:.3f} GiB); "
          f"{layers} layers, hidden {HIDDEN}, vocab {VOCAB}, bf16 + distributed Adam; {args.repeats} saves each; "
          f"periodic saves in the {sync[0].optimizer_format} optimizer format (checkpoint.optimizer_format=auto)")
    print(f"{'seconds':44s} {'median':>9s} {'min':>8s} {'max':>8s}")
    print(row("sync save: training blocked", [t.blocking_s for t in sync]))
    print(row("async save: training blocked", [t.blocking_s for t in asyn]))
    print(row("  as reported by the checkpoint code", [t.reported_s for t in asyn]))
    print(row("async save: background write + commit", [t.background_s for t in asyn]))
    print(row(f"final save ({final.optimizer_format}, sync, once)", [final.blocking_s]))
    print(row("memcpy floor (same bytes, preallocated)", floor))
    sync_med = statistics.median(t.blocking_s for t in sync)
    async_med = statistics.median(t.blocking_s for t in asyn)
    floor_med = statistics.median(floor)
    print(f"memcpy bandwidth {nbytes / floor_med / 1e9:.2f} GB/s; async blocking = {async_med / floor_med:.1f} x "
          f"the memcpy floor")
    print(f"blocking_ratio={sync_med / async_med:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

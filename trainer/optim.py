"""Adam (megatron's mixed-precision / distributed optimizer) and its LR schedule."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from configs.schema import ParallelismConfig, TrainingConfig

try:  # megatron-core >= 0.15: norms and biases skip weight decay through explicit overrides
    from megatron.core.optimizer import get_standard_config_overrides
except ImportError:  # pragma: no cover - older megatron-core applies the same rule itself
    get_standard_config_overrides = None  # type: ignore[assignment]


def build_optimizer(chunks: list[Any], training: TrainingConfig, par: ParallelismConfig) -> MegatronOptimizer:
    """Adam over all chunks; no weight decay on 1-D parameters (norms) and biases."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[training.precision]
    config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.precision == "bf16",
        fp16=training.precision == "fp16",
        params_dtype=dtype,
        use_distributed_optimizer=par.distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather and par.distributed_optimizer,
    )
    overrides = get_standard_config_overrides(config) if get_standard_config_overrides else None
    return get_megatron_optimizer(config, chunks, config_overrides=overrides)


def build_lr_schedule(optimizer: MegatronOptimizer, training: TrainingConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup from 0 over ``lr_warmup_steps``, then decay to ``min_lr`` at the last step.

    The loop advances the schedule *before* each optimizer step, so step k (1-based) uses
    lr(k): the first warmup step already trains, and the last step uses ``min_lr``.
    """
    warmup = min(training.lr_warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )

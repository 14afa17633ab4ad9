"""Validation: loss and perplexity per data source and overall, forward only.

Every pass reads the same held-out samples (the first ``eval_iters`` global batches of each
source's validation split), so successive values are comparable and a requeued run reports
the same curve. Validation never changes training: no gradients, no optimizer or data-position
change, and the RNG states are restored afterwards. With the distributed optimizer's overlapped
parameter all-gather, the forward pre-hooks are switched off (after a synchronous gather of the
last update) for the pass and back on afterwards, as Megatron-LM's ``evaluate`` does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.data import TokenSource, microbatches
from trainer.distributed import Layout
from trainer.step import global_mean_loss


@dataclass(frozen=True)
class ValidationReport:
    step: int
    loss: float  # over every source's tokens
    tokens: int
    per_source: dict[str, float] = field(default_factory=dict)  # source label -> loss

    @property
    def perplexity(self) -> float:
        return _ppl(self.loss)

    def line(self) -> str:
        parts = [f"validation step={self.step} val_loss={self.loss:.4f} val_ppl={self.perplexity:.3f}"]
        parts += [f"val_loss[{name}]={loss:.4f}" for name, loss in self.per_source.items()]
        return " ".join(parts)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")


def evaluate(state: Any, sources: dict[str, TokenSource], forward_backward: Callable[..., Any],
             forward_step: Callable[..., Any], num_microbatches: int) -> ValidationReport:
    """Collective: one validation pass over every source."""
    cfg, layout, model = state.cfg, state.layout, state.model
    t = cfg.training
    device = torch.device("cpu") if layout.gloo else torch.device("cuda", layout.local_rank)
    rng = _rng_state()
    hooks = _pause_param_gather_hooks(model, cfg)
    for chunk in model:
        chunk.eval()
    per_source: dict[str, float] = {}
    loss_sum, token_sum = 0.0, 0
    try:
        with torch.no_grad():
            for name, source in sources.items():
                s_sum, s_tokens = 0.0, 0
                for it in range(t.eval_iters):
                    first = it * t.global_batch_size
                    iterators = [microbatches(source, t, 0, layout.dp_rank, layout.dp_size, first_sample=first)
                                 for _ in model]
                    reduced = forward_backward(forward_step_func=forward_step,
                                               data_iterator=iterators if len(model) > 1 else iterators[0],
                                               model=model, num_microbatches=num_microbatches,
                                               seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                                               forward_only=True)
                    mean, tokens = global_mean_loss(reduced, layout, device)
                    if tokens:
                        s_sum += mean * tokens
                        s_tokens += tokens
                per_source[name] = s_sum / s_tokens if s_tokens else float("nan")
                loss_sum += s_sum
                token_sum += s_tokens
    finally:
        for chunk in model:
            chunk.train()
        _resume_param_gather_hooks(model, hooks)
        _set_rng_state(rng)
    return ValidationReport(step=state.step, loss=loss_sum / token_sum if token_sum else float("nan"),
                            tokens=token_sum, per_source=per_source)


def _pause_param_gather_hooks(model: list[Any], cfg: Any) -> bool:
    par = cfg.parallelism
    if not (par.distributed_optimizer and par.overlap_param_gather):
        return False
    for chunk in model:
        chunk.disable_forward_pre_hook(param_sync=True)
    return True


def _resume_param_gather_hooks(model: list[Any], paused: bool) -> None:
    if paused:
        for chunk in model:
            chunk.enable_forward_pre_hook()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])

"""One micro-batch through one model chunk, and the masked token loss the schedule reduces.

Every pipeline stage reads the micro-batch: the first needs the tokens, the last the labels and
loss mask, and with packed sequences (``segment_ids``) every stage needs the positions and the
document boundaries. On megatron's local layers (CPU, and GPUs without Transformer Engine) the
boundaries become a causal block-diagonal attention mask; with Transformer Engine they become
``PackedSeqParams`` (THD, cu_seqlens), which TE's attention and RoPE understand natively. With
context parallelism each rank keeps its load-balanced share of the sequence (megatron's
``get_batch_on_this_cp_rank``).

The loss is a sum over loss-bearing tokens with their count (``calculate_per_token_loss``):
megatron then divides the gradients by the global number of such tokens, so SFT micro-batches
with few assistant tokens are not over-weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist

from trainer.data import attention_mask
from trainer.distributed import Layout
from trainer.model import gpt_module
from trainer.timing import StepTimer

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module, *,
                 device: torch.device, timer: StepTimer, packed_thd: bool = False) -> tuple[torch.Tensor, LossFunc]:
    """megatron's ``forward_step_func``: the chunk's output and the loss function for it."""
    gpt = gpt_module(model)
    with timer.data():
        batch = next(data_iterator)
    batch = cp_slice(batch)
    segments = batch.get("segment_ids")
    mask, packed = None, None
    if segments is not None:
        if packed_thd:
            packed = packed_seq_params(segments.to(device))
        else:
            mask = attention_mask(segments).to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True) if gpt.pre_process else None
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True) if gpt.post_process else None
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    with timer.compute():
        kwargs: dict[str, Any] = {"labels": labels}
        if packed is not None:
            kwargs["packed_seq_params"] = packed
        output = model(tokens, position_ids, mask, **kwargs)
    return output, partial(masked_token_loss, loss_mask)


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the loss over loss-bearing tokens, their number, the pair for reporting)."""
    mask = loss_mask.to(per_token_loss.device, torch.float32).reshape(per_token_loss.shape)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def cp_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This context-parallel rank's load-balanced chunks of the sequence (a no-op without CP)."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return dict(get_batch_on_this_cp_rank(dict(batch)))


def packed_seq_params(segment_ids: torch.Tensor) -> Any:
    """THD ``PackedSeqParams`` of one packed sample (micro-batch size 1): cu_seqlens from the segments."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens(segment_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths ``[0, l1, l1+l2, ...]`` (int32) and the longest, from ``[1, s]`` segment ids."""
    if segment_ids.dim() != 2 or segment_ids.shape[0] != 1:
        raise ValueError(f"packed sequences with Transformer Engine need micro_batch_size=1, got segment ids of "
                         f"shape {tuple(segment_ids.shape)}")
    ids = segment_ids[0]
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device), ids[1:] != ids[:-1]]))
    bounds = torch.cat([starts.flatten(), torch.tensor([ids.numel()], device=ids.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def global_mean_loss(reduced: list[dict[str, torch.Tensor]], layout: Layout, device: torch.device,
                     group: Optional[Any] = None) -> tuple[float, int]:
    """(mean loss over the loss-bearing tokens of the global batch, their number), on every rank.

    Only the last pipeline stage has losses; its tensor-parallel peers hold the same values,
    so tensor-parallel rank 0 of each data-parallel (and context-parallel) replica contributes.
    """
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if reduced and layout.tp_rank == 0:
        for item in reduced:
            total += item["lm loss"].to(total)
    dist.all_reduce(total, group=group)
    tokens = int(total[1])
    return (float(total[0] / total[1]) if tokens else float("nan")), tokens

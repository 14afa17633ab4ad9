"""What a checkpoint holds, as megatron-core sharded state dicts, and how it is put back.

* model chunks (``model0``, ``model1``, ... one per virtual stage): ShardedTensors whose keys are
  global, so any TP/PP/VPP/DP layout can load them;
* the optimizer in megatron's ``dp_reshardable`` format (each rank's flat shard: cheap to save,
  loads at any DP size but only at the same TP/PP/VPP) or ``fully_reshardable`` (per-parameter
  Adam moments in model space, gathered over DP on every save: loads at any layout); see
  ``CheckpointConfig.optimizer_format``;
* the LR schedule, the step and consumed samples (the data position: samples are addressed by
  step, see trainer.data), the layout and model signature;
* every rank's RNG states (a ShardedObject per rank), restored only on the same layout.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from checkpointing.signature import layout_signature, model_signature
from trainer.callbacks import TrainState
from trainer.distributed import Layout
from trainer.model import gpt_module

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"


# --------------------------------------------------------------------------- building


def _sharded_rng(layout: Layout) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", states, (layout.world_size,), (layout.rank,), replica_id=0)


def sharded_state_dict(state: TrainState, *, optimizer_format: str, loading: bool = False,
                       with_rng: bool = True) -> dict[str, Any]:
    """This rank's part of the training state, ready for ``dist_checkpointing.save/load``."""
    metadata = {"distrib_optim_sharding_type": optimizer_format}
    chunks = [gpt_module(chunk) for chunk in state.model]
    sd: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        sd[f"model{index}"] = chunk.sharded_state_dict(metadata=metadata)
    # megatron's optimizers build their part from the model's sharded dict (id -> ShardedTensor)
    sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=loading, metadata=metadata)
    if not loading:
        sd["lr_schedule"] = state.lr_schedule.state_dict()
        sd["step"] = state.step
        sd["consumed_samples"] = state.consumed_samples
        sd["layout"] = layout_signature(state.cfg, state.layout.world_size, state.layout.dp_size)
        sd["model_signature"] = model_signature(state.cfg.model)
    if with_rng:
        sd["rng_state"] = _sharded_rng(state.layout)
    return sd


def init_optimizer_state(optimizer: Any) -> None:
    """Allocate Adam state (moments and ``step``) before building the load dict: megatron maps
    only state that exists, and its distributed optimizer reads ``step`` from it."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                per_param = inner.state[param]
                if not per_param:
                    per_param["step"] = torch.tensor(0.0, dtype=torch.float32)
                    per_param["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    per_param["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", None)
    members = chained if chained else [optimizer]
    return [m.optimizer for m in members if getattr(m, "optimizer", None) is not None]


# --------------------------------------------------------------------------- restoring


def restore(state: TrainState, loaded: dict[str, Any], *, same_layout: bool) -> None:
    """Put a loaded checkpoint into the live model, optimizer, schedule, step and RNG."""
    for index, chunk in enumerate(state.model):
        gpt_module(chunk).load_state_dict(loaded[f"model{index}"], strict=False)
    load_optimizer(state.optimizer, loaded["optimizer"])
    state.lr_schedule.load_state_dict(loaded["lr_schedule"])
    state.step = int(loaded["step"])
    if same_layout and "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])


def load_optimizer(optimizer: Any, loaded: Any) -> None:
    """megatron's optimizer load, around two defects with plain torch Adam (no apex/TE):

    * the distributed optimizer gives every parameter the SAME loaded ``step`` tensor; torch
      Adam then increments it once per parameter and every later update is silently wrong —
      each parameter gets its own copy;
    * its ``fully_reshardable`` loader copies every state key, ``step`` included, from the file,
      which never stores ``step`` (it lives in the param groups) — the loader runs with the
      steps set aside;
    * its ``dp_reshardable`` loader copies into the main params outside ``torch.no_grad`` (with
      fp32 params the main params are views of leaves that require grad) — run under no_grad —
      and overwrites the step restored from the param groups with the load target's (0): the
      param groups' step is put back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    members = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    parts = [loaded] if len(members) == 1 else [v for _, v in sorted(loaded.items())]
    for member, part in zip(members, parts):
        reshardable = isinstance(member, DistributedOptimizer) and \
            part.get("param_state_sharding_type") == "fully_reshardable"
        param_state = part.pop("param_state", None) if reshardable else None
        if reshardable:
            part.pop("param_state_sharding_type")
        saved_step = _param_group_step(part)
        with torch.no_grad():  # megatron's dp_reshardable loader copies into main params without it
            member.load_state_dict(part)  # param groups (+ a dp_reshardable param_state)
        _clone_shared_steps(member, saved_step)
        if param_state is not None:
            inner = member.optimizer
            steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
            try:
                member.load_parameter_state_from_fully_reshardable(param_state)
            finally:
                for param, step in steps.items():
                    inner.state[param]["step"] = step
    if len(members) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _param_group_step(part: Any) -> Optional[float]:
    """The optimizer step megatron keeps in the saved param groups (plain torch Adam), if any."""
    try:
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
    except (KeyError, TypeError):
        return None
    return float(steps.pop()) if len(steps) == 1 else None


def _clone_shared_steps(optimizer: Any, step_value: Optional[float] = None) -> None:
    """Every parameter gets its own ``step`` tensor (set to ``step_value`` when given)."""
    for inner in _torch_optimizers(optimizer):
        for per_param in inner.state.values():
            step = per_param.get("step")
            if isinstance(step, torch.Tensor):
                fresh = step.detach().clone()
                if step_value is not None:
                    fresh.fill_(step_value)
                per_param["step"] = fresh


def _restore_rng(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])


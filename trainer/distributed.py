"""Process group and megatron parallel state from torchrun's environment and the config."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from configs.schema import ParallelismConfig
from configs.errors import ConfigError, Problem


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the 4D grid."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # nccl | gloo
    dp_rank: int
    dp_size: int
    tp_rank: int
    pp_rank: int

    @property
    def gloo(self) -> bool:
        return self.backend == "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(par: ParallelismConfig, seed: int, timeout_s: float = 600.0) -> Layout:
    """Join the job (torchrun's RANK/WORLD_SIZE/MASTER_ADDR...), build megatron's groups, seed.

    ``timeout_s`` bounds every collective (NCCL/gloo): a peer that never arrives fails the
    collective after it (resilience.collective_timeout_s; the hang watchdog acts sooner)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `python -m trainer`
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    _check_world(par, world)

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.vpp and par.vpp > 1 else None,
        context_parallel_size=par.cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),  # megatron's groups: whole minutes
    )
    # Weights come from trainer.param_init (name-seeded); these seed dropout and the rest.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return Layout(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        backend=backend,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
    )


def _check_world(par: ParallelismConfig, world: int) -> None:
    model_parallel = par.tp * par.pp * par.cp
    if world % model_parallel:
        raise ConfigError([Problem("parallelism.tp", par.tp, f"tp x pp x cp = {model_parallel} does not divide "
                                   f"the {world} processes torchrun started")])
    if par.dp is not None and par.dp * model_parallel != world:
        raise ConfigError([Problem("parallelism.dp", par.dp, f"torchrun started {world} processes but "
                                   f"tp x pp x cp x dp = {par.dp * model_parallel}")])


def shutdown() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()

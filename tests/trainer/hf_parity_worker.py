"""Run under torchrun: build the trainer's model from a run config, initialise it from
``checkpoint.init_from`` (the production path), run a forward pass through the pipeline and save the
full logits and megatron's own per-token loss (rank of the last stage, TP rank 0).

    torchrun --nproc-per-node=N tests/trainer/hf_parity_worker.py CONFIG TOKENS.pt OUT.pt
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def main(config_path: str, tokens_path: str, out_path: str) -> None:
    from trainer import cpu_compat

    cpu_compat.activate()
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from checkpointing.init_weights import initialize_from
    from configs.loading import load_run_config
    from trainer.distributed import init_distributed
    from trainer.model import build_model, gpt_module, transformer_config
    from trainer.optim import build_optimizer

    cfg = load_run_config(config_path)
    layout = init_distributed(cfg.parallelism, cfg.training.seed)
    config = transformer_config(cfg.model, cfg.parallelism, cfg.training.precision, gloo=True)
    model = build_model(cfg.model, cfg.parallelism, config, seed=cfg.training.seed)
    optimizer = build_optimizer(model, cfg.training, cfg.parallelism)
    state = SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer)
    initialize_from(state, cfg.checkpoint.init_from, lambda line: print(line, flush=True) if layout.rank == 0 else None)

    text = torch.load(tokens_path)  # [b, s + 1]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    results: dict[str, torch.Tensor] = {}

    def forward(iterator, chunk, with_labels: bool):
        i = next(iterator)  # one sequence per micro-batch (the interleaved schedule needs a multiple of pp)
        gpt = gpt_module(chunk)
        out = chunk(tokens[i:i + 1] if gpt.pre_process else None, positions[i:i + 1], None,
                    labels=labels[i:i + 1] if with_labels else None)

        def collect(output):
            if with_labels:
                return output.sum() * 0, {"loss": output.detach()}
            gathered = tensor_parallel.gather_from_tensor_model_parallel_region(output.transpose(0, 1).contiguous())
            return output.sum() * 0, {"logits": gathered.transpose(0, 1).detach()}
        return out, collect

    batch = tokens.shape[0]
    for with_labels in (False, True):
        iterators = [iter(range(batch)) for _ in model]
        reduced = get_forward_backward_func()(
            forward_step_func=partial(forward, with_labels=with_labels),
            data_iterator=iterators if len(model) > 1 else iterators[0], model=model, num_microbatches=batch,
            seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True)
        if reduced:
            key = next(iter(reduced[0]))
            results[key] = torch.cat([item[key] for item in reduced])
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if last and parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank() == 0:
        torch.save({k: v.float() for k, v in results.items()}, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

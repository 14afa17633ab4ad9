"""GPU validation kit: the predictor's activation memory and the trainer's GPU kernels against a real GPU.

    python benchmarks/gpu_validate.py [--layers 2] [--json out.json]

On one H100/H200 (a few minutes): for 8 layouts of Llama 3.3 70B, one rank's LOCAL shapes are
emulated at TP=1 (a/t query heads, k/t KV heads, f/t FFN, s/cp tokens; mbs and recompute as in
the layout) and megatron-core's transformer block is built with the trainer's own kernel decision
(memory_predictor.kernels: Transformer Engine layers when importable). For each it measures the
bytes a forward + backward allocates on top of the parameters (``max_memory_allocated``, and
``max_memory_reserved``) and TFLOP/s, and prints them next to the predictor's number for the
same thing (``layers x per-layer activations + the layer's working set``). Before that it builds
a 2-layer GPTModel chunk with the trainer's layer spec, runs the trainer's initialisation and
checks every parameter's role (norms 1, biases 0) -- on GPU the norms hide inside TE's fused
linears (``linear_qkv.layer_norm_weight``).

Exit status: 0 when every case is within 3% on allocated memory and the init check passes, 1
otherwise; on a machine without CUDA it says so and exits 0 (nothing to validate there).
Sequence parallelism is not emulated (it needs TP > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, tp, cp, seq, mbs, recompute): the local shapes of one rank of that layout
CASES = [
    ("tp8 s8k mbs1", 8, 1, 8192, 1, "none"),
    ("tp8 s8k mbs1 selective", 8, 1, 8192, 1, "selective"),
    ("tp8 s8k mbs2", 8, 1, 8192, 2, "none"),
    ("tp8 s8k mbs1 full", 8, 1, 8192, 1, "full"),
    ("tp4 s8k mbs1", 4, 1, 8192, 1, "none"),
    ("tp4 cp2 s8k mbs1", 4, 2, 8192, 1, "none"),
    ("tp8 cp4 s32k mbs1", 8, 4, 32768, 1, "selective"),
    ("tp2 s4k mbs1 selective", 2, 1, 4096, 1, "selective"),
]
TOLERANCE = 0.03


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer layers per case")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA device on this machine: nothing to validate (run it where a GPU is lent); exit 0")
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    init_ok = check_init(torch)
    rows = [measure_case(torch, case, args.layers) for case in CASES]
    print_table(rows)
    worst = max(abs(r["error"]) for r in rows)
    ok = init_ok and worst <= TOLERANCE
    print(f"init roles: {'ok' if init_ok else 'WRONG'}; worst allocated-memory error {worst:.1%} "
          f"(tolerance {TOLERANCE:.0%}): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"init_ok": init_ok, "cases": rows}, indent=2))
    dist.destroy_process_group()
    return 0 if ok else 1


def check_init(torch) -> bool:  # noqa: ANN001
    """The trainer's initialisation gives every norm weight 1 and every bias 0 under the GPU spec."""
    from configs.schema import ModelConfig, ParallelismConfig
    from trainer.model import _gpt_chunk, runtime_kernels, transformer_config
    from trainer.param_init import BIAS, NORM, initialize_layout_independent, parameter_roles

    model = ModelConfig(name="check", num_layers=2, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                        num_query_groups=2, vocab_size=1024, qkv_bias=True)
    kernels = runtime_kernels("h100-80gb", gloo=False)
    cfg = transformer_config(model, ParallelismConfig(), "bf16", gloo=False, kernels=kernels)
    chunk = _gpt_chunk(model, cfg, None, te=kernels.transformer_engine).cuda()
    initialize_layout_independent(chunk, cfg, seed=1, tied_embeddings=False)
    roles = parameter_roles(chunk)
    bad = [name for name, p in chunk.named_parameters()
           if (roles[name] == NORM and not torch.all(p == 1)) or (roles[name] == BIAS and torch.any(p != 0))]
    norms = [name for name, role in roles.items() if role == NORM]
    print(f"init: {len(norms)} norm weights ({', '.join(sorted({n.split('.')[-2] + '.' + n.split('.')[-1] for n in norms}))})"
          f" under the {'Transformer Engine' if kernels.transformer_engine else 'local'} spec; wrong: {bad or 'none'}")
    return not bad


def measure_case(torch, case: tuple, layers: int) -> dict:  # noqa: ANN001
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from configs.schema import ModelConfig, ParallelismConfig
    from memory_predictor.activations import layer_activations
    from memory_predictor.kernels import choose_kernels
    from memory_predictor.spec import Layout, ModelSpec, Options
    from trainer.model import _layer_stack_spec, runtime_kernels, transformer_config

    name, tp, cp, seq, mbs, recompute = case
    h, f, a, k = 8192, 28672 // tp, 64 // tp, max(1, 8 // tp)
    s = seq // cp
    model = ModelConfig(name=name, num_layers=layers, hidden_size=h, ffn_hidden_size=f, num_attention_heads=a,
                        num_query_groups=k, vocab_size=128256, head_dim=128)
    kernels = runtime_kernels("h100-80gb", gloo=False)
    cfg = transformer_config(model, ParallelismConfig(recompute=recompute, recompute_num_layers=1), "bf16",
                             gloo=False, kernels=kernels)
    block = TransformerBlock(cfg, _layer_stack_spec(cfg, None, kernels.transformer_engine),
                             post_layer_norm=False).cuda().to(torch.bfloat16)
    rope = RotaryEmbedding(kv_channels=128, rotary_percent=1.0)(s).cuda()
    x = torch.randn(s, mbs, h, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = block(x, attention_mask=None, rotary_pos_emb=rope)
    out.float().sum().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    reserved = torch.cuda.max_memory_reserved()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block(x, attention_mask=None, rotary_pos_emb=rope).float().sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    k_spec = choose_kernels("h100-80gb", transformer_engine=kernels.transformer_engine)
    spec = ModelSpec(name=name, num_layers=layers, hidden_size=h, ffn_hidden_size=f, num_attention_heads=a,
                     num_query_groups=k, vocab_size=128256, kv_channels=128)
    opts = Options(precision="bf16", flash_attention=k_spec.flash_attention, fused_norm=k_spec.transformer_engine,
                   fused_swiglu=k_spec.fused_swiglu, gradient_accumulation_fusion=k_spec.gradient_accumulation_fusion)
    act = layer_activations(spec, s, mbs, Layout(tp=1, pp=1, cp=1, dp=1, recompute=recompute), opts)
    kept = act.checkpoint_input * layers if act.full_recompute else act.per_layer * layers
    grads = sum(p.numel() * p.element_size() for p in block.parameters())  # parameter grads (no DDP buffer here)
    predicted = kept + act.working + grads + 2 * x.numel() * x.element_size()  # + the input and its grad
    from memory_predictor.flops import FlopsShape, hardware_flops_per_step

    shape = FlopsShape(num_layers=layers, hidden_size=h, ffn_hidden_size=f, num_attention_heads=a, num_query_groups=k,
                       padded_vocab_size=0, seq_length=s, kv_channels=128)
    flops = hardware_flops_per_step(shape, mbs, recompute)  # Megatron's convention: full (non-causal) scores
    del block, out, x
    torch.cuda.empty_cache()
    return {"case": name, "measured_bytes": measured, "predicted_bytes": predicted,
            "error": (predicted - measured) / measured if measured else 0.0, "reserved_bytes": reserved,
            "step_s": sorted(times)[1], "tflops": flops / sorted(times)[1] / 1e12, "kernels": kernels.reason}


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<26} {'measured GiB':>13} {'predicted GiB':>14} {'error':>8} {'reserved GiB':>13} {'fwd+bwd s':>10} "
          f"{'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['case']:<26} {r['measured_bytes'] / 2**30:>13.3f} {r['predicted_bytes'] / 2**30:>14.3f} "
              f"{r['error']:>7.1%} {r['reserved_bytes'] / 2**30:>13.2f} {r['step_s']:>10.4f} {r['tflops']:>8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure a real megatron-core layer on CPU (run as a subprocess: it patches torch process-wide).

    python tests/memory_predictor/megatron_probe.py '<json list of cases>'

For each case, builds megatron-core's transformer block with the trainer's own layer spec
(trainer/model.py) at TP=1 and prints, as one JSON line per case: the parameter count of
one layer, and the bytes of every tensor autograd saves for backward during the forward
of one micro-batch (deduplicated by storage; parameters and the rotary table excluded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def main() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    from trainer import cpu_compat, megatron_noise

    megatron_noise.silence()
    cpu_compat.activate()
    megatron_noise.silence_cpu_only()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlock

    from configs.schema import ModelConfig, ParallelismConfig
    from trainer.model import _layer_stack_spec, transformer_config

    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    for case in json.loads(sys.argv[1]):
        m = ModelConfig(name="probe", num_layers=case["layers"], hidden_size=case["h"], ffn_hidden_size=case["f"],
                        num_attention_heads=case["a"], num_query_groups=case["k"], vocab_size=256)
        par = ParallelismConfig(recompute=case["recompute"], recompute_num_layers=case.get("n", 1))
        cfg = transformer_config(m, par, case["precision"], gloo=True)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["precision"]]
        block = TransformerBlock(cfg, _layer_stack_spec(cfg, None), post_layer_norm=False).to(dtype)
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        layer_params = sum(p.numel() for p in block.layers[0].parameters())
        s, b = case["s"], case["b"]
        x = torch.randn(s, b, case["h"], dtype=dtype, requires_grad=True)
        rope = RotaryEmbedding(kv_channels=case["h"] // case["a"], rotary_percent=1.0)(s)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() != rope.untyped_storage().data_ptr():
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, attention_mask=None, rotary_pos_emb=rope)
        out.float().sum().backward()  # the saved set must also serve a real backward
        print(json.dumps({**case, "layer_params": layer_params, "saved_bytes": sum(saved.values())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

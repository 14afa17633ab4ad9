"""Initialisation by what a parameter is: norms start at 1, biases at 0, residual outputs scaled.

* megatron's local spec, for real: a Qwen2-style chunk (QKV biases) built by the trainer on CPU,
  initialised, every parameter's role and values checked (in a subprocess: the CPU layer patches
  torch process-wide);
* the Transformer Engine spec, whose module tree cannot be built without TE: its real parameter
  names and module class names (megatron's TE spec: ``TELayerNormColumnParallelLinear`` holds
  ``layer_norm_weight`` and ``weight``, ``TERowParallelLinear`` ``weight``, ``TENorm`` the final
  norm), where a rule on the name's suffix (``norm.weight``) drew the fused norms from N(0, std).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import trainer_harness
from trainer.param_init import BIAS, NORM, RESIDUAL, WEIGHT, parameter_roles

_LOCAL_SPEC_PROBE = """
import json, sys
from trainer import cpu_compat
cpu_compat.activate()
import torch, torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from configs.schema import ModelConfig, ParallelismConfig
from trainer.model import _gpt_chunk, transformer_config
from trainer.param_init import initialize_layout_independent, parameter_roles
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(1)
model = ModelConfig(name="q", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, vocab_size=300, qkv_bias=True)
cfg = transformer_config(model, ParallelismConfig(), "fp32", gloo=True)
chunk = _gpt_chunk(model, cfg, None)
initialize_layout_independent(chunk, cfg, seed=3, tied_embeddings=False)
roles = parameter_roles(chunk)
out = {}
for name, p in chunk.named_parameters():
    out[name] = {"role": roles[name], "ones": bool(torch.all(p == 1)), "zeros": bool(torch.all(p == 0)),
                 "std": float(p.float().std()) if p.numel() > 1 else 0.0}
print(json.dumps(out))
"""


def test_local_spec_roles_and_values() -> None:
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PYTHONPATH": str(trainer_harness.REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _LOCAL_SPEC_PROBE, str(port)], cwd=trainer_harness.REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        "embedding.word_embeddings.weight": WEIGHT, "decoder.final_layernorm.weight": NORM,
        "output_layer.weight": WEIGHT,
        "decoder.layers.0.input_layernorm.weight": NORM, "decoder.layers.0.pre_mlp_layernorm.weight": NORM,
        "decoder.layers.0.self_attention.linear_qkv.weight": WEIGHT,
        "decoder.layers.0.self_attention.linear_qkv.bias": BIAS,
        "decoder.layers.0.self_attention.linear_proj.weight": RESIDUAL,
        "decoder.layers.0.mlp.linear_fc1.weight": WEIGHT, "decoder.layers.0.mlp.linear_fc2.weight": RESIDUAL,
    }
    for name, role in expected.items():
        assert params[name]["role"] == role, name
    assert {p["role"] for p in params.values()} == {NORM, BIAS, RESIDUAL, WEIGHT}
    for name, p in params.items():
        if p["role"] == NORM:
            assert p["ones"], name
        elif p["role"] == BIAS:
            assert p["zeros"], name
        elif p["role"] == RESIDUAL:
            assert p["std"] == pytest.approx(0.02 / 2.0, rel=0.2), name  # std / sqrt(2 L), L = 2
        else:
            assert p["std"] == pytest.approx(0.02, rel=0.2), name


# Transformer Engine's classes as megatron's TE spec uses them (megatron/core/extensions/transformer_engine.py),
# with TE's own parameter names; only names and classes matter to the roles.
class TELayerNormColumnParallelLinear(torch.nn.Module):
    def __init__(self, out: int, inp: int, bias: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out, inp))
        self.layer_norm_weight = torch.nn.Parameter(torch.empty(inp))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out))


class TERowParallelLinear(torch.nn.Module):
    def __init__(self, out: int, inp: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out, inp))


class TENorm(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size))


def _te_chunk(qkv_bias: bool) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.self_attention = torch.nn.Module()
    layer.self_attention.linear_qkv = TELayerNormColumnParallelLinear(128, 64, qkv_bias)
    layer.self_attention.linear_proj = TERowParallelLinear(64, 64)
    layer.mlp = torch.nn.Module()
    layer.mlp.linear_fc1 = TELayerNormColumnParallelLinear(352, 64, False)
    layer.mlp.linear_fc2 = TERowParallelLinear(64, 176)
    chunk = torch.nn.Module()
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList([layer])
    chunk.decoder.final_layernorm = TENorm(64)
    return chunk


def test_transformer_engine_spec_roles_from_its_real_names() -> None:
    roles = parameter_roles(_te_chunk(qkv_bias=True))
    assert roles == {
        "decoder.layers.0.self_attention.linear_qkv.weight": WEIGHT,
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": NORM,
        "decoder.layers.0.self_attention.linear_qkv.bias": BIAS,
        "decoder.layers.0.self_attention.linear_proj.weight": RESIDUAL,
        "decoder.layers.0.mlp.linear_fc1.weight": WEIGHT,
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": NORM,
        "decoder.layers.0.mlp.linear_fc2.weight": RESIDUAL,
        "decoder.final_layernorm.weight": NORM,
    }
    # the old rule (a name ending in "norm.weight") missed both fused norms
    assert not any(name.endswith("norm.weight") for name, role in roles.items()
                   if role == NORM and "layer_norm_weight" in name)

"""Cross-checks against real code on CPU, no GPU needed.

1. PyTorch's MemTracker under FakeTensorMode, on a Llama layer at the real per-rank shapes of
   Llama 3.3 70B (no memory is allocated): parameter, gradient and optimizer bytes must equal
   the model exactly (fp32 + Adam: 4 + 4 + 8 bytes per parameter; Adam's per-tensor step
   counters, 4 bytes each, are the only extra).
2. megatron-core's own transformer block with the trainer's layer spec, on CPU (a
   subprocess, because the CPU compatibility layer patches torch process-wide): its
   parameter count and the bytes autograd saves for backward must equal the predictor's
   itemization for the eager kernels (``Options.cpu_trainer``), byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memory_predictor.activations import layer_activations
from memory_predictor.memory import layer_params, state_bytes
from memory_predictor.models import load_model
from memory_predictor.spec import Layout, ModelSpec, Options

ROOT = Path(__file__).resolve().parents[2]
L70 = load_model("llama3.3_70b")


class LlamaLayer(nn.Module):
    """One Llama decoder layer as one TP rank holds it: a/t query heads, k/t KV heads, f/t FFN."""

    def __init__(self, h: int, f: int, a: int, k: int, d: int) -> None:
        super().__init__()
        self.a, self.k, self.d = a, k, d
        self.input_norm, self.mlp_norm = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv = nn.Linear(h, (a + 2 * k) * d, bias=False)
        self.proj = nn.Linear(a * d, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * f, bias=False)  # gate and up, fused as in megatron
        self.fc2 = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, _ = x.shape
        q, k, v = self.qkv(self.input_norm(x)).split([self.a * self.d, self.k * self.d, self.k * self.d], -1)
        q = q.view(s, b, self.a, self.d).permute(1, 2, 0, 3)
        k, v = (t.view(s, b, self.k, self.d).permute(1, 2, 0, 3).repeat_interleave(self.a // self.k, 1) for t in (k, v))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(o.permute(2, 0, 1, 3).reshape(s, b, self.a * self.d))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, -1)
        return x + self.fc2(nn.functional.silu(gate) * up)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_memtracker_states_of_a_real_70b_layer(tp: int) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    m = L70
    with torch.device("meta"):
        layer = LlamaLayer(m.hidden_size, m.ffn_hidden_size // tp, m.num_attention_heads // tp,
                           max(m.num_query_groups // tp, 1), m.head_dim)
    with FakeTensorMode(allow_non_fake_inputs=True):
        layer = layer.to_empty(device="cpu")
        optimizer = torch.optim.Adam(layer.parameters())
        x = torch.randn(128, 1, m.hidden_size)
        tracker = MemTracker()
        tracker.track_external(layer, optimizer, x)
        with tracker:
            layer(x).sum().backward()
            optimizer.step()
        snapshot = tracker.get_tracker_snapshot()
    got = {str(kind).rsplit(".", 1)[-1]: n for kind, n in next(iter(snapshot.values())).items()}
    n_tensors = len(list(layer.parameters()))
    params = layer_params(m, tp)
    sb = state_bytes(Layout(tp=tp, distributed_optimizer=False), Options(precision="fp32"))
    assert sum(p.numel() for p in layer.parameters()) == params
    assert got["PARAM"] == params * sb.param
    assert got["GRAD"] == params * sb.grad
    assert got["OPT"] - 4 * n_tensors == params * sb.optimizer  # Adam m, v; minus the step counters


CASES = [
    dict(layers=1, h=64, f=176, a=4, k=2, s=32, b=2, precision="bf16", recompute="none"),
    dict(layers=1, h=64, f=176, a=4, k=2, s=32, b=4, precision="bf16", recompute="none"),  # x micro batch
    dict(layers=1, h=64, f=176, a=4, k=2, s=64, b=2, precision="bf16", recompute="none"),  # s^2 term
    dict(layers=1, h=64, f=176, a=4, k=2, s=32, b=2, precision="fp32", recompute="none"),
    dict(layers=1, h=64, f=176, a=4, k=2, s=32, b=2, precision="bf16", recompute="selective"),
    dict(layers=1, h=128, f=352, a=8, k=8, s=32, b=1, precision="bf16", recompute="none"),  # MHA
    dict(layers=1, h=128, f=352, a=8, k=1, s=48, b=1, precision="fp32", recompute="selective"),  # MQA
    dict(layers=2, h=64, f=176, a=4, k=2, s=32, b=2, precision="bf16", recompute="none"),
    dict(layers=4, h=64, f=176, a=4, k=2, s=32, b=2, precision="bf16", recompute="full", n=2),
    dict(layers=3, h=64, f=176, a=4, k=2, s=32, b=2, precision="fp32", recompute="full", n=1),
    # one rank of TP=2 without SP: half the heads and FFN, full-size norms and GEMM inputs
    dict(layers=1, h=128, f=176, a=4, k=2, s=32, b=2, precision="bf16", recompute="none", emulates_tp=2),
]


@pytest.fixture(scope="module")
def megatron_measurements() -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "tests/memory_predictor/megatron_probe.py"), json.dumps(CASES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_megatron_layer_matches_itemization(megatron_measurements: list[dict], index: int) -> None:
    case = megatron_measurements[index]
    tp = case.get("emulates_tp", 1)
    # the full model whose one TP rank the probe built
    model = ModelSpec(name="probe", num_layers=case["layers"], hidden_size=case["h"], ffn_hidden_size=case["f"] * tp,
                      num_attention_heads=case["a"] * tp, num_query_groups=case["k"] * tp, vocab_size=256,
                      kv_channels=case["h"] // case["a"] if tp > 1 else None)
    layout = Layout(tp=tp, sequence_parallel=False, recompute=case["recompute"], recompute_num_layers=case.get("n", 1))
    opts = Options.cpu_trainer(precision=case["precision"])
    act = layer_activations(model, case["s"], case["b"], layout, opts)
    rng_state = 4 if case["recompute"] == "selective" else 0  # an int32 the checkpoint keeps
    assert case["saved_bytes"] == act.kept(case["layers"]) + rng_state * case["layers"]
    assert case["layer_params"] == layer_params(model, tp)

"""In-process tests: FLOPs/MFU math, log line, synthetic data, name-seeded init, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import trainer_harness  # noqa: F401  (puts the repo root on sys.path)
from memory_predictor import flops
from trainer import metrics
from trainer.data import SyntheticSource

# megatron-core on a machine without Transformer Engine / apex announces its fallbacks at import
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")]

# ---------------------------------------------------------------------------- metrics

LLAMA3_8B = flops.FlopsShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                               num_query_groups=8, padded_vocab_size=128256, seq_length=8192)


def _matmul_flops_per_sequence(m: flops.FlopsShape) -> float:
    """Forward GEMM FLOPs counted matrix by matrix, times 3 for forward + backward."""
    s, h, d = m.seq_length, m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    per_layer = 2 * s * h * (q + 2 * kv)        # QKV projection
    per_layer += 2 * s * s * q * 2              # QK^T and attention x V (no causal discount)
    per_layer += 2 * s * q * h                  # output projection
    per_layer += 2 * s * h * m.ffn_hidden_size * 3  # gate, up, down
    logits = 2 * s * h * m.padded_vocab_size
    return 3.0 * (m.num_layers * per_layer + logits)


@pytest.mark.parametrize("shape", [
    LLAMA3_8B,
    flops.FlopsShape(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=2, padded_vocab_size=384, seq_length=64),
    flops.FlopsShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                       num_query_groups=8, padded_vocab_size=128256, seq_length=4096),
])
def test_model_flops_match_gemm_by_gemm_count(shape: flops.FlopsShape) -> None:
    assert flops.model_flops_per_step(shape, 3) == pytest.approx(3 * _matmul_flops_per_sequence(shape), rel=1e-12)


def test_llama3_8b_flops_per_token_is_about_6n_plus_attention() -> None:
    per_token = flops.model_flops_per_step(LLAMA3_8B, 1) / LLAMA3_8B.seq_length
    assert 6 * 8.0e9 < per_token < 6 * 8.0e9 + 12 * 32 * 4096 * 8192 * 1.01  # 6N + 12 L h s


def test_recompute_counts_only_as_hardware_flops() -> None:
    model = flops.model_flops_per_step(LLAMA3_8B, 4)
    assert flops.hardware_flops_per_step(LLAMA3_8B, 4, "none") == model
    selective = flops.hardware_flops_per_step(LLAMA3_8B, 4, "selective")
    full = flops.hardware_flops_per_step(LLAMA3_8B, 4, "full")
    assert model < selective < full < model * 4 / 3


def test_mfu() -> None:
    assert flops.tflops_per_gpu(989e12 * 8 * 2.0, 2.0, 8) == pytest.approx(989.0)
    assert flops.mfu_percent(400.0, 989.0) == pytest.approx(40.4449, rel=1e-4)
    assert flops.mfu_percent(1.0, None) is None


def test_step_line_format_and_parse_round_trip() -> None:
    m = metrics.StepMetrics(step=3, total_steps=30, loss=5.12341, grad_norm=1.2344, lr=3e-3, step_time_s=0.1234,
                            tokens_per_s=4160.04, tflops_per_gpu=0.0123, mfu_percent=None)
    line = metrics.format_step_line(m)
    assert line == ("step=3/30 loss=5.1234 grad_norm=1.234 lr=3.000e-03 step_time_s=0.123 tokens_per_s=4160.0 "
                    "tflops_per_gpu=0.012 mfu=n/a")
    back = metrics.parse_step_line(line)
    assert back is not None and back.step == 3 and back.loss == 5.1234 and back.mfu_percent is None
    gpu = metrics.format_step_line(metrics.StepMetrics(1, 2, 1.0, None, 1e-4, 1.0, 1.0, 400.0, 41.2345))
    assert gpu.endswith("grad_norm=n/a lr=1.000e-04 step_time_s=1.000 tokens_per_s=1.0 tflops_per_gpu=400.000 mfu=41.23%")
    assert metrics.parse_step_line(gpu).mfu_percent == pytest.approx(41.23)  # type: ignore[union-attr]
    assert metrics.parse_step_line("training finished: steps=2 final_loss=1.0000") is None
    assert metrics.format_final_line(30, 2.345678) == "training finished: steps=30 final_loss=2.3457"


# ---------------------------------------------------------------------------- data and init


def _text(source: SyntheticSource, index: int) -> np.ndarray:
    """The seq_length + 1 tokens of a sample (inputs, then the last label)."""
    sample = source.sample(index)
    assert np.array_equal(sample["tokens"][1:], sample["labels"][:-1])
    assert sample["loss_mask"].min() == 1 and np.array_equal(sample["position_ids"], np.arange(64))
    return np.append(sample["tokens"], sample["labels"][-1])


def test_synthetic_samples_depend_only_on_seed_and_index() -> None:
    a, b = SyntheticSource(257, 64, seed=1), SyntheticSource(257, 64, seed=1)
    assert np.array_equal(_text(a, 5), _text(b, 5))
    assert not np.array_equal(_text(a, 5), _text(a, 6))
    assert not np.array_equal(_text(a, 5), _text(SyntheticSource(257, 64, seed=2), 5))
    x = _text(a, 7)
    assert x.shape == (65,) and x.min() >= 0 and x.max() < 257
    stride = (x[1] - x[0]) % 257
    assert np.array_equal(np.diff(x) % 257, np.full(64, stride))  # an arithmetic progression


def test_global_parameter_names() -> None:
    from trainer.param_init import global_name

    numbers = [3, 4]  # this stage holds layers 3 and 4 (1-based) as local layers 0 and 1
    assert global_name("decoder.layers.1.mlp.linear_fc1.weight", numbers, False) == "decoder.layers.3.mlp.linear_fc1.weight"
    assert global_name("decoder.final_layernorm.weight", numbers, False) == "decoder.final_layernorm.weight"
    assert global_name("output_layer.weight", numbers, True) == "embedding.word_embeddings.weight"
    assert global_name("output_layer.weight", numbers, False) == "output_layer.weight"


def test_context_parallel_is_refused_with_the_local_layers() -> None:
    from configs.schema import ModelConfig, ParallelismConfig
    from configs.errors import ConfigError
    from trainer.model import transformer_config

    model = ModelConfig(name="t", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, vocab_size=257)
    with pytest.raises(ConfigError, match="parallelism.cp"):
        transformer_config(model, ParallelismConfig(cp=2), "fp32", gloo=True)


# ---------------------------------------------------------------------------- tokenizer


def _read_back(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_tokenize_round_trip(tmp_path: Path) -> None:
    from trainer.tokenize import BYTE_EOD, main

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["héllo", "", "wörld ✓"])) + "\n")
    txt = tmp_path / "b.txt"
    txt.write_text("plain\ntext\n")
    prefix = tmp_path / "out" / "corpus"
    assert main(["--input", str(jsonl), str(txt), "--output-prefix", str(prefix)]) == 0
    expected = [list("héllo".encode()) + [BYTE_EOD], list("wörld ✓".encode()) + [BYTE_EOD],
                list(b"plain\ntext\n") + [BYTE_EOD]]
    assert _read_back(prefix) == expected  # the empty document is skipped


def test_tokenize_custom_json_key(tmp_path: Path) -> None:
    from trainer.tokenize import main

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"content": "ab"}) + "\n")
    assert main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"), "--json-key", "content"]) == 0
    assert _read_back(tmp_path / "o") == [[97, 98, 256]]


@pytest.mark.parametrize("lines,message", [
    (['{"text": "ok"}', '{bad json'], "bad.jsonl line 2: not valid JSON"),
    (['{"text": "ok"}', '{"body": "x"}'], "bad.jsonl line 2: no 'text' field (found: body)"),
    (['{"text": 3}'], "bad.jsonl line 1: field 'text' is int, not a string"),
])
def test_tokenize_bad_json_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                lines: list[str], message: str) -> None:
    from trainer.tokenize import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "out"
    assert main(["--input", str(bad), "--output-prefix", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()


def test_tokenize_missing_input_and_missing_transformers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.tokenize import main

    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"input file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x")
    code = main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", str(tmp_path / "no-such-tokenizer")])
    assert code == 2 and "tokenizer directory not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- CPU layer

_CPU_LAYER_PROBE = """
import torch
from trainer import cpu_compat
assert cpu_compat.activate()

class CudaInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):  # like megatron's sequence-parallel all-gather buffer
        return grad * 2 + torch.zeros(grad.shape, device=torch.cuda.current_device())

x = torch.ones(3, requires_grad=True)
CudaInBackward.apply(x).sum().backward()
torch.autograd.backward([CudaInBackward.apply(x).sum()])
assert x.grad.tolist() == [4.0, 4.0, 4.0], x.grad
y = torch.empty(2, device="cuda").cuda().to(0)
assert y.device.type == "cpu" and y.type() == "torch.cuda.FloatTensor"
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
tracker = get_cuda_rng_tracker()
tracker.add("model-parallel-rng", 7)
before = torch.get_rng_state()
with tracker.fork():
    a = torch.rand(2)
assert torch.equal(before, torch.get_rng_state())
torch.manual_seed(7)
assert torch.equal(a, torch.rand(2))
print("ok")
"""


def test_cpu_layer_redirects_cuda_inside_custom_backward_and_rng() -> None:
    import subprocess
    import sys

    # a subprocess: activating patches torch.cuda for the whole interpreter
    env = {"PYTHONPATH": str(trainer_harness.REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _CPU_LAYER_PROBE], cwd=trainer_harness.REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

"""``checkpoint.init_from`` a Hugging Face model: the megatron model gives the HF model's logits and loss.

A round trip (import then export) cannot prove an import right (a wrong layout and the matching
wrong export cancel out), so the real ``transformers`` model is the reference: tiny Llama (GQA,
untied, Llama-3 RoPE scaling whose bands a 128-token sequence crosses) and Qwen2 (QKV bias,
tied embeddings, theta 1e6), both with vocabulary 300 that megatron pads to 384, loaded at
TP=1, TP=2 (+SP), PP=2 and PP=2 x VPP=2 through the production loader. fp32 on CPU; tolerance
2e-4 absolute on logits of magnitude ~10 (relative ~2e-5), 1e-5 on the mean loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_harness import REPO_ROOT, write_config

sys.path.insert(0, str(REPO_ROOT))
from tests.hf_models import VOCAB, hf_logits, make_llama, make_qwen2, next_token_loss  # noqa: E402

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
WORKER = REPO_ROOT / "tests" / "trainer" / "hf_parity_worker.py"
SEQ, BATCH = 128, 2
LOGITS_TOL, LOSS_TOL = 2e-4, 1e-5
LAYOUTS = {
    "tp1": (1, []),
    "tp2_sp": (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    "pp2": (2, ["parallelism.pp=2"]),
    "pp2_vpp2": (2, ["parallelism.pp=2", "parallelism.vpp=2", "training.global_batch_size=4"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"llama": make_llama(root / "llama", shards=True), "qwen2": make_qwen2(root / "qwen2")}


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def run_worker(run_dir: Path, nproc: int, overrides: list[str], text: torch.Tensor) -> dict[str, torch.Tensor]:
    config = write_config(run_dir, [f"cluster.gpus_per_node={nproc}", "training.precision=fp32",
                                    f"training.seq_length={SEQ}", "training.micro_batch_size=2", *overrides])
    tokens, out = run_dir / "tokens.pt", run_dir / "out.pt"
    torch.save(text, tokens)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(WORKER), str(config), str(tokens), str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "initialised weights from Hugging Face model" in proc.stdout
    return torch.load(out)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_and_loss_match_transformers(tmp_path: Path, models: dict[str, Path], text: torch.Tensor,
                                            family: str, layout: str) -> None:
    nproc, overrides = LAYOUTS[layout]
    hf_dir = models[family]
    got = run_worker(tmp_path, nproc, ["model=hf", f"model.hf_path={hf_dir}", f"checkpoint.init_from={hf_dir}",
                                       *overrides], text)
    tokens, labels = text[:, :-1], text[:, 1:]
    reference = hf_logits(hf_dir, tokens)
    logits = got["logits"]
    assert logits.shape == (BATCH, SEQ, 384)  # padded vocabulary
    assert (logits[..., VOCAB:] < -1e30).all(), "padded vocabulary rows must never win the softmax"
    diff = (logits[..., :VOCAB] - reference).abs().max().item()
    assert diff < LOGITS_TOL, f"max |logits - HF| = {diff}"
    assert reference.abs().max() > 5.0  # far from uniform: the comparison has teeth
    mean_loss = float(got["loss"].mean())
    assert mean_loss == pytest.approx(next_token_loss(reference, labels), abs=LOSS_TOL)


def test_qkv_grouping_round_trip() -> None:
    """megatron's fused QKV is grouped per KV group, not [q; k; v]; split undoes merge exactly."""
    from checkpointing import hf_mapping

    dims = hf_mapping.Dims(num_layers=4, hidden=64, heads=4, groups=2, head_dim=16, ffn=176, vocab=VOCAB,
                           padded_vocab=384, tied=False, qkv_bias=False)
    q, k, v = (torch.randn(n * 16, 64) for n in (4, 2, 2))
    grouped = hf_mapping.merge_qkv(q, k, v, dims)
    assert not torch.equal(grouped, torch.cat([q, k, v]))
    back = hf_mapping.split_qkv(grouped, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))

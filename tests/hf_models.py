"""Real tiny Hugging Face models, built locally from configs (no downloads).

``transformers`` builds the model from a config alone; weights are redrawn with large scales
(and norms/biases away from 1/0) so that logits are far from uniform and a wrong layout, a
missing bias or an unmasked padding row shows up as a large difference, then saved with
``save_pretrained`` (safetensors). The shapes match the project's ``tiny`` model family: 4 layers
(PP=2 x VPP=2 works), 4 heads, 2 KV groups (TP=2 works), vocabulary 300 (padded to 384 by
megatron, so the padding matters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 300
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _scramble(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise * (0.6 / max(param.shape[-1], 1) ** 0.5) * 2.5)


def make_llama(directory: Path, *, seed: int = 1, shards: bool = False, **overrides: Any) -> Path:
    """Llama 3 style: GQA, untied, llama3 RoPE scaling whose bands a 128-token sequence crosses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**COMMON, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
                            "eos_token_id": 2,
                            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64},
                            **overrides})
    return _save(LlamaForCausalLM(config), directory, seed, shards)


def make_qwen2(directory: Path, *, seed: int = 2, shards: bool = False, **overrides: Any) -> Path:
    """Qwen2 style: QKV bias, tied embeddings, theta 1e6, eps 1e-6."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**COMMON, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **overrides})
    return _save(Qwen2ForCausalLM(config), directory, seed, shards)


def _save(model: torch.nn.Module, directory: Path, seed: int, shards: bool) -> Path:
    torch.manual_seed(seed)
    _scramble(model, seed)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), max_shard_size="200KB" if shards else "5GB")
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of the saved model on ``tokens`` [b, s], in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross entropy of ``logits`` [b, s, V] against ``labels`` [b, s] (every position counts)."""
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))

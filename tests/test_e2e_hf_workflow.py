"""The workflow the project exists for, end to end through ``python -m launcher`` on this machine.

Real parts: ``transformers`` models and a BPE tokenizer built here, megatron-core training on CPU
ranks (gloo), our checkpoints, the offline exporter, and ``transformers`` loading the export.

* Round trip: HF -> train with lr=0 -> export gives back the very same tensors (fp32).
* HF -> train a few steps at TP=2 -> export -> ``transformers`` reproduces the loss the trainer's
  last validation pass printed for the final weights (the validation samples are re-created here).
* CPT on a two-source weighted blend with validation -> SFT from the CPT run (init_from its run
  directory) on chat data -> export with the tokenizer -> ``transformers`` loads model and tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e import launcher, only_run
from tests.hf_assets import make_chat_tokenizer
from tests.hf_models import make_llama, make_qwen2, next_token_loss

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::UserWarning")]
FP32 = ["training.precision=fp32", "checkpoint.enabled=true", "checkpoint.export_hf=true",
        "checkpoint.export_dtype=fp32", "monitoring.prometheus=false", "monitoring.wandb=false"]


def run_local(tmp_path: Path, name: str, *overrides: str) -> Path:
    root = tmp_path / name
    proc = launcher("config=tiny_local", f"runs_root={root}", *FP32, *overrides, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return only_run(root)


def safetensors_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_zero_learning_rate_round_trip_gives_identical_tensors(tmp_path: Path) -> None:
    hf = make_qwen2(tmp_path / "qwen2")
    run = run_local(tmp_path, "rt", "model=hf", f"model.hf_path={hf}", f"checkpoint.init_from={hf}",
                    "training.train_steps=1", "training.lr=0", "training.min_lr=0", "training.weight_decay=0")
    exported, original = safetensors_dict(run / "hf_export"), safetensors_dict(hf)
    original.pop("lm_head.weight", None)  # tied: the export writes the embedding once, as save_pretrained does
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_trained_export_reproduces_the_trainers_validation_loss(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.data import SyntheticSource

    hf = make_llama(tmp_path / "llama")
    run = run_local(tmp_path, "tp2", "model=hf", f"model.hf_path={hf}", f"checkpoint.init_from={hf}",
                    "cluster.gpus_per_node=2", "parallelism.tp=2", "training.train_steps=4", "training.lr=1e-3",
                    "training.eval_interval=4", "training.eval_iters=1", "training.seq_length=128")
    log = (run / "logs" / "local.out").read_text()
    assert "initialised weights from Hugging Face model" in log
    printed = float(re.findall(r"^validation step=4 val_loss=(\S+)", log, re.M)[-1])
    # the trainer's validation samples: the synthetic source with its held-out seed (trainer.data)
    source = SyntheticSource(300, 128, 1234 + 7919)
    samples = [source.sample(i) for i in range(8)]
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    labels = torch.from_numpy(np.stack([s["labels"] for s in samples]))
    model = AutoModelForCausalLM.from_pretrained(str(run / "hf_export"), dtype=torch.float32).eval()
    with torch.no_grad():
        loss = next_token_loss(model(input_ids=tokens).logits.float(), labels)
    assert loss == pytest.approx(printed, abs=2e-4)  # printed with 4 decimals
    original = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        before = next_token_loss(original(input_ids=tokens).logits.float(), labels)
    assert abs(before - loss) > 1e-3  # the export holds the trained weights, not the starting ones


def test_cpt_then_sft_then_export_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tokenize import HuggingFaceTokenizer, tokenize_files

    tok = make_chat_tokenizer(tmp_path / "tok", vocab_size=300)
    vocab = len(AutoTokenizer.from_pretrained(tok))
    hf = make_llama(tmp_path / "llama", vocab_size=vocab)
    corpora = {}
    for name, words in (("prose", "the quick brown fox jumps over the lazy dog"),
                        ("numbers", "one plus two is three and four plus five is nine")):
        source = tmp_path / f"{name}.jsonl"
        source.write_text("".join(json.dumps({"text": f"{words} {i}. " * 4}) + "\n" for i in range(120)))
        corpora[name] = tmp_path / name
        tokenize_files([source], str(corpora[name]), HuggingFaceTokenizer(tok))
    blend = (f"training.data.blend=[{{path:{corpora['prose']},weight:2,name:prose}},"
             f"{{path:{corpora['numbers']},weight:1,name:numbers}}]")
    cpt = run_local(tmp_path, "cpt", "model=hf", f"model.hf_path={hf}", f"checkpoint.init_from={hf}",
                    "cluster.gpus_per_node=2", "training.train_steps=4", "training.data.source=indexed", blend,
                    "training.data.split='90,10,0'", "training.eval_interval=2", f"training.data.tokenizer={tok}")
    cpt_log = (cpt / "logs" / "local.out").read_text()
    assert re.search(r"^validation step=4 .*val_loss\[prose\]=\S+ val_loss\[numbers\]=\S+", cpt_log, re.M), cpt_log[-2000:]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                                    {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n"
                            for i in range(60)))
    sft = run_local(tmp_path, "sft", "model=hf", f"model.hf_path={hf}", f"checkpoint.init_from={cpt}",
                    "training.train_steps=3", "training.data.source=sft", f"training.data.blend=[{{path:{chat}}}]",
                    f"training.data.tokenizer={tok}", "training.data.split='90,10,0'", "training.eval_interval=3",
                    "training.seq_length=128")
    sft_log = (sft / "logs" / "local.out").read_text()
    assert f"initialised weights from checkpoint {cpt}/checkpoints/step_00000004" in sft_log
    export = sft / "hf_export"
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 1?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == vocab

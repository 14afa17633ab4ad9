"""Export to Hugging Face, checked against independent references.

Real checkpoints come from the project's trainer (torchrun, CPU ranks): a Llama (GQA, untied,
Llama-3 RoPE scaling whose bands the short test sequence crosses) saved at TP=2, and a Qwen2 (QKV
bias, tied embeddings, eps 1e-6, theta 1e6) saved at PP=2 with VPP=2; the vocabulary (300) is
padded to 384. Proof of correctness is not a round trip: ``transformers`` loads the export and its
logits must equal those of megatron-core's own GPTModel (built by trainer/model.py in a separate
single-process gloo world) loaded from the same checkpoint by megatron's own loader. Negative
controls show the comparison sees a missing RoPE scaling or a wrong QKV-bias layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT, HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

LOGITS_TOL = 1e-5  # fp32 on CPU; measured max |HF - megatron| 6.0e-7 (Llama), 4.8e-7 (Qwen2); controls 0.05, 0.24
VOCAB = 300  # padded to 384 by make_vocab_size_divisible_by=128
STEP = 3
TRAIN = ["training.precision=fp32", "checkpoint.enabled=true", f"training.train_steps={STEP}",
         f"model.vocab_size={VOCAB}", "training.lr=0.02", "model.init_method_std=0.05"]  # weights well off init
LLAMA = ["model.rope_theta=500000", "model.rope_scaling_factor=8.0", "model.rope_scaling_original_max_position=64",
         "parallelism.tp=2"]
QWEN2 = ["model.qkv_bias=true", "model.tie_embeddings=true", "model.hf_architecture=Qwen2ForCausalLM",
         "model.norm_eps=1e-6", "model.rope_theta=1e6", "parallelism.pp=2", "parallelism.vpp=2"]
# every test here exports a checkpoint the trainer wrote under torchrun (module fixtures: two runs in all)
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _train(run_dir: Path, overrides: list[str]) -> Path:
    from ckpt_harness import run

    run(run_dir, 2, [*TRAIN, f"checkpoint.dir={run_dir / 'checkpoints'}", *overrides], timeout=180)
    return run_dir


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("llama_tp2"), LLAMA)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("qwen2_pp2_vpp2"), QWEN2)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("tokens") / "tokens.pt"
    torch.save(torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(7)), path)
    return path


def step_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEP:08d}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "checkpointing.export_hf", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def megatron_logits(step: Path, tokens: Path, out: Path) -> Any:
    """Logits of megatron's GPTModel loaded from ``step`` by megatron, in a process of its own."""
    import torch

    proc = subprocess.run([sys.executable, __file__, "megatron-logits", str(step), str(tokens), str(out)], cwd=ROOT,
                          text=True, capture_output=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT),
                                                                                OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def hf_logits(model_dir: Path, tokens: Path, *, edit: Any = None, config_edit: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if config_edit is not None:  # a negative control on a copy
        copy = model_dir.parent / f"{model_dir.name}-edited"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(model_dir, copy)
        config = json.loads((copy / "config.json").read_text())
        config_edit(config)
        (copy / "config.json").write_text(json.dumps(config))
        model_dir = copy
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    with torch.no_grad():
        if edit is not None:
            edit(model)
        return model(torch.load(tokens)).logits


def max_diff(a: Any, b: Any) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- parity with megatron


def test_llama_tp2_export_matches_megatron(llama_run: Path, tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    done = cli("--checkpoint", str(llama_run), "--output", str(out), "--dtype", "fp32")  # a run dir: newest step
    assert done.returncode == 0, done.stderr
    assert f"step_{STEP:08d}" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert (config["rope_theta"], config["vocab_size"], config["head_dim"], config["num_key_value_heads"]) == \
        (500000.0, VOCAB, 16, 2)
    assert config["tie_word_embeddings"] is False and config["attention_bias"] is False
    assert config["torch_dtype"] == "float32" and config["rms_norm_eps"] == 1e-5

    reference = megatron_logits(step_dir(llama_run), tokens, tmp_path / "ref.pt")
    assert reference.shape[-1] == VOCAB  # the padded columns (masked by the trainer's hook) are cut
    diff = max_diff(hf_logits(out, tokens), reference)
    print(f"max |HF - megatron| logits = {diff:.3g} (tolerance {LOGITS_TOL})")
    assert diff <= LOGITS_TOL, f"max |HF - megatron| = {diff:.3g}"
    # negative control: without the RoPE scaling the same weights give visibly different logits
    unscaled = max_diff(hf_logits(out, tokens, config_edit=lambda c: c.update(rope_scaling=None)), reference)
    print(f"negative control, no rope_scaling: {unscaled:.3g}")
    assert unscaled > 100 * LOGITS_TOL, unscaled


def test_qwen2_pp2_vpp2_tied_export_matches_megatron(qwen_run: Path, tokens: Path, tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from checkpointing.export_hf import export_step

    out = tmp_path / "hf"
    report = export_step(str(step_dir(qwen_run)), str(out), dtype="fp32", max_shard_bytes=10**9, say=print)
    assert report.step == STEP and report.weight_files == ["model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("model.embed_tokens.weight").shape == (VOCAB, 64)  # padding stripped
    assert "lm_head.weight" not in names and "model.layers.3.self_attn.k_proj.bias" in names
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["tie_word_embeddings"]) == \
        (["Qwen2ForCausalLM"], "qwen2", True)
    assert (config["rms_norm_eps"], config["rope_theta"], config["rope_scaling"]) == (1e-6, 1e6, None)

    reference = megatron_logits(step_dir(qwen_run), tokens, tmp_path / "ref.pt")
    diff = max_diff(hf_logits(out, tokens), reference)
    print(f"max |HF - megatron| logits = {diff:.3g} (tolerance {LOGITS_TOL})")
    assert diff <= LOGITS_TOL, f"max |HF - megatron| = {diff:.3g}"

    def plain_qkv_bias(model: Any) -> None:  # negative control: the fused bias read as [q; k; v]
        for layer in model.model.layers:
            attn = layer.self_attn
            grouped = torch.cat([torch.cat([attn.q_proj.bias.view(2, 32)[g], attn.k_proj.bias.view(2, 16)[g],
                                            attn.v_proj.bias.view(2, 16)[g]]) for g in range(2)])
            attn.q_proj.bias.copy_(grouped[:64])
            attn.k_proj.bias.copy_(grouped[64:96])
            attn.v_proj.bias.copy_(grouped[96:])

    wrong = max_diff(hf_logits(out, tokens, edit=plain_qkv_bias), reference)
    print(f"negative control, QKV bias read as [q; k; v]: {wrong:.3g}")
    assert wrong > 100 * LOGITS_TOL, wrong


# --------------------------------------------------------------------------- files, shards, streaming


def test_sharded_bf16_export_index_and_streamed_tensors(llama_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards within the limit, an index that matches the shards (read by the safetensors library),
    and every tensor equal to hf_mapping.hf_from_layer applied to whole layers read offline; the
    embedding and lm_head streamed in row blocks of 20 rows within each stored (TP-rank) chunk."""
    import torch
    from safetensors import safe_open

    from checkpointing import export_hf
    from checkpointing.dcp_reader import StepReader
    from checkpointing.export_hf import export_step

    monkeypatch.setattr(export_hf, "ROW_BLOCK_BYTES", 20 * 64 * 4)
    from checkpointing.hf_mapping import canonical, dims_from_model, hf_from_layer
    from configs.schema import ModelConfig

    limit = 100_000
    out = tmp_path / "bf16"
    report = export_step(str(step_dir(llama_run)), str(out), dtype="bf16", max_shard_bytes=limit)
    assert len(report.weight_files) >= 4
    assert report.weight_files[0] == f"model-00001-of-{len(report.weight_files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    tensors: dict[str, Any] = {}
    for name in report.weight_files:
        with safe_open(str(out / name), framework="pt") as handle:
            shard_bytes = 0
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                assert tensor.dtype == torch.bfloat16
                shard_bytes += tensor.numel() * 2
                seen[key] = name
                tensors[key] = tensor
            assert shard_bytes <= limit or len(list(handle.keys())) == 1, (name, shard_bytes)
            total += shard_bytes
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total == report.total_size
    assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 64) == tensors["lm_head.weight"].shape

    reader = StepReader(str(step_dir(llama_run)))
    model = ModelConfig(**reader.manifest.model_config)
    dims = dims_from_model(model, 384)
    for layer in range(4):
        whole = {canonical(f"decoder.layers.{layer}.{key[len('decoder.layers.'):]}").split(".", 3)[3]:
                 reader.read_layer(key, layer) for key in reader.tensors if key.startswith("decoder.layers.")}
        for name, expected in hf_from_layer(layer, whole, dims).items():
            assert torch.equal(tensors[name], expected.to(torch.bfloat16)), name
    assert reader.row_blocks("embedding.word_embeddings.weight", VOCAB, 20 * 64 * 4)[9:11] == [(180, 192), (192, 212)]
    for hf_name, key in (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
                         ("lm_head.weight", "output_layer.weight")):
        assert torch.equal(tensors[hf_name], reader.read(key)[:VOCAB].to(torch.bfloat16)), hf_name


# --------------------------------------------------------------------------- bad input


def _run_main(*args: str) -> tuple[int, str]:
    from checkpointing.export_hf import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def test_bad_input_is_one_line_and_exit_2(llama_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = cli("--checkpoint", str(llama_run), "--output", str(out))  # the real process: exit status and stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "exists and is not empty" in done.stderr and "--overwrite" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "step_00000001").mkdir()  # a step directory without a manifest: never committed
    damaged = tmp_path / "damaged" / "checkpoints"
    shutil.copytree(step_dir(llama_run), damaged / f"step_{STEP:08d}")
    metadata = damaged / f"step_{STEP:08d}" / ".metadata"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)  # same size: only reading it can tell
    truncated = tmp_path / "truncated" / "checkpoints"
    shutil.copytree(step_dir(llama_run), truncated / f"step_{STEP:08d}")
    with open(truncated / f"step_{STEP:08d}" / "__0_0.distcp", "r+b") as handle:
        handle.truncate(100)
    new = str(tmp_path / "new")
    cases = {
        "no committed step": ("--checkpoint", str(empty), "--output", new),
        "none of the steps": ("--checkpoint", str(junk), "--output", new),
        "unreadable": ("--checkpoint", str(damaged), "--output", new),
        "manifest says": ("--checkpoint", str(truncated / f"step_{STEP:08d}"), "--output", new),
        "no committed step 99": ("--checkpoint", str(llama_run), "--step", "99", "--output", new),
        "--dtype 'int8'": ("--checkpoint", str(llama_run), "--dtype", "int8", "--output", new),
        "--max-shard-size '5XB'": ("--checkpoint", str(llama_run), "--max-shard-size", "5XB", "--output", new),
        "no such directory": ("--checkpoint", str(tmp_path / "nowhere"), "--output", new),
        "--tokenizer DIR or --no-tokenizer": ("--checkpoint", str(llama_run), "--tokenizer", str(empty),
                                              "--output", new),
    }
    for expected, args in cases.items():
        code, stderr = _run_main(*args)
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (expected, code, stderr)
    assert not Path(new).exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temporary directory left


def test_checkpoint_that_does_not_fit_the_model_config(llama_run: Path, tmp_path: Path) -> None:
    import dataclasses

    from checkpointing.dcp_reader import StepReader
    from checkpointing.export_hf import ExportError, export_step
    from configs.schema import ModelConfig

    model = ModelConfig(**StepReader(str(step_dir(llama_run))).manifest.model_config)
    for change, needle in (({"ffn_hidden_size": 128}, "decoder.layers.mlp.linear_fc1.weight is [4, 352, 64], the "
                                                       "config implies [4, 256, 64]"),
                           ({"tie_embeddings": True}, "unexpected tensors output_layer.weight"),
                           ({"qkv_bias": True}, "decoder.layers.self_attention.linear_qkv.bias is missing"),
                           ({"vocab_size": 400}, "embedding.word_embeddings.weight is [384, 64]")):
        with pytest.raises(ExportError, match="does not fit the model config") as caught:
            export_step(str(step_dir(llama_run)), str(tmp_path / "x"), model=dataclasses.replace(model, **change))
        assert needle in str(caught.value)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- metadata and tokenizer


def make_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog " * 20, "hyperlaunch exports to hugging face " * 20]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(str(directory))


def test_config_from_hf_source_and_tokenizer_files(llama_run: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from checkpointing.export_hf import export_step

    tokenizer = tmp_path / "tokenizer"
    make_tokenizer(tokenizer)
    out = tmp_path / "plain"
    export_step(str(step_dir(llama_run)), str(out), tokenizer=str(tokenizer))
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # <s>, </s> in the tokenizer
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.eos_token == "</s>" and loaded.chat_template

    source = tmp_path / "source"  # the Hugging Face model the run would have started from
    source.mkdir()
    (source / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 80,
        "bos_token_id": 128000, "eos_token_id": [128001, 128009], "custom_field": "kept",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "dtype": "bfloat16"}))
    (source / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9,
                                                               "eos_token_id": [128001, 128009]}))
    out = tmp_path / "from_source"
    export_step(str(step_dir(llama_run)), str(out), hf_source=str(source), dtype="fp16")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["custom_field"]) == (64, 4, "kept")
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, [128001, 128009])
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["rope_theta"] == 5e5
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6


def test_older_manifest_reads_the_run_config(llama_run: Path, tmp_path: Path) -> None:
    """A step saved before manifests recorded model_config: the run's config.yaml supplies it."""
    from checkpointing.export_hf import main

    run = tmp_path / "run"
    shutil.copytree(step_dir(llama_run), run / "checkpoints" / f"step_{STEP:08d}")
    shutil.copy(llama_run / "config.yaml", run / "config.yaml")
    manifest_path = run / "checkpoints" / f"step_{STEP:08d}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("model_config", "tokenizer", "data"):
        manifest.pop(key)
    manifest_path.write_text(json.dumps(manifest))
    assert main(["--checkpoint", str(run), "--output", str(tmp_path / "a"), "--dtype", "fp32"]) == 0
    assert main(["--checkpoint", str(step_dir(llama_run)), "--output", str(tmp_path / "b"), "--dtype", "fp32"]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --------------------------------------------------------------------------- S3


def test_upload_export_to_s3_round_trips(llama_run: Path, tmp_path: Path, moto: Any, bucket: str) -> None:
    from checkpointing.export_hf import export_step
    from checkpointing.export_upload import upload_export
    from configs.checkpoint_config import S3Config

    out = tmp_path / "hf"
    export_step(str(step_dir(llama_run)), str(out), dtype="fp32")
    (out / "extra.bin").write_bytes(os.urandom(11 << 20))  # 3 parts of 5 MiB: the multipart path too
    cfg = S3Config(bucket=bucket, prefix="runs/x", endpoint_url=moto.endpoint, part_size_mb=5, max_concurrency=3,
                   max_attempts=3)
    keys = upload_export(str(out), cfg, STEP)
    assert keys[-1] == f"runs/x/hf_export/step_{STEP:08d}/config.json"  # last: its presence means complete
    client = moto.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/x/hf_export/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(keys)
    assert {k.rsplit("/", 1)[1] for k in keys} == {p.name for p in out.iterdir()}
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == (out / key.rsplit("/", 1)[1]).read_bytes(), key
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --------------------------------------------------------------------------- the megatron side (subprocess)


def _megatron_logits_main(step: str, tokens_path: str, out_path: str) -> None:
    """Build the trainer's GPTModel at TP=1 in a gloo world of one, load ``step`` with megatron's
    dist_checkpointing, write the logits of the first vocab_size columns."""
    import socket

    import torch

    from trainer import cpu_compat

    cpu_compat.activate()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from configs.schema import ModelConfig, ParallelismConfig
    from trainer.model import build_model, gpt_module, transformer_config

    torch.set_num_threads(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    model = ModelConfig(**json.loads(Path(step, "manifest.json").read_text())["model_config"])
    par = ParallelismConfig(distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)
    chunk = gpt_module(build_model(model, par, transformer_config(model, par, "fp32", gloo=True), seed=99)[0])
    before = {k: v.clone() for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor)}
    loaded = dist_checkpointing.load(chunk.sharded_state_dict(), step, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    result = chunk.load_state_dict(loaded, strict=False)
    if result.missing_keys:
        raise SystemExit(f"megatron load left {result.missing_keys} unloaded")
    changed = [k for k, v in chunk.state_dict().items() if k in before and not torch.equal(before[k], v)]
    if not changed:
        raise SystemExit("megatron's load changed no parameter")
    chunk.eval()
    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = chunk(tokens, positions, attention_mask=None)
    torch.save(logits[..., : model.vocab_size].contiguous(), out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["megatron-logits"]:
        _megatron_logits_main(*sys.argv[2:5])

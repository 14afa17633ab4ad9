"""Bad input for the Hugging Face workflow: one clear message each, exit 2, nothing written.

Through the real CLI (``python -m launcher``) with real HF models and tokenizers built locally.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e import launcher
from tests.hf_assets import make_chat_tokenizer
from tests.hf_models import make_llama, make_qwen2

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    llama = make_llama(root / "llama")
    bad_shape = root / "bad_shape"
    shutil.copytree(llama, bad_shape)
    config = json.loads((bad_shape / "config.json").read_text())
    (bad_shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    empty = root / "empty"
    empty.mkdir()
    return {"llama": llama, "qwen2": make_qwen2(root / "qwen2"), "bad_shape": bad_shape, "gpt2": gpt2,
            "empty": empty, "no_markers": Path(make_chat_tokenizer(root / "tok", generation_markers=False)),
            "chat": Path(make_chat_tokenizer(root / "tok_ok"))}


def refused(tmp_path: Path, *overrides: str) -> str:
    runs = tmp_path / "runs"
    proc = launcher("config=tiny_local", f"runs_root={runs}", *overrides)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not runs.exists() or not any(runs.iterdir()), "nothing may be written"
    return proc.stderr


def test_not_a_hugging_face_directory(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, "model=hf", f"model.hf_path={assets['empty']}")
    assert f"model.hf_path = '{assets['empty']}': has no config.json" in err


def test_unsupported_architecture(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, "model=hf", f"model.hf_path={assets['gpt2']}")
    assert "architectures=['GPT2LMHeadModel'] is not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM" in err


def test_override_contradicting_config_json_names_both(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, "model=hf", f"model.hf_path={assets['llama']}", "model.num_layers=6")
    assert "model.num_layers = 6: contradicts" in err and "(num_layers = 4)" in err


def test_model_from_hf_fills_every_field(tmp_path: Path, assets: dict[str, Path]) -> None:
    proc = launcher("config=tiny_local", "model=hf", f"model.hf_path={assets['qwen2']}", "dry_run=true",
                    f"runs_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    config = next(tmp_path.glob("*/config.yaml")).read_text()
    for line in ("qkv_bias: true", "tie_embeddings: true", "rope_theta: 1000000.0", "norm_eps: 1.0e-06",
                 "hf_architecture: Qwen2ForCausalLM", "num_query_groups: 2", "vocab_size: 300", "name: qwen2"):
        assert line in config, line


def test_init_from_weights_that_do_not_fit_the_model(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, f"checkpoint.init_from={assets['qwen2']}")  # the tiny Llama preset
    assert "model.qkv_bias = False: contradicts" in err and "checkpoint.init_from=" in err


def test_init_from_tensor_shapes_that_do_not_fit(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, "model=hf", f"model.hf_path={assets['bad_shape']}", f"checkpoint.init_from={assets['bad_shape']}")
    assert "tensor model.layers.0.mlp.down_proj.weight has shape [64, 176], the model config needs [64, 192]" in err


def test_init_from_something_else(tmp_path: Path, assets: dict[str, Path]) -> None:
    err = refused(tmp_path, f"checkpoint.init_from={assets['empty']}")
    assert "is neither a Hugging Face model directory" in err


def test_negative_blend_weight(tmp_path: Path) -> None:
    err = refused(tmp_path, "training.data.source=indexed", "training.data.blend=[{path:/data/a,weight:-1}]")
    assert "training.data.blend[0].weight = -1" in err and "positive number" in err


def test_chat_template_without_assistant_markers(tmp_path: Path, assets: dict[str, Path]) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    err = refused(tmp_path, "training.data.source=sft", f"training.data.blend=[{{path:{chat}}}]",
                  f"training.data.tokenizer={assets['no_markers']}", "model.vocab_size=512")
    assert "training.data.tokenizer" in err and "no {% generation %} markers" in err

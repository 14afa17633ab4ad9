"""Weighted blends of indexed sources, validation per source, and provenance in the checkpoint manifest.

Real megatron-core datasets over .bin/.idx files written by ``python -m trainer.tokenize``, the real
trainer under torchrun (CPU, gloo).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from trainer_harness import REPO_ROOT, train

sys.path.insert(0, str(REPO_ROOT))
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
VALIDATION = re.compile(r"^validation step=(\d+) val_loss=(\S+) val_ppl=(\S+)(.*)$", re.M)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trainer.tokenize import ByteTokenizer, tokenize_files

    root = tmp_path_factory.mktemp("corpora")
    documents = {"prose": [f"line {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(200)],
                 "code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 4 for i in range(200)]}
    prefixes = {}
    for name, docs in documents.items():
        source = root / f"{name}.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prefixes[name] = root / name
        tokenize_files([source], str(prefixes[name]), ByteTokenizer())
    return prefixes


def blend(corpora: dict[str, Path]) -> str:
    return (f"training.data.blend=[{{path:{corpora['prose']},weight:3,name:prose}},"
            f"{{path:{corpora['code']},weight:1,name:code}}]")


def test_idx_reader_matches_megatron(corpora: dict[str, Path]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from trainer.indexed import read_idx

    for prefix in corpora.values():
        dataset = IndexedDataset(str(prefix))
        docs, tokens = read_idx(str(prefix))
        assert docs == len(dataset.document_indices) - 1
        assert tokens == int(dataset.sequence_lengths.sum())


def test_validation_per_source_never_changes_training(tmp_path: Path, corpora: dict[str, Path]) -> None:
    base = ["training.train_steps=6", "training.data.source=indexed", blend(corpora), "training.data.split='90,10,0'",
            "training.precision=fp32", "checkpoint.enabled=true"]
    with_eval = train(tmp_path / "eval", 1, [*base, "training.eval_interval=2", "training.eval_iters=1"])
    without = train(tmp_path / "plain", 1, base)
    assert with_eval.losses == without.losses  # bit for bit: validation is forward only and restores the RNG
    passes = VALIDATION.findall(with_eval.stdout)
    assert [int(p[0]) for p in passes] == [2, 4, 6]
    for step, loss, ppl, rest in passes:
        per_source = dict(re.findall(r"val_loss\[(\w+)\]=(\S+)", rest))
        assert set(per_source) == {"prose", "code"}
        assert float(ppl) == pytest.approx(2.718281828 ** float(loss), rel=1e-3)
        low, high = sorted(float(v) for v in per_source.values())
        assert low - 1e-4 <= float(loss) <= high + 1e-4  # overall = token-weighted mean of the sources
    assert float(passes[-1][1]) < float(passes[0][1])  # it learns


def test_a_split_without_documents_is_refused(tmp_path: Path, corpora: dict[str, Path]) -> None:
    from trainer_harness import run_trainer, write_config

    from trainer.tokenize import ByteTokenizer, tokenize_files

    one = tmp_path / "one.txt"
    one.write_text("a single document\n" * 50)
    tokenize_files([one], str(tmp_path / "one"), ByteTokenizer())
    config = write_config(tmp_path / "run", ["training.train_steps=2", "training.data.source=indexed",
                                             f"training.data.blend=[{{path:{tmp_path / 'one'}}}]",
                                             "training.data.split='90,10,0'"])
    run = run_trainer(config, None, timeout_s=60)
    assert run.returncode == 2, run.describe()
    assert "has 1 document(s): the validation share" in run.stderr


def test_blend_weights_and_manifest_provenance(tmp_path: Path, corpora: dict[str, Path]) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, 1, ["training.train_steps=5", "training.global_batch_size=16", "training.data.source=indexed",
                       blend(corpora), "training.precision=fp32", "checkpoint.enabled=true"])
    manifest = json.loads((run_dir / "checkpoints" / "step_00000005" / "manifest.json").read_text())
    data = manifest["data"]
    assert set(data) == {"prose", "code"}
    assert data["prose"]["samples"] + data["code"]["samples"] == manifest["consumed_samples"] == 80
    assert data["prose"]["samples"] == 60 and data["code"]["samples"] == 20  # weights 3:1, megatron's blending
    assert data["prose"]["tokens"] == 60 * 64
    assert manifest["model_config"]["num_layers"] == 4

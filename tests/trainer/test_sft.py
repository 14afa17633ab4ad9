"""SFT data with a real BPE tokenizer and chat template (tests/hf_assets.py): masks, errors, the
prepared format, splits, packing, blending, multi-process preparation."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trainer_harness  # noqa: F401  (puts the repo root on sys.path)
from configs.errors import ConfigError
from configs.schema import BlendSource, DataConfig, TrainingConfig
from tests.hf_assets import EOT, make_chat_tokenizer
from trainer.sft import SFTSource, build_sft_source
from trainer.sft_pack import Blend, split_conversations
from trainer.sft_prepare import ChatTokenizer, SFTDataError
from trainer.tokenize import main as tokenize_main

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
REPO = Path(__file__).resolve().parents[2]
Messages = list[dict[str, str]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat(tok_dir: str) -> ChatTokenizer:
    return ChatTokenizer(tok_dir)


def conversation(i: int, topic: str = "plus") -> Messages:
    """Varied lengths (1-3 turns, answers of 1-5 sentences), a system prompt on every third."""
    messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    for turn in range(1 + i % 3):
        messages.append({"role": "user", "content": f"What is {i} {topic} {turn}?"})
        messages.append({"role": "assistant", "content": " ".join([f"It is {i + turn}."] * (1 + (i + turn) % 5))})
    return messages


def write_jsonl(path: Path, conversations: list[Any]) -> Path:
    path.write_text("".join((c if isinstance(c, str) else json.dumps({"messages": c})) + "\n"
                            for c in conversations))
    return path


def sft_config(blend: list[BlendSource], tok: str, cache: Path, *, seq: int = 256, split: str = "80,20,0",
               pack: bool = True, seed: int = 7) -> TrainingConfig:
    data = DataConfig(source="sft", blend=blend, split=split, tokenizer=tok, pack_sequences=pack,
                      cache_dir=str(cache), seed=seed)
    return TrainingConfig(seq_length=seq, global_batch_size=4, data=data)


def prepared(tmp_path: Path, tok: str, name: str = "chat", count: int = 60, topic: str = "plus") -> str:
    jsonl = write_jsonl(tmp_path / f"{name}.jsonl", [conversation(i, topic) for i in range(count)])
    prefix = str(tmp_path / "data" / name)
    assert tokenize_main(["--sft", "--input", str(jsonl), "--tokenizer", tok, "--output-prefix", prefix]) == 0
    return prefix


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# ---------------------------------------------------------------------------- masks


def test_mask_covers_exactly_the_assistant_replies_and_their_end_of_turn(chat: ChatTokenizer) -> None:
    messages = conversation(2)  # three turns
    ids, mask = chat.encode(messages, "test")
    replies = [m["content"] + EOT for m in messages if m["role"] == "assistant"]
    assert len(replies) == 3
    decoded = [chat.hf.decode(ids[a:b].tolist()) for a, b in runs(mask)]
    assert decoded == replies
    everything = chat.hf.decode(ids.tolist())
    assert everything.count(EOT) == len(messages)  # user turns end with <|eot_id|> too, outside the mask


# ---------------------------------------------------------------------------- bad input


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(SFTDataError, match="tokenizer directory not found: .*nowhere"):
        ChatTokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SFTDataError, match="no tokenizer files"):
        ChatTokenizer(str(tmp_path / "empty"))
    no_template = make_chat_tokenizer(tmp_path / "plain", template="")
    with pytest.raises(SFTDataError, match="has no chat template"):
        ChatTokenizer(no_template)
    no_markers = make_chat_tokenizer(tmp_path / "nomarkers", generation_markers=False)
    with pytest.raises(SFTDataError, match=r"has no \{% generation %\} markers.*all zeros"):
        ChatTokenizer(no_markers)


def test_masks_that_come_out_all_zeros_or_all_ones_are_errors(tmp_path: Path, chat: ChatTokenizer) -> None:
    with pytest.raises(SFTDataError, match="chat.jsonl line 4: the loss mask is all zeros: it has no assistant turn"):
        chat.encode([{"role": "user", "content": "hello"}], "chat.jsonl line 4")
    hollow = make_chat_tokenizer(tmp_path / "hollow", template=(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% generation %}{% endgeneration %}{% endfor %}"))
    with pytest.raises(SFTDataError, match="all zeros: the template marked no assistant tokens"):
        ChatTokenizer(hollow).encode(conversation(1), "x")
    greedy = make_chat_tokenizer(tmp_path / "greedy", template=(
        "{% generation %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}{% endgeneration %}"))
    with pytest.raises(SFTDataError, match="all ones"):
        ChatTokenizer(greedy).encode(conversation(1), "x")


@pytest.mark.parametrize("line,message", [
    ('{bad json', "bad.jsonl line 2: not valid JSON"),
    ('{"text": "hi"}', "bad.jsonl line 2: no 'messages' field (found: text)"),
    ('{"messages": []}', "bad.jsonl line 2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', "bad.jsonl line 2: message 0 must be an object with a string"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}',
     "bad.jsonl line 2: message 0 has role 'bot'; the chat template knows system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "bad.jsonl line 2: the loss mask is all zeros"),
])
def test_bad_lines_exit_2_naming_file_and_line_and_write_nothing(
        tmp_path: Path, tok_dir: str, capsys: pytest.CaptureFixture[str], line: str, message: str) -> None:
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [conversation(0), line, conversation(1)])
    out = tmp_path / "out"
    assert tokenize_main(["--sft", "--input", str(jsonl), "--tokenizer", tok_dir,
                          "--output-prefix", str(out / "chat")]) == 2
    assert message in capsys.readouterr().err
    assert list(out.iterdir()) == []  # no half-written files, not even temporary ones


def test_cli_usage_errors(tmp_path: Path, tok_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = write_jsonl(tmp_path / "c.jsonl", [conversation(0)])
    assert tokenize_main(["--sft", "--input", str(jsonl), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "--sft needs --tokenizer" in capsys.readouterr().err
    assert tokenize_main(["--sft", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", tok_dir,
                          "--output-prefix", str(tmp_path / "o")]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert not any(tmp_path.glob("o*"))


# ---------------------------------------------------------------------------- prepared format


def test_prepare_round_trip(tmp_path: Path, tok_dir: str, chat: ChatTokenizer) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    convs = [conversation(i) for i in range(12)]
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [*convs[:5], "", *convs[5:]])  # a blank line is skipped
    prefix = str(tmp_path / "data" / "chat")
    assert tokenize_main(["--sft", "--input", str(jsonl), "--tokenizer", tok_dir, "--output-prefix", prefix]) == 0
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
    docs = np.load(prefix + ".docs.npy")
    meta = json.loads(Path(prefix + ".sft.json").read_text())
    assert len(tokens) == len(masks) == len(docs) == meta["conversations"] == 12
    for i, messages in enumerate(convs):
        ids, mask = chat.encode(messages, "")
        assert tokens[i].tolist() == ids.tolist() and masks[i].tolist() == mask.tolist()
        assert docs[i, 1] == (i + 1 if i < 5 else i + 2) and docs[i, 2] == mask[1:].sum()
    assert meta["tokens"] == sum(len(tokens[i]) for i in range(12))
    assert meta["tokenizer_fingerprint"] == chat.fingerprint and meta["vocab_size"] == 512

    # several processes write the same files; --max-length drops (and counts) the long conversations
    limit = int(np.median(tokens.sequence_lengths))
    again = str(tmp_path / "data" / "again")
    assert tokenize_main(["--sft", "--input", str(jsonl), "--tokenizer", tok_dir, "--output-prefix", again,
                          "--workers", "2"]) == 0
    for suffix in (".bin", ".idx", ".mask.bin", ".mask.idx", ".docs.npy"):
        assert Path(prefix + suffix).read_bytes() == Path(again + suffix).read_bytes()
    short = str(tmp_path / "data" / "short")
    assert tokenize_main(["--sft", "--input", str(jsonl), "--tokenizer", tok_dir, "--output-prefix", short,
                          "--max-length", str(limit)]) == 0
    kept = json.loads(Path(short + ".sft.json").read_text())
    assert kept["dropped_too_long"] == int((tokens.sequence_lengths > limit).sum()) > 0
    assert kept["conversations"] + kept["dropped_too_long"] == 12


# ---------------------------------------------------------------------------- samples


def epoch_samples(source: SFTSource) -> list[dict[str, np.ndarray]]:
    corpus = source.corpora[0]
    corpus.index.epoch(0)
    return [source.sample(k) for k in range(corpus.index._starts[1])]


def test_packed_samples_keep_conversations_apart(tmp_path: Path, tok_dir: str) -> None:
    prefix = prepared(tmp_path, tok_dir)
    packed = build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c", seq=256), 512)
    plain = build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c", seq=256, pack=False), 512)
    packed_epoch, plain_epoch = epoch_samples(packed), epoch_samples(plain)
    assert len(plain_epoch) == 48 and len(packed_epoch) < len(plain_epoch) / 2  # 80% of 60 conversations
    for s in packed_epoch:
        assert {k: len(v) for k, v in s.items()} == dict.fromkeys(
            ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"), 256)
        seg, pos, loss = s["segment_ids"], s["position_ids"], s["loss_mask"].astype(bool)
        starts = np.flatnonzero(np.diff(np.concatenate([[-1], seg])))
        assert (pos[starts] == 0).all() and (np.diff(pos)[np.diff(seg) == 0] == 1).all()
        assert (seg[starts] == np.arange(len(starts))).all()
        bos = np.flatnonzero(s["tokens"] == 0)  # every conversation starts with BOS; the padding need not
        assert set(bos) <= set(starts) and set(starts) - set(bos) <= {starts[-1]}
        # a counted label is the next token of the same conversation
        k = np.flatnonzero(loss)
        assert k.max() < 255 and (seg[k + 1] == seg[k]).all() and (s["labels"][k] == s["tokens"][k + 1]).all()
    for s in plain_epoch:
        assert "segment_ids" not in s and len(s["tokens"]) == 256

    def counted(samples: list[dict[str, np.ndarray]]) -> collections.Counter[int]:
        return collections.Counter(t for s in samples for t in s["labels"][s["loss_mask"] > 0].tolist())

    assert counted(packed_epoch) == counted(plain_epoch)
    assert sum(counted(packed_epoch).values()) == packed.consumption(len(packed_epoch))["chat"]["tokens"]
    assert packed.consumption(len(packed_epoch)) == {"chat": {"samples": len(packed_epoch),
                                                              "tokens": plain.consumption(48)["chat"]["tokens"]}}


def test_epochs_wrap_with_a_new_shuffle(tmp_path: Path, tok_dir: str) -> None:
    prefix = prepared(tmp_path, tok_dir, count=20)
    source = build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c", pack=False), 512)
    first = [source.sample(k)["tokens"].tobytes() for k in range(16)]
    second = [source.sample(k)["tokens"].tobytes() for k in range(16, 32)]
    assert sorted(first) == sorted(second) and first != second and len(set(first)) == 16
    assert source.consumption(32)["chat"]["tokens"] == 2 * source.consumption(16)["chat"]["tokens"]
    later = build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c", pack=False), 512)
    assert later.sample(100)["tokens"].tobytes() == source.sample(100)["tokens"].tobytes()


def test_splits_are_disjoint(tmp_path: Path, tok_dir: str) -> None:
    for count in (1, 7, 100, 1001):
        parts = split_conversations(count, (0.7, 0.2, 0.1), seed=3)
        together = np.concatenate(parts)
        assert sorted(together.tolist()) == list(range(count))
        assert abs(len(parts[1]) - 0.2 * count) <= 1
    prefix = prepared(tmp_path, tok_dir)
    blend = [BlendSource(path=prefix)]
    train = build_sft_source(sft_config(blend, tok_dir, tmp_path / "c", pack=False), 512, split=0)
    valid = build_sft_source(sft_config(blend, tok_dir, tmp_path / "c", pack=False), 512, split=1)
    seen_train = {train.sample(k)["tokens"].tobytes() for k in range(48)}
    seen_valid = {valid.sample(k)["tokens"].tobytes() for k in range(30)}  # wraps past its 12
    assert len(seen_train) == 48 and len(seen_valid) == 12 and not seen_train & seen_valid
    with pytest.raises(ConfigError, match="leaves none of the 60 conversations of 'chat' for validation"):
        build_sft_source(sft_config(blend, tok_dir, tmp_path / "c", split="100,0,0"), 512, split=1)


def test_blend_follows_the_weights(tmp_path: Path, tok_dir: str) -> None:
    blend = Blend([1.0, 2.0, 5.0])
    for n in (8, 80, 8000, 20001):
        assert np.abs(blend.counts(n) - n * np.array([1, 2, 5]) / 8).max() <= 1
    prefixes = [prepared(tmp_path, tok_dir, name, count=30, topic=topic)
                for name, topic in (("a", "plus"), ("b", "minus"))]
    cfg = sft_config([BlendSource(path=prefixes[0], weight=1), BlendSource(path=prefixes[1], weight=3, name="B")],
                     tok_dir, tmp_path / "c", pack=False)
    source = build_sft_source(cfg, 512)
    chat = ChatTokenizer(tok_dir)
    minus = [" minus " in chat.hf.decode(source.sample(i)["tokens"].tolist()) for i in range(400)]
    assert sum(minus) == 300
    use = source.consumption(400)
    assert {k: v["samples"] for k, v in use.items()} == {"a": 100, "B": 300}
    assert use["B"]["tokens"] == sum(int(source.sample(i)["loss_mask"].sum()) for i in range(400) if minus[i])


DIGEST = """
import hashlib, sys
from configs.schema import BlendSource, DataConfig, TrainingConfig
from trainer.sft import build_sft_source
prefix, tok, cache = sys.argv[1:4]
data = DataConfig(source="sft", blend=[BlendSource(path=prefix)], split="80,20,0", tokenizer=tok, cache_dir=cache,
                  seed=7)
source = build_sft_source(TrainingConfig(seq_length=256, data=data), 512)
digest = hashlib.sha256()
for i in range(0, 200, 3):
    for value in source.sample(i).values():
        digest.update(value.tobytes())
print(digest.hexdigest(), source.consumption(200))
"""


def test_samples_are_the_same_in_another_process(tmp_path: Path, tok_dir: str) -> None:
    prefix = prepared(tmp_path, tok_dir)
    runs_ = [subprocess.run([sys.executable, "-c", DIGEST, prefix, tok_dir, str(tmp_path / "c")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": str(s)})
             for s in (1, 2)]
    assert all(r.returncode == 0 for r in runs_), runs_[0].stderr
    source = build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c"), 512)
    digest = hashlib.sha256()
    for i in range(0, 200, 3):
        for value in source.sample(i).values():
            digest.update(value.tobytes())
    assert runs_[0].stdout == runs_[1].stdout == f"{digest.hexdigest()} {source.consumption(200)}\n"


# ---------------------------------------------------------------------------- sources in the config


def test_source_errors(tmp_path: Path, tok_dir: str) -> None:
    prefix = prepared(tmp_path, tok_dir)
    with pytest.raises(ConfigError) as info:
        build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c", seq=40), 512)
    text = str(info.value)
    assert "training.data.blend[0].path" in text and "longer than training.seq_length=40 tokens" in text
    assert "chat.jsonl line " in text and "--max-length 40" in text
    other = make_chat_tokenizer(tmp_path / "other", vocab_size=400)
    with pytest.raises(ConfigError, match="was tokenized with .* which differs from training.data.tokenizer"):
        build_sft_source(sft_config([BlendSource(path=prefix)], other, tmp_path / "c"), 512)
    with pytest.raises(ConfigError, match="holds token id 5.. but the model's vocabulary has 300"):
        build_sft_source(sft_config([BlendSource(path=prefix)], tok_dir, tmp_path / "c"), 300)
    with pytest.raises(ConfigError, match=r"no .*nothing\.sft\.json"):
        build_sft_source(sft_config([BlendSource(path=str(tmp_path / "nothing"))], tok_dir, tmp_path / "c"), 512)
    with pytest.raises(ConfigError, match="training.data.tokenizer"):
        build_sft_source(sft_config([BlendSource(path=prefix)], str(tmp_path / "none"), tmp_path / "c"), 512)
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(0), "{oops"])
    with pytest.raises(ConfigError, match="bad.jsonl line 2: not valid JSON"):
        build_sft_source(sft_config([BlendSource(path=str(bad))], tok_dir, tmp_path / "c"), 512)


def test_jsonl_is_prepared_once_into_the_run_cache(tmp_path: Path, tok_dir: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(30)])
    monkeypatch.setenv("HYPERLAUNCH_RUN_DIR", str(tmp_path / "run"))
    cfg = sft_config([BlendSource(path=str(jsonl))], tok_dir, tmp_path, seq=128)
    cfg.data.cache_dir = None
    first = build_sft_source(cfg, 512)
    made = sorted((tmp_path / "run" / "data_cache" / "sft").iterdir())
    assert [p.name.split(".", 1)[1] for p in made] == ["bin", "docs.npy", "idx", "mask.bin", "mask.idx", "sft.json"]
    stamps = [p.stat().st_mtime_ns for p in made]
    second = build_sft_source(cfg, 512)
    assert [p.stat().st_mtime_ns for p in made] == stamps  # reused
    assert first.sample(5)["tokens"].tolist() == second.sample(5)["tokens"].tolist()
    write_jsonl(jsonl, [conversation(i) for i in range(31)])
    build_sft_source(cfg, 512)
    assert len(list((tmp_path / "run" / "data_cache" / "sft").glob("*.sft.json"))) == 2  # changed: prepared anew


RANK = """
import os, sys, torch.distributed as dist
from configs.errors import ConfigError
from configs.schema import BlendSource, DataConfig, TrainingConfig
from trainer.sft import build_sft_source
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[4]}", rank=int(sys.argv[5]), world_size=2)
data = DataConfig(source="sft", blend=[BlendSource(path=sys.argv[1])], split="90,10,0", tokenizer=sys.argv[2],
                  cache_dir=sys.argv[3])
try:
    print(build_sft_source(TrainingConfig(seq_length=256, data=data), 512).sample(3)["tokens"].sum())
except ConfigError as exc:
    print("error", str(exc).splitlines()[-1])
dist.destroy_process_group()
"""


@pytest.mark.parametrize("good", [True, False])
def test_ranks_wait_for_rank_0_to_prepare(tmp_path: Path, tok_dir: str, good: bool) -> None:
    lines = [conversation(i) for i in range(40)] + ([] if good else ["{oops"])
    jsonl = write_jsonl(tmp_path / "chat.jsonl", lines)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(jsonl), tok_dir, str(tmp_path / "c"), port, str(r)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    preparing, result = outs[0][0].splitlines()
    assert preparing.startswith("preparing SFT data") and outs[1][0] == result + "\n"  # rank 0 alone prepares
    if good:
        assert result.isdigit()
        assert len(list((tmp_path / "c" / "sft").glob("*.sft.json"))) == 1
    else:
        assert "chat.jsonl line 41: not valid JSON" in result
        assert not list((tmp_path / "c" / "sft").iterdir())

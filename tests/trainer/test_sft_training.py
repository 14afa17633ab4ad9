"""SFT through the real trainer: packed and unpacked training give the same losses.

Conversations of one token length L are packed two per sequence of 2L tokens (first fit keeps
their order), so a packed step of G sequences and an unpacked step of 2G sequences (one
conversation each, padded) train on exactly the same assistant tokens. With attention kept
inside each conversation, positions restarting, and the loss summed over loss-bearing tokens and
divided by their global count, the two runs must print the same losses (fp32; tolerance 2e-4
on the 4-decimal log line). Without the block-diagonal mask the packed run differs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainer_harness import REPO_ROOT, train

sys.path.insert(0, str(REPO_ROOT))
from tests.hf_assets import make_chat_tokenizer  # noqa: E402

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
STEPS = 4


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, int]:
    """(tokenizer dir, chat.jsonl of equal-length conversations, their length, vocabulary size)."""
    from trainer.sft_prepare import ChatTokenizer

    root = tmp_path_factory.mktemp("sft")
    tok_dir = Path(make_chat_tokenizer(root / "tokenizer"))
    tokenizer = ChatTokenizer(str(tok_dir))
    candidates = []
    for i in range(400):
        messages = [{"role": "user", "content": f"What is {i} plus {i % 17}?"},
                    {"role": "assistant", "content": f"It is {i + i % 17}, thank you!"}]
        ids, _ = tokenizer.encode(messages, f"candidate {i}")
        candidates.append((len(ids), messages))
    length, _ = Counter(n for n, _ in candidates).most_common(1)[0]
    chosen = [m for n, m in candidates if n == length][:64]
    assert len(chosen) == 64, "need 64 conversations of one length"
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chosen))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    return tok_dir, data, length, vocab


def sft_overrides(chat: tuple[Path, Path, int, int], *, packed: bool, run_dir: Path) -> list[str]:
    tok_dir, data, length, vocab = chat
    return [f"training.train_steps={STEPS}", "training.data.source=sft", f"training.data.blend=[{{path:{data}}}]",
            f"training.data.tokenizer={tok_dir}", "training.data.split='100,0,0'", f"training.seq_length={2 * length}",
            f"training.data.pack_sequences={str(packed).lower()}", f"training.global_batch_size={4 if packed else 8}",
            f"training.micro_batch_size={2 if packed else 4}", f"model.vocab_size={vocab}", "training.precision=fp32",
            f"training.data.cache_dir={run_dir.parent / 'cache'}", "training.lr_warmup_steps=0"]


def test_packed_and_unpacked_training_give_the_same_losses(tmp_path: Path,
                                                           chat: tuple[Path, Path, int, int]) -> None:
    packed = train(tmp_path / "packed", 2, sft_overrides(chat, packed=True, run_dir=tmp_path / "packed"))
    unpacked = train(tmp_path / "unpacked", 2, sft_overrides(chat, packed=False, run_dir=tmp_path / "unpacked"))
    assert packed.losses == pytest.approx(unpacked.losses, abs=2e-4), (packed.losses, unpacked.losses)
    assert packed.losses[-1] < packed.losses[0]

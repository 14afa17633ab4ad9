"""Real Hugging Face assets built locally for the tests (no downloads).

``make_chat_tokenizer(dir)`` trains a byte-level BPE tokenizer with ``tokenizers`` on a few KB of
text written here, wraps it in ``transformers.PreTrainedTokenizerFast`` with Llama-3-style special
tokens and chat template, and ``save_pretrained``s it: ``AutoTokenizer.from_pretrained(dir)`` loads
it like a downloaded model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOT, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, PAD, HEADER_START, HEADER_END]
ROLES = ("system", "user", "assistant")

# Llama 3's layout: every turn is header + content + <|eot_id|>. Assistant content and its
# <|eot_id|> sit inside {% generation %}, so the model is trained to end its turn.
_TURN = "{{- '" + HEADER_START + "' + message['role'] + '" + HEADER_END + "\\n\\n' }}"
_CHECK_ROLE = ("{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
               "{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}")
_GENERATION_PROMPT = ("{%- if add_generation_prompt %}{{- '" + HEADER_START + "assistant" + HEADER_END
                      + "\\n\\n' }}{%- endif %}")


def chat_template(generation_markers: bool = True) -> str:
    assistant = "{{- message['content'] | trim + '" + EOT + "' }}"
    if generation_markers:
        assistant = "{%- generation %}" + assistant + "{%- endgeneration %}"
    return ("{{- bos_token }}{%- for message in messages %}" + _CHECK_ROLE + _TURN
            + "{%- if message['role'] == 'assistant' %}" + assistant
            + "{%- else %}{{- message['content'] | trim + '" + EOT + "' }}{%- endif %}"
            + "{%- endfor %}" + _GENERATION_PROMPT)


def training_text() -> str:
    """A few KB of varied English: enough for a BPE with a few hundred merges."""
    subjects = ["The model", "A student", "Our cluster", "The tokenizer", "Every rank", "The scheduler",
                "A checkpoint", "The optimizer", "This dataset", "The assistant"]
    verbs = ["reads", "writes", "trains on", "answers", "checks", "packs", "splits", "counts", "loads", "saves"]
    objects = ["the conversation", "a long sequence", "three questions", "every document", "the loss mask",
               "its own shard", "the next token", "a weighted blend", "the validation set", "clear messages"]
    lines = []
    for i in range(300):
        s, v, o = subjects[i % 10], verbs[(i * 3) % 10], objects[(i * 7) % 10]
        lines.append(f"{s} {v} {o}. What is {i} plus {i % 17}? It is {i + i % 17}, thank you!")
    return "\n".join(lines)


def make_chat_tokenizer(directory: str | Path, *, generation_markers: bool = True, vocab_size: int = 512,
                        template: str | None = None) -> str:
    """Train and save a real HF tokenizer with a Llama-3-style chat template; returns the directory.

    ``generation_markers=False`` leaves ``{% generation %}`` out; ``template`` replaces the template
    (``""``: none at all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([training_text()], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                  additional_special_tokens=[EOS, HEADER_START, HEADER_END])
    tok.chat_template = chat_template(generation_markers) if template is None else (template or None)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return str(path)

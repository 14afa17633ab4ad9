"""The run's inputs, checked before anything is written or submitted: data sources and initial weights.

* Blend sources: every ``.idx`` is read (its header and sequence lengths: no token data) and a
  table per source says the tokens available, the weight, the share of the training tokens and
  the epochs that implies; ``data_report.json`` goes into the run directory. A missing source is
  a configuration error.
* ``checkpoint.init_from``: it must be a Hugging Face directory whose config.json, tensor names and
  shapes fit the model, or a checkpoint of ours -- unless the run waits on another job
  (``depends_on``), whose checkpoint may not exist yet (the ranks check it at start-up).
* ``training.data.tokenizer`` must be a directory.

On a dry run (``dry_run=true``: rendering on a laptop without ``/fsx``) these problems are
warnings, so the scripts can still be inspected; a real launch refuses them (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from configs.derived import split_documents, train_steps
from configs.errors import ConfigError, Problem
from configs.schema import RootConfig
from configs.validate import blend_name, parse_split
from trainer.indexed import read_idx

REPORT_FILE = "data_report.json"


@dataclass(frozen=True)
class SourceReport:
    name: str
    path: str
    weight: float  # normalised
    tokens_available: int | None  # in the training split; None when not known before start-up (raw .jsonl)
    documents: int | None
    train_tokens: int  # this source's share of the run's training tokens
    found: bool = True

    @property
    def epochs(self) -> float | None:
        if not self.tokens_available:
            return None
        return self.train_tokens / self.tokens_available


def data_sources(root: RootConfig) -> tuple[list[SourceReport], list[Problem]]:
    t, d = root.training, root.training.data
    if d.source == "synthetic" or not d.blend:
        return [], []
    total = sum(b.weight for b in d.blend)
    train_share = (parse_split(d.split) or (1.0, 0.0, 0.0))[0]
    train_tokens = train_steps(root) * t.global_batch_size * t.seq_length
    reports: list[SourceReport] = []
    problems: list[Problem] = []
    for i, entry in enumerate(d.blend):
        name, weight = blend_name(entry.path, entry.name), entry.weight / total
        tokens: int | None = None
        docs: int | None = None
        before = len(problems)
        if entry.path.endswith(".jsonl"):
            if not Path(entry.path).is_file():
                problems.append(Problem(f"training.data.blend[{i}].path", entry.path, "no such file"))
        elif not (Path(entry.path + ".bin").is_file() and Path(entry.path + ".idx").is_file()):
            hint = ("`python -m trainer.tokenize --sft --input chat.jsonl --tokenizer DIR --output-prefix PREFIX`, or give "
                    "the .jsonl itself" if d.source == "sft" else "`python -m trainer.tokenize --input ... --output-prefix PREFIX`")
            problems.append(Problem(f"training.data.blend[{i}].path", entry.path,
                                    f"no {entry.path}.bin/.idx pair: write them with {hint}"))
        else:
            try:
                docs, all_tokens = read_idx(entry.path)
                tokens = int(all_tokens * train_share)
                problems += split_problems(i, entry.path, docs, d.split)
            except (OSError, ValueError) as exc:
                problems.append(Problem(f"training.data.blend[{i}].path", entry.path, f"cannot read the index: {exc}"))
        reports.append(SourceReport(name, entry.path, weight, tokens, docs, int(train_tokens * weight),
                                    found=len(problems) == before))
    return reports, problems


def split_problems(index: int, path: str, documents: int, split: str) -> list[Problem]:
    """Every split with a share must get at least one document of this source (megatron loops forever
    on an empty one)."""
    shares = parse_split(split)
    if shares is None:
        return []
    ranges = split_documents(shares, documents)
    out = []
    for k, what in enumerate(("training", "validation", "test")):
        if shares[k] > 0 and ranges[k][1] <= ranges[k][0]:  # megatron builds every split with a share
            out.append(Problem(f"training.data.blend[{index}].path", path, f"has {documents} document(s): the "
                               f"{what} share of training.data.split={split!r} gets none of them; use more documents "
                               "or a larger share"))
    return out


def render_table(reports: list[SourceReport], total_tokens: int) -> str:
    lines = [f"data: {len(reports)} source(s), {total_tokens / 1e9:,.3f}B training tokens",
             f"  {'source':<24} {'weight':>7} {'available':>14} {'share':>14} {'epochs':>7}"]
    for r in reports:
        available = ("MISSING" if not r.found else "at start-up" if r.tokens_available is None
                     else f"{r.tokens_available / 1e9:,.3f}B")
        epochs = "-" if r.epochs is None else f"{r.epochs:.2f}"
        lines.append(f"  {r.name:<24} {r.weight:>7.3f} {available:>14} {r.train_tokens / 1e9:>13,.3f}B {epochs:>7}")
    return "\n".join(lines)


def check_inputs(root: RootConfig) -> tuple[dict[str, str], list[str]]:
    """(files for the run directory, messages); ConfigError on a real launch when an input is unusable."""
    messages: list[str] = []
    files: dict[str, str] = {}
    reports, problems = data_sources(root)
    if reports:
        t = root.training
        total = train_steps(root) * t.global_batch_size * t.seq_length
        messages.append(render_table(reports, total))
        over = [r for r in reports if r.epochs is not None and r.epochs > 1]
        for r in over:
            messages.append(f"note: {r.name} is repeated {r.epochs:.2f} times (its share exceeds what it holds)")
        files[REPORT_FILE] = json.dumps({"training_tokens": total, "sources": [
            {"name": r.name, "path": r.path, "weight": r.weight, "documents": r.documents,
             "tokens_available": r.tokens_available, "train_tokens": r.train_tokens, "epochs": r.epochs}
            for r in reports]}, indent=2) + "\n"
    problems += _weights_problems(root, messages)
    problems += _tokenizer_problems(root)
    if problems:
        if root.dry_run:
            messages += [f"warning (dry run; a real launch refuses it): {p}" for p in problems]
        else:
            raise ConfigError(problems)
    return files, messages


def _tokenizer_problems(root: RootConfig) -> list[Problem]:
    """The tokenizer must be a directory; for SFT its chat template must mark assistant replies."""
    d = root.training.data
    if not d.tokenizer:
        return []
    if not Path(d.tokenizer).is_dir():
        return [Problem("training.data.tokenizer", d.tokenizer, "is not a directory")]
    if d.source != "sft":
        return []
    from trainer.sft_prepare import ChatTokenizer, SFTDataError

    try:
        tokenizer = ChatTokenizer(d.tokenizer)
    except (SFTDataError, OSError, ValueError) as exc:
        return [Problem("training.data.tokenizer", d.tokenizer, str(exc))]
    if tokenizer.vocab_size > root.model.vocab_size:
        return [Problem("model.vocab_size", root.model.vocab_size, f"is smaller than the tokenizer's {tokenizer.vocab_size} "
                        f"tokens ({d.tokenizer})")]
    return []


def _weights_problems(root: RootConfig, messages: list[str]) -> list[Problem]:
    path = root.checkpoint.init_from
    if not path:
        return []
    if root.depends_on or root.cluster.dependency:
        messages.append(f"checkpoint.init_from={path}: checked when the job starts (it waits for "
                        f"{root.depends_on or root.cluster.dependency}, whose checkpoint may not exist yet)")
        return []
    from checkpointing.init_weights import check_hf_source, resolve

    try:
        source = resolve(path)
        if source.kind == "hf":
            check_hf_source(source.path, root.model)
    except ConfigError as exc:
        return list(exc.problems)
    messages.append(f"weights: {source.description} (weights only; a resume of this run's own checkpoint wins)")
    return []


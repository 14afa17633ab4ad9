"""Export a committed step to a Hugging Face model directory, offline and tensor by tensor.

    python -m checkpointing.export_hf --checkpoint <checkpoint dir | run dir | step dir> [--step N]
        --output <dir> [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]

No GPU, no process group, no megatron import. Each Hugging Face tensor is cut from one box of one
stored tensor (:mod:`checkpointing.dcp_reader`: a layer of a layer-stacked key, the gate or up
half of ``linear_fc1``, a row block of the embedding) and streamed into its planned place in a
safetensors shard (:class:`checkpointing.safetensors_io.ShardWriter`). Host memory therefore holds
one such box plus the stored chunk DCP loads to fill it (and a converted copy when ``--dtype``
differs), never a shard or the model (benchmarks/export_memory.py). Everything is written into a
temporary directory next to ``--output`` and renamed into place at the end.

Writes ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + the index),
``config.json`` (starting from the source model's when the run began from a Hugging Face
directory), ``generation_config.json`` and the run's tokenizer files. Exit status 2 on bad input
(one line naming it and the fix), 1 on an I/O failure. Library use: :func:`export_step` (the
trainer, at the end of training); uploads: checkpointing.export_upload.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from checkpointing.dcp_reader import CheckpointReadError, StepReader
from checkpointing.hf_mapping import Dims, dims_from_model, hf_shape, split_qkv
from checkpointing.hf_export_meta import (ExportError, RunInfo, copy_tokenizer, generation_config, hf_config, read_json,
                                          run_dir_above, run_info)
from checkpointing.manifest import fsync_dir, fsync_file
from checkpointing.safetensors_io import INDEX_NAME, PlannedTensor, ShardWriter, plan_shards, shard_file_names
from checkpointing.store import CheckpointStore, parse_step_name, step_name
from configs.checkpoint_config import EXPORT_DTYPES, parse_size
from configs.derived import padded_vocab_size
from configs.schema import ModelConfig

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROW_BLOCK_BYTES = 256 << 20  # embedding / lm_head are read and written in row blocks of at most this
_L = "decoder.layers."
_QKV, _PROJ = _L + "self_attention.linear_qkv.", _L + "self_attention.linear_proj.weight"
_FC1, _FC2 = _L + "mlp.linear_fc1.", _L + "mlp.linear_fc2.weight"
# the norms carry Transformer Engine names in every checkpoint megatron-core 0.16 writes; the local
# module names are accepted too
_INPUT_NORM = (_QKV + "layer_norm_weight", _L + "input_layernorm.weight")
_MLP_NORM = (_FC1 + "layer_norm_weight", _L + "pre_mlp_layernorm.weight")
_EMBED, _FINAL_NORM, _OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"




@dataclass(frozen=True)
class ExportReport:
    output: str
    step: int
    step_dir: str
    dtype: str
    tensors: int
    total_size: int  # tensor bytes, as model.safetensors.index.json records them
    weight_files: list[str]
    other_files: list[str]  # config.json, generation_config.json, tokenizer files
    seconds: float

    def summary(self) -> str:
        return (f"export_hf: {step_name(self.step)} of {os.path.dirname(self.step_dir)} -> {self.output}: "
                f"{self.tensors} tensors, {len(self.weight_files)} shard(s), {self.total_size / 2**20:.1f} MiB "
                f"{self.dtype}, {len(self.other_files)} other files, {self.seconds:.1f} s")


@dataclass(frozen=True)
class _Item:
    """One Hugging Face tensor: where it goes, and its row blocks (one block for all but the vocab)."""

    planned: PlannedTensor
    blocks: Callable[[], Iterator[torch.Tensor]]


# --------------------------------------------------------------------------- library entry


def export_step(step_dir: str, output: str, *, dtype: str = "bf16", max_shard_bytes: int = 5 * 10**9,
                model: Optional[ModelConfig] = None, tokenizer: Optional[str] = None,
                copy_tokenizer_files: bool = True, hf_source: Optional[str] = None, overwrite: bool = False,
                verify_checksums: bool = False, run_dir: Optional[str] = None,
                say: Callable[[str], None] = print) -> ExportReport:
    """Export one committed step directory to ``output`` (see the module docstring).

    ``model``/``tokenizer``/``hf_source`` default to what the step's manifest records (and, for
    steps saved before manifests recorded them, the run's ``config.yaml``: ``run_dir`` or the
    parent of the checkpoint directory). ``hf_source``: a Hugging Face model directory whose
    ``config.json`` and ``generation_config.json`` are the starting point (default
    ``model.hf_path``, else the run's ``checkpoint.init_from`` when it is one).
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if max_shard_bytes <= 0:
        raise ExportError(f"--max-shard-size {max_shard_bytes}: must be a positive size like 5GB")
    output = os.path.abspath(output)
    _check_output(output, overwrite)
    try:
        reader = StepReader(step_dir, verify_checksums=verify_checksums)
    except CheckpointReadError as exc:
        raise ExportError(str(exc)) from None
    info = run_info(reader.manifest, reader.path, run_dir, model=model, tokenizer=tokenizer,
                    with_tokenizer=copy_tokenizer_files, hf_source=hf_source, say=say)
    dims = dims_from_model(info.model, padded_vocab_size(info.model.vocab_size,
                                                         info.model.make_vocab_size_divisible_by))
    _check_fits(reader, info.model, dims)
    items = _items(reader, info.model, dims, DTYPES[dtype])

    parent, base = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.export-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weight_files, total = _write_weights(tmp, items, max_shard_bytes)
        others = _write_metadata(tmp, info, dtype)
        _check_output(output, overwrite)  # nobody wrote there meanwhile
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(output=output, step=reader.step, step_dir=reader.path, dtype=dtype, tensors=len(items),
                        total_size=total, weight_files=weight_files, other_files=others,
                        seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- what is read, in HF order


def _stored(reader: StepReader, names: tuple[str, ...]) -> str:
    return next((n for n in names if n in reader.tensors), names[0])


def _check_fits(reader: StepReader, model: ModelConfig, dims: Dims) -> None:
    """Every model tensor the checkpoint holds has the shape the config implies; nothing is left over."""
    h, d, f, L = dims.hidden, dims.head_dim, dims.ffn, dims.num_layers
    qkv_rows = (dims.heads + 2 * dims.groups) * d
    expected: dict[str, tuple[int, ...]] = {
        _stored(reader, _INPUT_NORM): (L, h), _QKV + "weight": (L, qkv_rows, h), _PROJ: (L, h, dims.heads * d),
        _stored(reader, _MLP_NORM): (L, h), _FC1 + "weight": (L, 2 * f, h), _FC2: (L, h, f), _FINAL_NORM: (h,),
        _EMBED: (dims.padded_vocab, h)}
    if dims.qkv_bias:
        expected[_QKV + "bias"] = (L, qkv_rows)
    if not dims.tied:
        expected[_OUTPUT] = (dims.padded_vocab, h)
    problems = []
    for key, shape in expected.items():
        stored = reader.tensors.get(key)
        if stored is None:
            problems.append(f"{key} is missing")
        elif key in (_EMBED, _OUTPUT) and stored.shape[1:] == shape[1:] and stored.shape[0] >= dims.vocab:
            continue  # another padding multiple is fine: rows >= vocab_size are dropped anyway
        elif stored.shape != shape:
            problems.append(f"{key} is {list(stored.shape)}, the config implies {list(shape)}")
    extra = sorted(set(reader.tensors) - set(expected))
    if extra:
        problems.append(f"unexpected tensors {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    if problems:
        described = (f"num_layers={L} hidden_size={h} ffn_hidden_size={f} num_attention_heads={dims.heads} "
                     f"num_query_groups={dims.groups} head_dim={d} vocab_size={dims.vocab} "
                     f"tie_embeddings={dims.tied} qkv_bias={dims.qkv_bias}")
        raise ExportError(f"{reader.path} does not fit the model config ({model.name}: {described}): "
                          f"{'; '.join(problems)}. Export with the model config the run trained (the manifest's "
                          "model_config or the run's config.yaml)")


def _items(reader: StepReader, model: ModelConfig, dims: Dims, dtype: torch.dtype) -> list[_Item]:
    """Every HF tensor in ``hf_mapping.hf_names`` order, each read only when the writer reaches it.

    Zero biases are added where the HF architecture has biases the model lacks (exact): Qwen2
    without QKV bias, and Llama with QKV bias, whose ``attention_bias`` also gives ``o_proj`` one.
    """
    qkv_split: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}  # q, k, v of one layer, until v is written
    input_norm, mlp_norm, f = _stored(reader, _INPUT_NORM), _stored(reader, _MLP_NORM), dims.ffn

    def item(name: str, read: Callable[[], torch.Tensor]) -> _Item:
        return _Item(PlannedTensor(name, hf_shape(name, dims), dtype), lambda: iter([_cast(read(), dtype, name)]))

    def layer(key: str, i: int, rows: Optional[tuple[int, int]] = None) -> Callable[[], torch.Tensor]:
        return lambda: reader.read_layer(key, i, rows=rows)

    def qkv(kind: str, i: int, which: int) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            if (kind, i) not in qkv_split:
                qkv_split.clear()
                qkv_split[(kind, i)] = split_qkv(reader.read_layer(_QKV + kind, i), dims)
            return qkv_split[(kind, i)][which] if which < 2 else qkv_split.pop((kind, i))[which]
        return read

    def zeros(name: str) -> Callable[[], torch.Tensor]:
        return lambda: torch.zeros(hf_shape(name, dims), dtype=dtype)

    items = [_vocab_item(reader, "model.embed_tokens.weight", _EMBED, dims, dtype)]
    zero_qkv_bias = model.hf_architecture == "Qwen2ForCausalLM" and not dims.qkv_bias
    zero_o_bias = model.hf_architecture == "LlamaForCausalLM" and dims.qkv_bias
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        items.append(item(p + "input_layernorm.weight", layer(input_norm, i)))
        items += [item(f"{p}self_attn.{x}_proj.weight", qkv("weight", i, n)) for n, x in enumerate("qkv")]
        if dims.qkv_bias or zero_qkv_bias:
            items += [item(f"{p}self_attn.{x}_proj.bias", qkv("bias", i, n) if dims.qkv_bias
                           else zeros(f"{p}self_attn.{x}_proj.bias")) for n, x in enumerate("qkv")]
        items.append(item(p + "self_attn.o_proj.weight", layer(_PROJ, i)))
        if zero_o_bias:
            items.append(item(p + "self_attn.o_proj.bias", zeros(p + "self_attn.o_proj.bias")))
        items.append(item(p + "post_attention_layernorm.weight", layer(mlp_norm, i)))
        items.append(item(p + "mlp.gate_proj.weight", layer(_FC1 + "weight", i, (0, f))))  # fc1 = [gate; up]
        items.append(item(p + "mlp.up_proj.weight", layer(_FC1 + "weight", i, (f, 2 * f))))
        items.append(item(p + "mlp.down_proj.weight", layer(_FC2, i)))
    items.append(item("model.norm.weight", lambda: reader.read(_FINAL_NORM)))
    if not dims.tied:
        items.append(_vocab_item(reader, "lm_head.weight", _OUTPUT, dims, dtype))
    return items


def _vocab_item(reader: StepReader, name: str, key: str, dims: Dims, dtype: torch.dtype) -> _Item:
    """The first ``vocab_size`` rows (the padding is never read), in row blocks of ROW_BLOCK_BYTES."""
    out_row = dims.hidden * dtype.itemsize
    stored_row = dims.hidden * reader.tensor(key).dtype.itemsize
    blocks = reader.row_blocks(key, dims.vocab, ROW_BLOCK_BYTES * stored_row // max(out_row, stored_row))
    return _Item(PlannedTensor(name, (dims.vocab, dims.hidden), dtype),
                 lambda: (_cast(reader.read_rows(key, start, stop), dtype, name) for start, stop in blocks))


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    converted = tensor.to(dtype)
    if dtype == torch.float16 and tensor.dtype != torch.float16 and not bool(torch.isfinite(converted).all()) \
            and bool(torch.isfinite(tensor).all()):
        raise ExportError(f"{name} has values beyond fp16's range (65504): export with --dtype bf16 or fp32")
    return converted


# --------------------------------------------------------------------------- writing


def _write_weights(directory: str, items: list[_Item], max_shard_bytes: int) -> tuple[list[str], int]:
    shards = plan_shards([item.planned for item in items], max_shard_bytes)
    names = shard_file_names(len(shards))
    pending = iter(items)
    weight_map: dict[str, str] = {}
    for planned_shard, file_name in zip(shards, names):
        writer = ShardWriter(os.path.join(directory, file_name), planned_shard)
        try:
            for planned in planned_shard:
                item = next(pending)
                writer.write_blocks(planned.name, item.blocks())
                weight_map[planned.name] = file_name
            writer.close()
        except BaseException:
            writer.discard()
            raise
    total = sum(item.planned.nbytes for item in items)
    if len(names) > 1:
        _write_json(os.path.join(directory, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names, total


def _write_metadata(directory: str, info: RunInfo, dtype: str) -> list[str]:
    written = []
    source = read_json(os.path.join(info.hf_source, "config.json")) if info.hf_source else None
    config = hf_config(info.model, dtype, source, info.tokenizer)
    _write_json(os.path.join(directory, "config.json"), config)
    written.append("config.json")
    source_generation = read_json(os.path.join(info.hf_source, "generation_config.json")) if info.hf_source else None
    _write_json(os.path.join(directory, "generation_config.json"), generation_config(config, source_generation))
    written.append("generation_config.json")
    if info.tokenizer:
        written += copy_tokenizer(info.tokenizer, directory)
    return written


def _write_json(path: str, body: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output} exists and is not a directory: choose another path")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty: choose a new directory or pass --overwrite")


def _move_into_place(tmp: str, output: str) -> None:
    for name in os.listdir(tmp):
        fsync_file(os.path.join(tmp, name))
    fsync_dir(tmp)
    old = None
    if os.path.isdir(output) and os.listdir(output):  # --overwrite: swap, then delete the old export
        old = f"{tmp}.old"
        os.rename(output, old)
    os.rename(tmp, output)  # onto a missing or empty directory: atomic
    fsync_dir(os.path.dirname(output))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the run: model, tokenizer, HF source



# --------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class ResolvedStep:
    step_dir: str
    run_dir: Optional[str]  # where config.yaml is, when known


def resolve_step(path: str, step: Optional[int], say: Callable[[str], None] = print) -> ResolvedStep:
    """A checkpoint directory, a run directory or a step directory -> the step to export."""
    given = os.path.abspath(path)
    if not os.path.isdir(given):
        raise ExportError(f"--checkpoint {path}: no such directory; give a checkpoint directory "
                          "(<run>/checkpoints), a run directory or a step directory (step_NNNNNNNN)")
    own_step = parse_step_name(os.path.basename(given))
    if own_step is not None:
        if step is not None and step != own_step:
            raise ExportError(f"--step {step} contradicts --checkpoint {path} (step {own_step}): drop --step or "
                              "give the checkpoint directory")
        return ResolvedStep(given, run_dir_above(os.path.dirname(given)))
    run_dir = given if os.path.isfile(os.path.join(given, "config.yaml")) else None
    root = given
    if run_dir is not None:
        root = _checkpoint_dir_of_run(run_dir)
    store = CheckpointStore(root)
    committed = store.committed_steps()
    if not committed:
        raise ExportError(f"--checkpoint {path}: no committed step in {root} (no step_NNNNNNNN/ with a "
                          "manifest.json): give a checkpoint directory, a run directory or a step directory")
    if step is not None:
        if step not in committed:
            raise ExportError(f"--step {step}: {root} has no committed step {step} (committed: "
                              f"{', '.join(str(s) for s in sorted(committed))})")
        return ResolvedStep(store.path(step), run_dir or run_dir_above(root))
    valid = store.newest_valid(say=say)
    if valid is None:
        raise ExportError(f"--checkpoint {path}: none of the steps in {root} is a usable committed step (see above)")
    return ResolvedStep(valid.path, run_dir or run_dir_above(root))


def _checkpoint_dir_of_run(run_dir: str) -> str:
    from omegaconf import OmegaConf

    try:
        configured = OmegaConf.select(OmegaConf.load(os.path.join(run_dir, "config.yaml")), "checkpoint.dir")
    except Exception:  # an unreadable config: the default place
        configured = None
    return str(configured) if configured else os.path.join(run_dir, "checkpoints")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpointing.export_hf",
                                     description="Export a committed checkpoint step to a Hugging Face model directory.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, run directory or step directory")
    parser.add_argument("--step", type=int, default=None, help="the step to export (default: the newest committed)")
    parser.add_argument("--output", required=True, help="the new Hugging Face model directory")
    parser.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the run's)")
    parser.add_argument("--no-tokenizer", action="store_true", help="copy no tokenizer files")
    parser.add_argument("--hf-source", default=None,
                        help="Hugging Face directory whose config.json to start from (default: the run's model)")
    parser.add_argument("--verify", action="store_true", help="check every file's CRC-32 against the manifest first")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.dtype not in DTYPES:
            raise ExportError(f"--dtype {args.dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
        max_bytes = parse_size(args.max_shard_size)
        if max_bytes is None:
            raise ExportError(f"--max-shard-size {args.max_shard_size!r}: use a size like 5GB, 500MB or 2GiB")
        if args.step is not None and args.step < 0:
            raise ExportError(f"--step {args.step}: must be a step number >= 0")
        resolved = resolve_step(args.checkpoint, args.step, say=warn)
        report = export_step(resolved.step_dir, args.output, dtype=args.dtype, max_shard_bytes=max_bytes,
                             tokenizer=args.tokenizer, copy_tokenizer_files=not args.no_tokenizer,
                             hf_source=args.hf_source, overwrite=args.overwrite, verify_checksums=args.verify,
                             run_dir=resolved.run_dir, say=warn)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: export_hf: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

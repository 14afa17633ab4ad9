"""Peak host memory of ``python -m checkpointing.export_hf`` against the checkpoint and shard sizes.

    python benchmarks/export_memory.py [--layers 12] [--dir /tmp] [--keep]

Builds a synthetic committed step (bf16 Llama-style: hidden 2048, 16 heads / 4 KV heads, FFN 5632,
vocabulary 32000; 12 layers = 1.34 GB) with torch DCP in one process, in the key layout and
chunking of our megatron-core torch_dist checkpoints: layer-stacked keys
(``decoder.layers.<param>``, global layer on axis 0) stored as one chunk per (layer,
tensor-parallel rank) of a TP=2 save, ``linear_fc1`` as gate and up fragments per rank, the vocab
split over the ranks; plus a manifest (model_config, sizes, CRC-32) committed by CheckpointStore.
The trainer itself is too slow on CPU to write a checkpoint this big.

Then exports it several ways, each in a fresh child process (``export_hf.main``, as the CLI), and
reads the child's peak RSS (``VmHWM`` of its own address space, read at its end); the baseline is
a child that only imports the exporter. One export runs with a smaller row block for the
embedding and lm_head, the largest tensors here (a 70B model's are 2.1 GB each in bf16). Prints
one line per export with the ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed.checkpoint import FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint import save as dcp_save  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties  # noqa: E402
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType  # noqa: E402

from checkpointing import export_hf  # noqa: E402
from checkpointing.manifest import Manifest, file_entry  # noqa: E402
from checkpointing.store import CheckpointStore  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402

HIDDEN, HEADS, GROUPS, FFN, VOCAB, TP = 2048, 16, 4, 5632, 32000, 2
DTYPE = torch.bfloat16


def model_config(layers: int) -> ModelConfig:
    return ModelConfig(name="synthetic", num_layers=layers, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                       num_attention_heads=HEADS, num_query_groups=GROUPS, vocab_size=VOCAB)


def layout(layers: int) -> dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]]:
    """key -> (global shape, stored chunks as (offsets, sizes)), as a TP=2 megatron-core save stores them."""
    h, d, L = HIDDEN, HIDDEN // HEADS, layers
    qkv = (HEADS + 2 * GROUPS) * d
    out: dict[str, Any] = {}

    def stacked(name: str, per_layer: tuple[int, ...], split_dim: int | None, pieces: int = TP) -> None:
        chunks = []
        for layer in range(L):
            if split_dim is None:
                chunks.append(((layer,) + (0,) * len(per_layer), (1,) + per_layer))
                continue
            step = per_layer[split_dim] // pieces
            for piece in range(pieces):
                offsets = [layer] + [0] * len(per_layer)
                sizes = [1, *per_layer]
                offsets[1 + split_dim], sizes[1 + split_dim] = piece * step, step
                chunks.append((tuple(offsets), tuple(sizes)))
        out["decoder.layers." + name] = ((L, *per_layer), chunks)

    stacked("self_attention.linear_qkv.layer_norm_weight", (h,), None)
    stacked("self_attention.linear_qkv.weight", (qkv, h), 0)
    stacked("self_attention.linear_proj.weight", (h, HEADS * d), 1)
    stacked("mlp.linear_fc1.layer_norm_weight", (h,), None)
    stacked("mlp.linear_fc1.weight", (2 * FFN, h), 0, pieces=2 * TP)  # [gate r0, gate r1, up r0, up r1]
    stacked("mlp.linear_fc2.weight", (h, FFN), 1)
    rows = VOCAB // TP
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        out[key] = ((VOCAB, h), [((r * rows, 0), (rows, h)) for r in range(TP)])
    out["decoder.final_layernorm.weight"] = ((h,), [((0,), (h,))])
    return out


class _ChunkedSavePlanner(DefaultSavePlanner):
    """Writes every key as the given chunks; each chunk's data is made only when it is written."""

    def __init__(self, chunks: dict[str, Any]) -> None:
        super().__init__()
        self.chunks = chunks

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, (shape, chunks) in self.chunks.items():
            for offsets, sizes in chunks:
                items.append(WriteItem(
                    index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                properties=TensorProperties(dtype=DTYPE), size=torch.Size(shape))))
        self.plan = SavePlan(items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = write_item.tensor_data.chunk  # type: ignore[union-attr]
        seed = zlib.crc32(f"{write_item.index.fqn}{tuple(chunk.offsets)}".encode())
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(tuple(chunk.sizes), generator=generator) * 0.02).to(DTYPE)


def build_checkpoint(root: Path, layers: int) -> Path:
    store = CheckpointStore(str(root))
    tmp = Path(store.prepare(1))
    chunks = layout(layers)
    dcp_save({}, storage_writer=FileSystemWriter(str(tmp), thread_count=2, sync_files=False),
             planner=_ChunkedSavePlanner(chunks), no_dist=True)
    files = {p.name: file_entry(p) for p in sorted(tmp.iterdir())}
    manifest = Manifest(step=1, files=files, consumed_samples=0, model={}, layout={"tp": TP},
                        model_config=asdict(model_config(layers)))
    return Path(store.commit(1, manifest))


# Runs the exporter's main() (optionally with another row block size for the embedding / lm_head),
# then prints the process's own peak RSS: VmHWM, the high-water mark of this address space, which
# exec starts afresh. getrusage's ru_maxrss would also count the parent's pages the child had
# between fork and exec.
_MEASURE = """
import sys
import checkpointing.export_hf as export_hf
code = 0
if len(sys.argv) > 1:
    block_mib, argv = int(sys.argv[1]), sys.argv[2:]
    if block_mib:
        export_hf.ROW_BLOCK_BYTES = block_mib << 20
    code = export_hf.main(argv)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_rss_kib=" + hwm.split()[1], flush=True)
sys.exit(code)
"""


def peak_rss(args: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, output) of a child running ``export_hf.main(args[1:])`` (none: imports only)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=ROOT, text=True, capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"export_hf {' '.join(args)} failed ({proc.returncode}):\n{output}")
    peak = int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("peak_rss_kib="))[13:]) * 1024
    return peak, time.perf_counter() - t0, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dir", default=None, help="where the checkpoint and exports go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export_memory_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        step = build_checkpoint(work / "checkpoints", args.layers)
        ckpt_bytes = sum(p.stat().st_size for p in step.iterdir())
        print(f"checkpoint: {step} {ckpt_bytes / 1e9:.2f} GB ({args.layers} layers, bf16, TP=2 chunking) built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        chunks = layout(args.layers)
        biggest_chunk = max(math.prod(s) for _, cs in chunks.values() for _, s in cs) * 2
        biggest_hf = max(VOCAB * HIDDEN, FFN * HIDDEN) * 2  # the embedding / lm_head, bf16
        print(f"largest stored chunk {biggest_chunk / 2**20:.0f} MiB, largest HF tensor (bf16) "
              f"{biggest_hf / 2**20:.0f} MiB", flush=True)
        base, _, _ = peak_rss([])
        print(f"baseline (python + torch + exporter imported): {base / 2**20:.0f} MiB", flush=True)
        for dtype, shard, block_mib in (("bf16", "5GB", 0), ("bf16", "300MB", 0), ("bf16", "300MB", 32),
                                        ("fp32", "1GB", 0)):
            out = work / "hf"
            rss, seconds, text = peak_rss([str(block_mib), "--checkpoint", str(work / "checkpoints"), "--output",
                                           str(out), "--dtype", dtype, "--max-shard-size", shard])
            weights = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
            out_bytes = sum(p.stat().st_size for p in weights)
            largest_shard = max(p.stat().st_size for p in weights)
            above = rss - base
            block = f"{block_mib} MiB" if block_mib else f"{export_hf.ROW_BLOCK_BYTES >> 20} MiB (default)"
            print(f"export dtype={dtype} max_shard={shard} row_block={block}: {len(weights)} shard(s), "
                  f"{out_bytes / 1e9:.2f} GB in {seconds:.1f} s; peak RSS {rss / 2**20:.0f} MiB = baseline + "
                  f"{above / 2**20:.0f} MiB; above baseline / checkpoint {above / ckpt_bytes:.3f}, / largest shard "
                  f"{above / largest_shard:.3f}", flush=True)
            print("  " + next(ln for ln in text.splitlines() if ln.startswith("export_hf:")), flush=True)
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

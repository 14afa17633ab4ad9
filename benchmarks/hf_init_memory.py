"""Peak host memory of one rank while it initialises from Hugging Face safetensors (checkpoint.init_from).

    python benchmarks/hf_init_memory.py [--layers 16] [--hidden 2048] [--tp 4] [--rank 1]

Writes a synthetic Llama-style HF directory (bf16, sharded like a published model), then, in
fresh processes, fills ONE rank's parameter shard (TP=``--tp``, rank ``--rank``) two ways:

* ``slices``: the production loader (checkpointing.init_weights.hf_slices): every tensor read as
  the rows/columns this rank owns, with pread;
* ``whole``: the naive way, ``safetensors.torch.load_file`` of every shard, then slicing.

Each process reports its resident memory before (Python + torch + the rank's allocated shard)
and its peak (``ru_maxrss``); the script prints both, the shard size, and the ratios
peak / shard. Target (issue 9): the loader's peak below 1.5 x shard + a fixed overhead (the
process's baseline with torch imported, reported here as ``base``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_model(directory: Path, args: argparse.Namespace) -> int:
    import torch

    from checkpointing.hf_mapping import Dims, hf_names, hf_shape
    from checkpointing.safetensors_io import PlannedTensor, ShardWriter, plan_shards, shard_file_names

    dims = dims_of(args)
    planned = [PlannedTensor(n, hf_shape(n, dims), torch.bfloat16) for n in hf_names(dims)]
    shards = plan_shards(planned, 400 << 20)
    names = shard_file_names(len(shards))
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for shard, name in zip(shards, names):
        writer = ShardWriter(str(directory / name), shard)
        for tensor in shard:
            writer.write(tensor.name, torch.randn(tensor.shape, generator=generator).to(torch.bfloat16))
            weight_map[tensor.name] = name
        writer.close()
    total = sum(t.nbytes for t in planned)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims.hidden,
        "intermediate_size": dims.ffn, "num_hidden_layers": dims.num_layers, "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.groups, "vocab_size": dims.vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 8192}))
    return total


def dims_of(args: argparse.Namespace):  # noqa: ANN201 - a Dims
    from checkpointing.hf_mapping import Dims

    heads = args.hidden // 128
    return Dims(num_layers=args.layers, hidden=args.hidden, heads=heads, groups=max(1, heads // 4), head_dim=128,
                ffn=args.ffn, vocab=32000, padded_vocab=32000, tied=False, qkv_bias=False)


def local_shapes(dims, tp: int) -> list[tuple[str, tuple[int, ...]]]:  # noqa: ANN001
    h, d = dims.hidden, dims.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("embedding.word_embeddings.weight", (dims.padded_vocab // tp, h))]
    for i in range(dims.num_layers):
        p = f"decoder.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attention.linear_qkv.weight", ((dims.heads + 2 * dims.groups) * d // tp, h)),
                (p + "self_attention.linear_proj.weight", (h, dims.heads * d // tp)),
                (p + "pre_mlp_layernorm.weight", (h,)),
                (p + "mlp.linear_fc1.weight", (2 * dims.ffn // tp, h)),
                (p + "mlp.linear_fc2.weight", (h, dims.ffn // tp))]
    out += [("decoder.final_layernorm.weight", (h,)), ("output_layer.weight", (dims.padded_vocab // tp, h))]
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    from checkpointing.hf_mapping import RankSlice, megatron_slice
    from checkpointing.init_weights import hf_slices
    from checkpointing.safetensors_io import SafetensorsDir

    base = rss_bytes()
    dims = dims_of(args)
    shapes = local_shapes(dims, args.tp)
    params = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes}
    for tensor in params.values():
        tensor.zero_()  # touch the pages: the shard is resident, as a built model's is
    shard = sum(t.numel() * t.element_size() for t in params.values())
    before = rss_bytes()
    t0 = time.perf_counter()
    where = RankSlice(args.rank, args.tp)
    if args.mode == "slices":
        reader = SafetensorsDir(args.dir)
        for name, tensor in hf_slices(shapes, dims, where, reader):
            params[name].copy_(tensor)
    else:
        from safetensors.torch import load_file

        index = json.loads(Path(args.dir, "model.safetensors.index.json").read_text())["weight_map"]
        whole: dict[str, torch.Tensor] = {}
        for file in sorted(set(index.values())):
            whole.update(load_file(str(Path(args.dir, file))))

        def read(name: str, rows=None, cols=None) -> torch.Tensor:  # noqa: ANN001
            t = whole[name]
            t = t[rows] if rows is not None else t
            return t[:, cols] if cols is not None else t

        for name, _ in shapes:
            params[name].copy_(megatron_slice(name, dims, where, read))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": args.mode, "base": base, "before": before, "peak": peak, "shard": shard,
                      "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--worker", choices=("slices", "whole"), dest="mode")
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        total = make_model(Path(tmp), args)
        print(f"model: {args.layers} layers, hidden {args.hidden}, {total / 2**30:.2f} GiB bf16 in safetensors shards; "
              f"rank {args.rank} of TP={args.tp}")
        results = {}
        for mode in ("slices", "whole"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--dir", tmp, "--layers", str(args.layers),
                                  "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--tp", str(args.tp),
                                  "--rank", str(args.rank)], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        shard = results["slices"]["shard"]
        for mode, r in results.items():
            over = r["peak"] - r["before"]
            print(f"{mode:>6}: base {r['base'] / 2**20:7.1f} MiB, shard {shard / 2**20:7.1f} MiB, peak {r['peak'] / 2**20:7.1f}"
                  f" MiB -> (peak - base) / shard = {(r['peak'] - r['base']) / shard:.2f}, above the allocated shard "
                  f"{over / 2**20:7.1f} MiB ({r['seconds']:.2f} s)")
        s, w = results["slices"], results["whole"]
        print(f"ratio_peak_over_shard_slices={(s['peak'] - s['base']) / shard:.2f} "
              f"ratio_peak_over_shard_whole={(w['peak'] - w['base']) / shard:.2f} "
              f"target=(peak - base) < 1.5 x shard: {'met' if s['peak'] - s['base'] < 1.5 * shard else 'MISSED'}")


if __name__ == "__main__":
    main()

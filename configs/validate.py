"""Cross-field validation of a composed config: every problem at once, each actionable.

Each problem names the field, the value it has and how to fix it. Nothing here touches
the filesystem or Slurm, so a refused config leaves nothing behind.
"""

from __future__ import annotations

import math
import re

from configs import checkpoint_config, monitoring_config, preflight_config, resilience_config
from configs.derived import derived_dp, padded_vocab_size, parse_time_limit
from configs.errors import ConfigError, Problem
from configs.hardware import GPU_TYPES, lookup_instance
from configs.hf_config import SUPPORTED
from configs.schema import RootConfig

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY|SESSION_KEY|CREDENTIAL)", re.I)
_DEP_ITEM = r"(?:singleton|after(?:any|ok|notok|corr|burstbuffer)?:\d+(?:_\d+)?(?:\+\d+)?(?::\d+(?:_\d+)?(?:\+\d+)?)*)"
_DEPENDENCY = re.compile(rf"^{_DEP_ITEM}(?:[,?]{_DEP_ITEM})*$")
# characters that sbatch's own #SBATCH parser or its %-patterns would misread in a path
_UNSAFE_HEADER_PATH = re.compile(r"[\s'\"\\%$`;&|<>]")

KINDS = ("local", "slurm", "hyperpod")
BACKENDS = ("auto", "cli", "pyslurm")
PRECISIONS = ("bf16", "fp16", "fp32")
RECOMPUTE = ("none", "selective", "full")
DECAY = ("constant", "linear", "cosine")
DATA_SOURCES = ("synthetic", "indexed", "sft")


def validate(cfg: RootConfig) -> None:
    """Raise ConfigError listing every problem; return None when the config is usable."""
    problems: list[Problem] = []

    def add(field_name: str, value: object, fix: str) -> None:
        problems.append(Problem(field_name, value, fix))

    _check_positive(cfg, add)
    _check_choices(cfg, add)
    _check_cluster(cfg, add)
    checkpoint_config.check(cfg.checkpoint, add)
    monitoring_config.check(cfg.monitoring, add)
    resilience_config.check(cfg.resilience, add)
    preflight_config.check(cfg.cluster.preflight, add)
    if not problems:  # the divisibility rules need positive sizes
        if cfg.parallelism.mode == "auto":  # the layout fields are filled by the predictor at launch
            _check_model(cfg, add)
        else:
            _check_layout(cfg, add)
        _check_training(cfg, add)
    if problems:
        raise ConfigError(problems)


def _check_positive(cfg: RootConfig, add) -> None:
    m, t, p, c = cfg.model, cfg.training, cfg.parallelism, cfg.cluster
    sizes = {
        "model.num_layers": m.num_layers,
        "model.hidden_size": m.hidden_size,
        "model.ffn_hidden_size": m.ffn_hidden_size,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups,
        "model.vocab_size": m.vocab_size,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "model.max_position_embeddings": m.max_position_embeddings,
        "training.seq_length": t.seq_length,
        "training.global_batch_size": t.global_batch_size,
        "training.micro_batch_size": t.micro_batch_size,
        "training.log_interval": t.log_interval,
        "parallelism.tp": p.tp,
        "parallelism.pp": p.pp,
        "parallelism.cp": p.cp,
        "parallelism.recompute_num_layers": p.recompute_num_layers,
        "cluster.nodes": c.nodes,
        "cluster.gpus_per_node": c.gpus_per_node,
    }
    for name, value in sizes.items():
        if value <= 0:
            add(name, value, "must be a positive integer")
    for name, opt in (("parallelism.vpp", p.vpp), ("parallelism.dp", p.dp),
                      ("training.train_steps", t.train_steps), ("training.train_tokens", t.train_tokens)):
        if opt is not None and opt <= 0:
            add(name, opt, "must be a positive integer, or null")
    if t.lr < 0:
        add("training.lr", t.lr, "must be >= 0 (0: evaluate or export without changing the weights)")
    if t.min_lr < 0 or t.min_lr > t.lr:
        add("training.min_lr", t.min_lr, f"must be between 0 and training.lr ({t.lr})")
    if t.lr_warmup_steps < 0:
        add("training.lr_warmup_steps", t.lr_warmup_steps, "must be >= 0")
    if m.rope_theta <= 0:
        add("model.rope_theta", m.rope_theta, "must be > 0 (Llama 3 uses 500000)")
    if m.head_dim is not None and m.head_dim <= 0:
        add("model.head_dim", m.head_dim, "must be a positive integer, or null for hidden_size / num_attention_heads")
    if m.rope_scaling_factor is not None:
        if m.rope_scaling_factor <= 1:
            add("model.rope_scaling_factor", m.rope_scaling_factor, "must be > 1 (Llama 3.1-3.3 use 8), or null")
        if not 0 < m.rope_scaling_low_freq_factor < m.rope_scaling_high_freq_factor:
            add("model.rope_scaling_high_freq_factor", m.rope_scaling_high_freq_factor,
                f"must exceed rope_scaling_low_freq_factor={m.rope_scaling_low_freq_factor} > 0 (Llama 3: 1 and 4)")
        if m.rope_scaling_original_max_position <= 0:
            add("model.rope_scaling_original_max_position", m.rope_scaling_original_max_position,
                "must be a positive number of positions (Llama 3: 8192)")
    if m.hf_architecture not in SUPPORTED:
        add("model.hf_architecture", m.hf_architecture, f"choose one of: {', '.join(SUPPORTED)}")
    if c.signal_seconds < 0:
        add("cluster.signal_seconds", c.signal_seconds, "must be >= 0 (0 disables --signal)")


def _check_choices(cfg: RootConfig, add) -> None:
    choices = (
        ("cluster.kind", cfg.cluster.kind, KINDS),
        ("cluster.slurm_backend", cfg.cluster.slurm_backend, BACKENDS),
        ("cluster.gpu_type", cfg.cluster.gpu_type, tuple(GPU_TYPES)),
        ("training.precision", cfg.training.precision, PRECISIONS),
        ("training.lr_decay_style", cfg.training.lr_decay_style, DECAY),
        ("training.data.source", cfg.training.data.source, DATA_SOURCES),
        ("parallelism.recompute", cfg.parallelism.recompute, RECOMPUTE),
        ("parallelism.mode", cfg.parallelism.mode, ("manual", "auto")),
    )
    for name, value, valid in choices:
        if value not in valid:
            add(name, value, f"unknown value; choose one of: {', '.join(valid)}")
    t = cfg.training
    if (t.train_steps is None) == (t.train_tokens is None):
        add("training.train_steps", t.train_steps,
            f"set exactly one of training.train_steps and training.train_tokens (train_tokens={t.train_tokens})")
    _check_data(cfg, add)
    if not cfg.run_name.strip():
        add("run_name", cfg.run_name, "must not be empty")
    p = cfg.parallelism
    if not 0 < p.usable_memory_fraction <= 1:
        add("parallelism.usable_memory_fraction", p.usable_memory_fraction, "must be in (0, 1], e.g. 0.94")
    if p.top_k <= 0:
        add("parallelism.top_k", p.top_k, "must be a positive integer (alternatives recorded for parallelism=auto)")
    if p.memory_gib is not None and p.memory_gib <= 0:
        add("parallelism.memory_gib", p.memory_gib, "must be a positive number of GiB, or null for the GPU type's")


def parse_split(split: str) -> tuple[float, float, float] | None:
    """megatron's ``train,valid,test`` shares (normalised); None when malformed."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        return None
    if not parts or len(parts) > 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        return None
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def _check_data(cfg: RootConfig, add) -> None:
    t, d = cfg.training, cfg.training.data
    if t.eval_interval < 0:
        add("training.eval_interval", t.eval_interval, "must be >= 0 (0 = no validation)")
    if t.eval_iters <= 0:
        add("training.eval_iters", t.eval_iters, "must be a positive number of global batches per validation")
    shares = parse_split(d.split)
    if shares is None:
        add("training.data.split", d.split, "use train,valid,test shares, e.g. 98,2,0")
    if d.source in ("indexed", "sft") and not d.blend:
        make = ("python -m trainer.tokenize --input ... --output-prefix PREFIX" if d.source == "indexed"
                else "a .jsonl of {\"messages\": [...]} per line, or `python -m trainer.tokenize --sft ...`")
        add("training.data.blend", [], f"{d.source} data needs at least one source: "
            f"training.data.blend=[{{path: PREFIX, weight: 1.0}}] ({make})")
    if d.source == "synthetic" and d.blend:
        add("training.data.blend", [b.path for b in d.blend], "is only read for training.data.source=indexed or sft")
    names: set[str] = set()
    for i, src in enumerate(d.blend):
        if not str(src.path).strip():
            add(f"training.data.blend[{i}].path", src.path, "must be a path")
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight) and src.weight > 0):
            add(f"training.data.blend[{i}].weight", src.weight, "must be a positive number (weights are normalised)")
        label = blend_name(src.path, src.name)
        if label in names:
            add(f"training.data.blend[{i}].name", label, "two sources share this label; set a distinct name")
        names.add(label)
    if d.source == "sft" and not d.tokenizer:
        add("training.data.tokenizer", None, "sft needs a Hugging Face tokenizer directory with a chat template "
            "(e.g. the model's own: training.data.tokenizer=/fsx/models/Llama-3.3-70B-Instruct)")
    if t.eval_interval and d.source in ("indexed", "sft") and shares is not None and shares[1] == 0:
        add("training.data.split", d.split, f"validation (training.eval_interval={t.eval_interval}) needs a valid "
            "share, e.g. 98,2,0 (or set training.eval_interval=0)")


def blend_name(path: str, name: str | None) -> str:
    """The label of a blend source in logs and metrics: its name, else its file name."""
    if name:
        return name
    base = str(path).rstrip("/").rsplit("/", 1)[-1]
    return base.removesuffix(".jsonl") or str(path)


def _check_cluster(cfg: RootConfig, add) -> None:
    c = cfg.cluster
    if c.instance_type is not None:
        inst = lookup_instance(c.instance_type)
        if inst is None:
            add("cluster.instance_type", c.instance_type,
                "unknown instance; use ml.p5.48xlarge, ml.p5e.48xlarge, ml.p5en.48xlarge, "
                "ml.p4de.24xlarge or ml.p4d.24xlarge, or null for a generic cluster")
        else:
            if c.gpu_type != inst.gpu_type:
                add("cluster.gpu_type", c.gpu_type, f"{c.instance_type} has {inst.gpu_type}; set cluster.gpu_type={inst.gpu_type}")
            if c.gpus_per_node != inst.gpus:
                add("cluster.gpus_per_node", c.gpus_per_node, f"{c.instance_type} has {inst.gpus} GPUs per node")
            if c.efa_devices != inst.efa_devices:
                add("cluster.efa_devices", c.efa_devices, f"{c.instance_type} has {inst.efa_devices} EFA devices")
    if c.kind == "local" and c.nodes != 1:
        add("cluster.nodes", c.nodes, "a local run uses this machine only; set cluster.nodes=1 or pick a Slurm cluster")
    if c.kind != "local":
        limit = parse_time_limit(c.time_limit)
        if limit is None:
            add("cluster.time_limit", c.time_limit, "use Slurm's [D-]HH:MM:SS (e.g. 2-00:00:00) or minutes")
        elif c.signal_seconds and c.signal_seconds >= limit:
            add("cluster.signal_seconds", c.signal_seconds,
                f"must be shorter than cluster.time_limit ({limit} s) to leave time to checkpoint")
    if c.price_per_node_hour is not None and c.price_per_node_hour < 0:
        add("cluster.price_per_node_hour", c.price_per_node_hour, "must be >= 0 (USD per node-hour), or null")
    if c.rdzv_port <= 0 or c.rdzv_port > 65535:
        add("cluster.rdzv_port", c.rdzv_port, "must be a TCP port (1-65535)")
    for i, mount in enumerate(c.container_mounts):
        parts = mount.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]) or "\n" in mount or "," in mount:
            add(f"cluster.container_mounts[{i}]", mount, "use SRC:DST[:FLAGS], e.g. /fsx:/fsx")
    if c.container_mounts and not c.container_image:
        add("cluster.container_mounts", list(c.container_mounts), "mounts need cluster.container_image")
    for name in list(c.env) + list(c.secret_env):
        if not _ENV_NAME.match(name):
            add("cluster.env" if name in c.env else "cluster.secret_env", name,
                "not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    for name in c.env:
        if _SECRET_NAME.search(name) and name not in c.secret_env:
            add(f"cluster.env.{name}", "<redacted>",
                f"looks like a secret; never write its value into a config. Export it in the submitting "
                f"shell and list it in cluster.secret_env=[{name}] instead")
    for name in set(c.env) & set(c.secret_env):
        add(f"cluster.env.{name}", "<redacted>",
            "is also listed in cluster.secret_env; secrets are forwarded by name only, remove the value")
    if c.dependency is not None and not _DEPENDENCY.match(c.dependency):
        add("cluster.dependency", c.dependency, "use Slurm's syntax, e.g. afterok:1234 or afterok:12:13,afterany:14 "
            "or singleton (or set depends_on=<run> to chain after a previous run)")
    for i, flag in enumerate(c.extra_sbatch):
        if not flag.startswith("--") or any(ch in flag for ch in "\n\r"):
            add(f"cluster.extra_sbatch[{i}]", flag, "use one sbatch long option per item, e.g. --constraint=p5")
    for name, value in (("runs_root", cfg.runs_root),):
        if c.kind != "local" and _UNSAFE_HEADER_PATH.search(value):
            add(name, value, "sbatch cannot take this path in #SBATCH --output; use a path without "
                "spaces, quotes, %, $ or shell metacharacters")


def _check_layout(cfg: RootConfig, add) -> None:
    m, p, c, t = cfg.model, cfg.parallelism, cfg.cluster, cfg.training
    if m.num_attention_heads % p.tp:
        add("parallelism.tp", p.tp, f"model.num_attention_heads={m.num_attention_heads} is not divisible by it; "
            f"use one of {_divisors(m.num_attention_heads, c.gpus_per_node)}")
    if m.num_query_groups % p.tp and p.tp % m.num_query_groups:
        add("parallelism.tp", p.tp, f"model.num_query_groups={m.num_query_groups} (KV heads) must be a multiple or "
            f"divisor of tp; use one of {_divisors(m.num_query_groups, c.gpus_per_node)}")
    if m.num_attention_heads % m.num_query_groups:
        add("model.num_query_groups", m.num_query_groups,
            f"must divide model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        add("model.hidden_size", m.hidden_size, f"must be divisible by model.num_attention_heads="
            f"{m.num_attention_heads} (or set model.head_dim)")
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
    if padded % p.tp:
        add("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by,
            f"padded vocab {padded} is not divisible by tp={p.tp}; use a multiple of {p.tp}")
    if c.kind != "local" and p.tp > c.gpus_per_node:
        add("parallelism.tp", p.tp, f"tensor parallelism must stay inside a node (cluster.gpus_per_node={c.gpus_per_node})")
    vpp = p.vpp or 1
    if p.vpp is not None and p.vpp > 1 and p.pp == 1:
        add("parallelism.vpp", p.vpp, "virtual pipeline needs parallelism.pp > 1; set vpp=null")
    if m.num_layers % (p.pp * vpp):
        add("parallelism.pp", p.pp, f"model.num_layers={m.num_layers} must be divisible by pp x vpp = {p.pp * vpp}")
    if p.sequence_parallel and p.tp == 1:
        add("parallelism.sequence_parallel", True, "sequence parallelism needs parallelism.tp > 1; set it false")
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        add("training.seq_length", t.seq_length, f"must be divisible by 2 x cp = {2 * p.cp} (load-balanced context parallelism)")
    if t.seq_length > m.max_position_embeddings and m.rope_scaling_factor is None:
        add("training.seq_length", t.seq_length, f"exceeds model.max_position_embeddings={m.max_position_embeddings}")
    world = c.nodes * c.gpus_per_node
    mp = p.tp * p.pp * p.cp
    if p.dp is not None and mp * p.dp != world:
        add("parallelism.dp", p.dp, f"cluster.nodes x cluster.gpus_per_node = {world} must equal tp x pp x cp x dp = "
            f"{mp * p.dp}; set dp={world // mp if world % mp == 0 else '?'} or dp=null to derive it")
    elif p.dp is None and world % mp:
        add("parallelism.tp", p.tp, f"tp x pp x cp = {mp} does not divide the {world} GPUs "
            f"(cluster.nodes={c.nodes} x cluster.gpus_per_node={c.gpus_per_node})")
    if p.overlap_param_gather and not p.distributed_optimizer:
        add("parallelism.overlap_param_gather", True, "needs parallelism.distributed_optimizer=true; set it false")
    if c.gpu_type == "cpu" and p.cp > 1:
        add("parallelism.cp", p.cp, "context parallelism needs Transformer Engine attention on GPUs; "
            "on CPU (gpu_type=cpu) set cp=1")
    if c.gpu_type != "cpu" and c.transformer_engine is False and p.cp > 1:
        add("parallelism.cp", p.cp, "context parallelism needs Transformer Engine attention and "
            "cluster.transformer_engine=false: set cp=1 or use an image with Transformer Engine")
    if c.transformer_engine is False and p.tp_comm_overlap:
        add("parallelism.tp_comm_overlap", True, "needs Transformer Engine userbuffers (cluster.transformer_engine=false)")
    if c.gpu_type == "cpu" and p.tp_comm_overlap:
        add("parallelism.tp_comm_overlap", True, "needs Transformer Engine on GPUs; on CPU set it false")
    if p.tp_comm_overlap and not p.sequence_parallel:
        add("parallelism.tp_comm_overlap", True, "needs parallelism.sequence_parallel=true")


def _check_model(cfg: RootConfig, add) -> None:
    """The layout-independent rules of ``_check_layout`` (parallelism=auto checks the rest per candidate)."""
    m, t = cfg.model, cfg.training
    if m.num_attention_heads % m.num_query_groups:
        add("model.num_query_groups", m.num_query_groups,
            f"must divide model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        add("model.hidden_size", m.hidden_size, f"must be divisible by model.num_attention_heads="
            f"{m.num_attention_heads} (or set model.head_dim)")
    if t.seq_length > m.max_position_embeddings and m.rope_scaling_factor is None:
        add("training.seq_length", t.seq_length, f"exceeds model.max_position_embeddings={m.max_position_embeddings}")


def _check_training(cfg: RootConfig, add) -> None:
    t, p = cfg.training, cfg.parallelism
    dp = derived_dp(cfg)
    if p.mode == "auto":  # the batch rules depend on the layout the predictor picks
        if t.train_tokens is not None and t.train_tokens < t.global_batch_size * t.seq_length:
            add("training.train_tokens", t.train_tokens,
                f"is less than one step ({t.global_batch_size * t.seq_length} tokens)")
        return
    if dp is None:
        return
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        add("training.global_batch_size", t.global_batch_size,
            f"must be divisible by micro_batch_size x dp = {t.micro_batch_size} x {dp} = {per_step}")
    elif p.vpp is not None and p.vpp > 1 and (t.global_batch_size // per_step) % p.pp:
        m = t.global_batch_size // per_step
        add("training.global_batch_size", t.global_batch_size,
            f"gives {m} micro-batches per step; megatron's interleaved schedule (vpp={p.vpp}) needs a multiple of "
            f"pp={p.pp}: use a global_batch_size that is a multiple of micro_batch_size x dp x pp = {per_step * p.pp}")
    if t.train_tokens is not None and t.train_tokens < t.global_batch_size * t.seq_length:
        add("training.train_tokens", t.train_tokens,
            f"is less than one step ({t.global_batch_size * t.seq_length} tokens)")


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, max(cap, 1) + 1) if n % d == 0]

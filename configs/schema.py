"""Typed configuration schema, registered with Hydra's ConfigStore.

Each component receives only its own part (``ModelConfig`` for the model builder,
``ClusterConfig`` for the renderer and backends, ...). Hydra merges the YAML files under
``configs/`` onto these dataclasses, so an unknown key or a wrong type is refused while
the config is composed; cross-field rules live in ``configs.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from configs.checkpoint_config import CheckpointConfig
from configs.monitoring_config import MonitoringConfig
from configs.preflight_config import PreflightConfig
from configs.resilience_config import ResilienceConfig

__all__ = ["ModelConfig", "ClusterConfig", "BlendSource", "DataConfig", "TrainingConfig", "ParallelismConfig",
           "CheckpointConfig", "MonitoringConfig", "ResilienceConfig", "RootConfig", "register_configs"]


@dataclass
class ModelConfig:
    """Architecture of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA; Qwen2 adds QKV bias).

    With ``hf_path`` set, every architecture field is read from ``<hf_path>/config.json``
    (configs.hf_config); a value given here as well must agree with it.
    """

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # KV heads (GQA groups)
    vocab_size: int = MISSING  # tokenizer vocabulary, before padding
    head_dim: Optional[int] = None  # per-head size; null = hidden_size / num_attention_heads
    make_vocab_size_divisible_by: int = 128  # padded vocab = next multiple (must divide by TP)
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    rope_scaling_factor: Optional[float] = None  # Llama 3.x long-context RoPE scaling ("rope_type": "llama3")
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5: biases on the Q, K and V projections
    norm_eps: float = 1e-5
    init_method_std: float = 0.02
    hf_architecture: str = "LlamaForCausalLM"  # what an export to Hugging Face writes (or Qwen2ForCausalLM)
    hf_path: Optional[str] = None  # a Hugging Face model directory to read the architecture from


@dataclass
class ClusterConfig:
    """Where the job runs: this machine (``local``) or a Slurm cluster."""

    name: str = "local"
    kind: str = "local"  # local | slurm | hyperpod
    gpu_type: str = "cpu"  # see cluster.gpus.GPU_TYPES
    gpus_per_node: int = 1  # processes per node (CPU processes for gpu_type=cpu)
    nodes: int = 1
    instance_type: Optional[str] = None  # e.g. ml.p5.48xlarge: picks the EFA/NCCL environment
    efa_devices: int = 0
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    reservation: Optional[str] = None
    time_limit: str = "04:00:00"  # Slurm time: [D-]HH:MM:SS
    exclusive: bool = True
    gpus_per_node_flag: bool = False  # emit --gpus-per-node (generic clusters with GPU GRES)
    # Transformer Engine on the nodes (memory_predictor.kernels): null = auto at launch (a container image
    # is taken to carry it, as NGC/DLC images do; otherwise the launching environment is probed)
    transformer_engine: Optional[bool] = None
    nccl_nvls: Optional[bool] = None  # NCCL_NVLS_ENABLE; null leaves it to NCCL and aws-ofi-nccl
    preflight: PreflightConfig = field(default_factory=PreflightConfig)  # node health checks before training
    price_per_node_hour: Optional[float] = None  # USD per node-hour: cost so far and projected (goodput ledger)
    calibration: Optional[str] = None  # a cluster_calibration.yaml (memory_predictor calibrate) for the plans
    container_image: Optional[str] = None  # pyxis/enroot image (.sqsh path or registry URI)
    container_mounts: list[str] = field(default_factory=list)  # "src:dst" pairs
    requeue: bool = True
    signal_seconds: int = 300  # --signal=USR2@N: checkpoint this long before the time limit
    dependency: Optional[str] = None  # e.g. "afterok:1234"
    slurm_backend: str = "auto"  # auto | cli | pyslurm
    python: str = "python3"  # interpreter on the compute nodes (inside the container if any)
    workdir: Optional[str] = None  # code directory on the nodes; default: the submitting checkout
    rdzv_port: int = 29500
    env: dict[str, str] = field(default_factory=dict)  # extra env vars, written as values
    secret_env: list[str] = field(default_factory=list)  # names forwarded from the submitter, never written
    extra_sbatch: list[str] = field(default_factory=list)  # extra "--flag=value" header lines


@dataclass
class BlendSource:
    """One corpus of a weighted blend."""

    path: str = MISSING  # indexed: a .bin/.idx prefix; sft: a .jsonl file or a prepared prefix
    weight: float = 1.0  # relative; the blend's weights are normalised to sum to 1
    name: Optional[str] = None  # label in logs and metrics; default: the file name


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | indexed | sft
    blend: list[BlendSource] = field(default_factory=list)  # indexed and sft sources with weights
    split: str = "100,0,0"  # train,valid,test shares of every source (validation needs a valid share)
    tokenizer: Optional[str] = None  # Hugging Face tokenizer directory (sft; copied into an HF export)
    pack_sequences: bool = True  # sft: several conversations per sequence, attention kept inside each
    cache_dir: Optional[str] = None  # index caches and prepared SFT data; default <run dir>/data_cache
    seed: int = 1234


@dataclass
class TrainingConfig:
    seq_length: int = 2048
    global_batch_size: int = 8
    micro_batch_size: int = 1
    train_steps: Optional[int] = None
    train_tokens: Optional[int] = None  # alternative to train_steps
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_steps: int = 0
    lr_decay_style: str = "cosine"  # constant | linear | cosine
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # steps between validation passes (and after the last step); 0 = none
    eval_iters: int = 1  # global batches per validation pass (per source)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ParallelismConfig:
    mode: str = "manual"  # manual | auto (auto: the memory predictor picks the layout and micro batch)
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline chunks per rank (interleaved 1F1B)
    cp: int = 1
    dp: Optional[int] = None  # derived from the world size when null
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1  # for full recompute (uniform method)
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    tp_comm_overlap: bool = False
    # memory predictor (memory_predictor/): auto-layout search and the fit check of manual layouts
    allow_oom: bool = False  # launch a manual layout even when it is predicted not to fit
    usable_memory_fraction: float = 0.94  # a layout fits when its predicted peak <= this x GPU memory (fitted: docs/memory_predictor.md)
    top_k: int = 5  # auto: alternatives recorded (with breakdowns) in the run directory
    memory_gib: Optional[float] = None  # per-device memory for the predictor; default: the GPU type's


@dataclass
class RootConfig:
    """The whole job. Only the launcher sees all of it; components get their part."""

    run_name: str = "run"
    runs_root: str = "runs"
    dry_run: bool = False
    depends_on: Optional[str] = None  # a previous stage (run dir, run name or job id): start after it succeeds
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)


def register_configs() -> None:
    """Register the schema so configs/launcher.yaml can list ``root_schema`` first."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)

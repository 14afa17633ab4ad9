"""Every metric name this project exports, in one place (sinks, rules, dashboards and docs use these).

Conventions (Prometheus): base units in the name (``_seconds``, ``_bytes``), counters end in
``_total``, ratios are 0-1, durations are histograms, and no ``_created`` series are served.
Per-rank series carry no rank/host/gpu labels of their own: the
file_sd target of each rank adds ``run``, ``rank``, ``local_rank``, ``host``, ``gpu`` and
``slurm_job``, so no step number or other unbounded value ever becomes a label.

GPU and EFA series keep the names of NVIDIA's dcgm-exporter (``DCGM_FI_*``) and of the AWS
EFA node exporter (``node_amazonefa_*``), so community dashboards and HyperPod's own
exporters are interchangeable with ours.
"""

from __future__ import annotations

P = "hyperlaunch_"

# training, one set per rank
TRAIN_STEP = P + "train_step"
TRAIN_STEP_SECONDS = P + "train_step_seconds"
TRAIN_STEP_DURATION = P + "train_step_duration_seconds"  # histogram: _bucket{le} / _sum / _count
TRAIN_COMPUTE_SECONDS = P + "train_compute_seconds"
TRAIN_COMPUTE_DURATION = P + "train_compute_duration_seconds"  # histogram
TRAIN_DATA_WAIT_SECONDS = P + "train_data_wait_seconds"
TRAIN_DATA_WAIT_DURATION = P + "train_data_wait_duration_seconds"  # histogram
TRAIN_TOKENS_PER_SECOND = P + "train_tokens_per_second"
TRAIN_TOKENS = P + "train_tokens"  # counter (_total)
TRAIN_TFLOPS_PER_GPU = P + "train_tflops_per_gpu"
TRAIN_MFU = P + "train_mfu_ratio"
TRAIN_LOSS = P + "train_loss"
TRAIN_GRAD_NORM = P + "train_grad_norm"
TRAIN_LR = P + "train_learning_rate"
VALIDATION_LOSS = P + "validation_loss"  # {source}; source="all" is every source's tokens together
VALIDATION_PERPLEXITY = P + "validation_perplexity"  # {source}

# straggler detection (each rank exports its own scores; rank 0 exports the job-level ones)
STRAGGLER_SCORE = P + "straggler_score"  # what is thresholded (see monitoring.straggler)
STRAGGLER_RELATIVE = P + "straggler_relative_score"
STRAGGLER_INDIVIDUAL = P + "straggler_individual_score"
STRAGGLER_FLAGGED = P + "straggler_flagged"
STRAGGLERS = P + "stragglers"  # rank 0: flagged ranks in the job
THROUGHPUT_DROP = P + "throughput_drop"  # rank 0: 1 while the job runs below its baseline
THROUGHPUT_BASELINE = P + "throughput_baseline_tokens_per_second"

# checkpointing (fed through monitoring.record_checkpoint by the checkpoint code)
CKPT_BLOCKING = P + "checkpoint_blocking_seconds"  # training stalled for the save
CKPT_SAVE = P + "checkpoint_save_seconds"  # save end to end (async part included)
CKPT_REPLICATION = P + "checkpoint_replication_seconds"  # copy to S3/another tier
CKPT_SIZE = P + "checkpoint_size_bytes"
CKPT_OPERATIONS = P + "checkpoint_operations"  # counter (_total) {operation, outcome}
CKPT_LAST_SUCCESS = P + "checkpoint_last_success_timestamp_seconds"  # {operation}

# progress, the goodput ledger and plan vs actual (rank 0; trainer.tracker), kept across restarts
PROGRESS = P + "progress_ratio"  # consumed / total tokens, 0-1
PROGRESS_TOKENS = P + "progress_tokens"  # tokens consumed (the run's, not this attempt's)
PROGRESS_TOKENS_TARGET = P + "progress_tokens_target"
MILESTONE = P + "progress_milestone_percent"  # highest of 10/25/50/75/90/100 reached
ETA = P + "eta_seconds"  # smoothed recent wall time per step x remaining steps
ELAPSED = P + "elapsed_seconds"  # wall time since the first attempt started (restarts included)
GOODPUT = P + "goodput_ratio"  # productive / wall
WALL = P + "wall_seconds"  # {category}: the ledger (productive, startup, checkpoint, evaluation, ...)
TOKENS_PER_GPU_HOUR = P + "tokens_per_gpu_hour"
COST = P + "cost_usd"  # with cluster.price_per_node_hour
COST_PROJECTED = P + "projected_cost_usd"
ATTEMPTS = P + "run_attempts"  # processes that trained this run (1 + restarts and requeues)
REDONE_STEPS = P + "redone_steps"  # steps trained again after restarts
RESTART_LOST = P + "restart_lost_seconds"  # the last restart: detection + down + reload + redone work
PLAN_STEP_RATIO = P + "plan_step_time_ratio"  # measured / predicted (prediction.json)
PLAN_MEMORY_RATIO = P + "plan_memory_ratio"

# the job (rank 0) and the monitoring itself (every process)
JOB_STATE = P + "job_state"  # {state=running|finished|stopped|failed}, one-hot
JOB_START = P + "job_start_time_seconds"
JOB_END = P + "job_end_time_seconds"
JOB_WORLD_SIZE = P + "job_world_size"
RANK_INFO = P + "rank_info"  # {gpu_uuid, gpu_name, pp_rank, tp_rank, dp_rank} = 1
DEGRADED = P + "monitoring_degraded"  # {component} = 1 while something monitoring needs is missing
OVERHEAD = P + "monitoring_overhead_seconds"  # counter (_total): time the callback took on this rank
JOB_STATES = ("running", "finished", "stopped", "failed")

# node exporter extras (the DCGM/EFA names themselves are in monitoring.gpu / monitoring.efa)
NODE_EXPORTER_INFO = P + "node_exporter_info"  # {gpu_source, efa_source} = 1
EFA_EXPECTED_DEVICES = P + "efa_expected_devices"

# file_sd target labels
TARGET_LABELS_RANK = ("run", "rank", "local_rank", "host", "gpu", "slurm_job")
TARGET_LABELS_NODE = ("run", "host", "slurm_job", "exporter")

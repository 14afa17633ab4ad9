"""The Llama-style GPT (RMSNorm, SwiGLU, RoPE, GQA; QKV biases for Qwen2) on megatron-core's layers.

``build_model`` returns one model chunk per virtual pipeline stage of this rank, already
initialised layout-independently (see :mod:`trainer.param_init`), cast for mixed precision and
wrapped in megatron's ``DistributedDataParallel``.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from configs.schema import ModelConfig, ParallelismConfig
from memory_predictor.kernels import Kernels, choose_kernels
from configs.derived import padded_vocab_size
from configs.errors import ConfigError, Problem
from trainer.param_init import initialize_layout_independent

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from megatron's norm arguments.

    megatron's own wrapper for the local spec (``WrappedTorchNorm``) refuses sequence
    parallelism. Under SP each rank normalises its own sequence slice, so the weight gradient
    is partial: marking the weight ``sequence_parallel`` makes ``finalize_model_grads``
    all-reduce it over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_kernels(gpu_type: str, gloo: bool, planned: Optional[bool] = None) -> Kernels:
    """The launch's kernel decision (``cluster.transformer_engine``), checked against this process.

    ``planned=None`` (a config not written by the launcher): whatever is importable here. A plan
    of Transformer Engine kernels that cannot be imported is an error, never a silent fallback to
    the slower, hungrier local layers the plan did not size."""
    if gloo:
        return choose_kernels("cpu", transformer_engine=False)
    have = transformer_engine_importable()
    if planned and not have:
        raise ConfigError([Problem("cluster.transformer_engine", True, f"the launch planned Transformer Engine kernels "
                                   f"but transformer_engine cannot be imported on {socket.gethostname()}: install it "
                                   "in the image (NGC/DLC PyTorch images carry it), or launch again with "
                                   "cluster.transformer_engine=false (local layers: slower, more memory)")])
    return choose_kernels(gpu_type, transformer_engine=have if planned is None else planned)


def transformer_config(model: ModelConfig, par: ParallelismConfig, precision: str, *, gloo: bool,
                       kernels: Optional[Kernels] = None) -> TransformerConfig:
    """megatron's TransformerConfig for this model, layout, precision and kernels."""
    kernels = kernels or runtime_kernels("gpu", gloo)
    te = kernels.transformer_engine
    if par.cp > 1 and not te:
        raise ConfigError([Problem("parallelism.cp", par.cp, "context parallelism needs Transformer Engine "
                                   "attention; this trainer uses megatron's local layers: set cp=1")])
    if par.tp_comm_overlap and not te:
        raise ConfigError([Problem("parallelism.tp_comm_overlap", True, "needs Transformer Engine "
                                   "userbuffers; this trainer uses megatron's local layers: set it false")])
    dtype = _DTYPES[precision]
    recompute: dict[str, Any] = {}
    if par.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif par.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": par.recompute_num_layers}
    vpp = par.vpp if par.vpp and par.vpp > 1 else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        init_method_std=model.init_method_std,
        layernorm_epsilon=model.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        kv_channels=model.head_dim,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fusions: the one kernel decision (memory_predictor.kernels), which the predictor also uses
        bias_activation_fusion=kernels.fused_swiglu,
        bias_dropout_fusion=False,  # no dropout
        masked_softmax_fusion=kernels.masked_softmax_fusion,
        apply_rope_fusion=kernels.rope_fusion,
        gradient_accumulation_fusion=kernels.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=kernels.cross_entropy_fusion,
        cross_entropy_fusion_impl=kernels.cross_entropy_impl,  # type: ignore[arg-type]
        persist_layer_norm=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel,
        tp_comm_overlap=par.tp_comm_overlap and te,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=gloo,
        # gloo + interleaved pipeline + batched isend/irecv swaps tensors silently
        batch_p2p_comm=not gloo,
        variable_seq_lengths=False,
        deallocate_pipeline_outputs=True,
        calculate_per_token_loss=True,  # the loss is a sum over loss-bearing tokens (SFT masks); see trainer.step
        **recompute,
    )


def _layer_stack_spec(config: TransformerConfig, vp_stage: int | None, te: bool = False) -> Any:
    if te:
        # TE's fused layers: context parallelism (TE attention), TP comm overlap, TE RMSNorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = dataclasses.replace(
        local, submodules=dataclasses.replace(local.submodules, input_layernorm=TorchRMSNorm,
                                              pre_mlp_layernorm=TorchRMSNorm))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TorchRMSNorm)


def llama3_inv_freq(inv_freq: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Llama 3.x RoPE scaling ("rope_type": "llama3") with all four of its parameters.

    megatron-core fixes low/high frequency factors and the original context (1, 4, 8192); the
    published configs may differ (Llama 3.2 uses factor 32), so the frequencies are set here.
    """
    factor = float(model.rope_scaling_factor or 1.0)
    low, high = model.rope_scaling_low_freq_factor, model.rope_scaling_high_freq_factor
    old = float(model.rope_scaling_original_max_position)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


class PaddedVocabMask:
    """Forward hook of the output layer: logits of the padding rows never win the softmax.

    megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by``; without the
    mask the padding logits (0 for zero rows) enter the softmax and the loss differs from the
    Hugging Face model's. Their gradient is zero, so the padding rows never train either.
    """

    def __init__(self, vocab_size: int, padded: int, tp_rank: int, tp_size: int) -> None:
        per_rank = padded // tp_size
        self.valid = max(0, min(per_rank, vocab_size - tp_rank * per_rank))
        self.per_rank = per_rank

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        logits, bias = output
        if self.valid >= self.per_rank:
            return output
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask[self.valid:] = True
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min), bias


class PositionRoPEGPTModel(GPTModel):
    """RoPE angles from ``position_ids`` per token, so positions restart in every packed document.

    megatron's rope path ignores ``position_ids`` (it uses 0..s-1); this replaces the ``[s,1,1,d]``
    table by an ``[s,b,1,d]`` one that ``_apply_rotary_pos_emb_bshd`` broadcasts over heads. With
    positions 0..s-1 it is bit-identical to GPTModel. Used for packed SFT on megatron's local
    layers (with Transformer Engine, THD ``PackedSeqParams`` restart RoPE per sequence instead).
    """

    def _preprocess(self, input_ids: Any, position_ids: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if self.position_embedding_type != "rope" or out[1] is None or kwargs.get("inference_context") is not None:
            return out
        if position_ids is None:
            raise ValueError("packed sequences: every pipeline stage needs position_ids")
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        freqs = position_ids.t().to(inv_freq.dtype)[..., None] * inv_freq  # [s, b, d/2]
        return (out[0], torch.cat([freqs, freqs], dim=-1)[:, :, None, :], *out[2:])


def _gpt_chunk(model: ModelConfig, config: TransformerConfig, vp_stage: int | None,
               packed_positions: bool = False, te: bool = False) -> GPTModel:
    rope_base: float = model.rope_theta
    cls = PositionRoPEGPTModel if packed_positions else GPTModel
    chunk = cls(
        config=config,
        transformer_layer_spec=_layer_stack_spec(config, vp_stage, te),  # type: ignore[arg-type]
        vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=rope_base,  # type: ignore[arg-type]  # megatron annotates int; float works
        vp_stage=vp_stage,
    )
    if model.rope_scaling_factor is not None:
        rotary = chunk.rotary_pos_emb
        rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, model)
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by)
    if chunk.post_process and padded > model.vocab_size:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        chunk.output_layer.register_forward_hook(PaddedVocabMask(model.vocab_size, padded, tp_rank, tp_size))
    return chunk


def build_model(model: ModelConfig, par: ParallelismConfig, config: TransformerConfig,
                seed: int, *, packed_positions: bool = False,
                kernels: Optional[Kernels] = None) -> list[DistributedDataParallel]:
    """This rank's model chunks (one per virtual stage), initialised and DDP-wrapped.

    ``packed_positions``: RoPE from per-token positions (packed SFT on the local layers)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages: list[int | None] = list(range(vpp)) if vpp else [None]
    te = (kernels or runtime_kernels("gpu", gloo=not torch.cuda.is_available())).transformer_engine
    chunks = [_gpt_chunk(model, config, stage, packed_positions, te) for stage in stages]
    for chunk in chunks:
        initialize_layout_independent(chunk, config, seed=seed, tied_embeddings=model.tie_embeddings)
    modules: list[torch.nn.Module] = list(chunks)
    if config.bf16 or config.fp16:
        modules = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather and par.distributed_optimizer,
        use_distributed_optimizer=par.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=module,
                                disable_bucketing=index > 0)  # megatron-lm: bucket only chunk 0
        for index, module in enumerate(modules)
    ]


def gpt_module(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside the DDP / Float16Module wrappers."""
    module = chunk
    while not isinstance(module, GPTModel):
        inner = getattr(module, "module", None)
        if inner is None:
            raise TypeError(f"no GPTModel inside {type(chunk).__name__}")
        module = inner
    return module


"""Qwen3-MoE (e.g. Qwen3-30B-A3B): Qwen3's attention (q/k RMSNorm) on Llama's decoder skeleton, with a sparse MoE
block in the layers HF makes sparse (not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0) and a dense
MLP of intermediate_size elsewhere. Experts are sharded over tensor-parallel ranks along their intermediate
dimension (layers/fused_moe.py)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import AttentionBackend
from nanovllm.layers.fused_moe import FusedMoE, ReplicatedLinear, expert_packed_modules_mapping
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """HF's rule for which decoder layers get the MoE block."""
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1)
    return layer_idx not in mlp_only and config.num_experts > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) + the experts; x [T, H] -> [T, H]."""

    def __init__(self, config: PretrainedConfig, tp: TPInfo) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        self.experts = FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, bool(config.norm_topk_prob), tp)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))  # router logits [T, E] in the model dtype


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend) -> None:
        step = getattr(config, "decoder_sparse_step", 1)
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"decoder_sparse_step must be an integer >= 1, got {step!r}")
        super().__init__(config, tp, backend)
        # per model: the expert entries depend on num_experts and must precede the dense ones
        self.packed_modules_mapping = (expert_packed_modules_mapping(config.num_experts)
                                       | LlamaForCausalLM.packed_modules_mapping)

    def make_layer(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend,
                   rotary_emb: RotaryEmbedding, layer_idx: int) -> LlamaDecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attn = LlamaAttention(config, tp, backend, rotary_emb, qkv_bias=bias, o_bias=bias, qk_norm=True)
        if is_sparse_layer(config, layer_idx):
            mlp = Qwen3MoeSparseMoeBlock(config, tp)
        else:
            mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp)
        return LlamaDecoderLayer(attn, mlp, config)

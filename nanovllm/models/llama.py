"""Llama 3.x built from tensor-parallel layers, and the decoder skeleton Qwen2 and Qwen3-MoE reuse (they differ in
biases, q/k norms and the MLP: subclasses override `make_layer`). Parameter names follow the HF checkpoint."""
import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import Attention, AttentionBackend
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, get_rope
from nanovllm.models.utils import head_dim_of


class LlamaAttention(nn.Module):
    """qkv projection (optionally biased), optional per-head q/k RMSNorm (Qwen3), RoPE, paged attention, o_proj.
    `rotary_emb` is shared by all layers of a model."""

    def __init__(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        total_heads = config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, config.num_key_value_heads,
                                          bias=qkv_bias, tp=tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=o_bias, tp=tp)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads, backend)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)      # [N, H * D] -> [N, H, D] (strided views of qkv)
        k = k.view(-1, self.num_kv_heads, self.head_dim)   # [N, H_kv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, positions, self.rotary_emb, self.q_norm, self.k_norm)
        return self.o_proj(o.flatten(1, -1))  # [N, H, D] -> [N, H * D] -> [N, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, tp: TPInfo,
                 bias: bool = False) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate) * up); the activation is applied by the down projection (gated), fused at decode sizes."""
        return self.down_proj(self.gate_up_proj(x), gated=True)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); the residual add is fused into the next norm."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, config: PretrainedConfig) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama 3.x: no biases unless the config's attention_bias / mlp_bias say so, RoPE default or 'llama3' scaled,
    tied or untied embeddings."""
    # checkpoint name part -> (our parameter name part, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend) -> None:
        super().__init__()
        rotary_emb = get_rope(config, head_dim_of(config))
        layers = [self.make_layer(config, tp, backend, rotary_emb, i) for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, tp, layers)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend,
                   rotary_emb: RotaryEmbedding, layer_idx: int) -> LlamaDecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attn = LlamaAttention(config, tp, backend, rotary_emb, qkv_bias=bias, o_bias=bias)
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp,
                       bias=bool(getattr(config, "mlp_bias", False)))
        return LlamaDecoderLayer(attn, mlp, config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden_states)

"""Qwen3: Llama's decoder (models/llama.py) with a per-head RMSNorm on q and k before RoPE (kept, as in HF, when
attention_bias adds q/k/v/o biases). Parameter names follow the HF checkpoint."""
from transformers import PretrainedConfig

from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import AttentionBackend
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend,
                   rotary_emb: RotaryEmbedding, layer_idx: int) -> LlamaDecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attn = LlamaAttention(config, tp, backend, rotary_emb, qkv_bias=bias, o_bias=bias, qk_norm=True)
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp)
        return LlamaDecoderLayer(attn, mlp, config)

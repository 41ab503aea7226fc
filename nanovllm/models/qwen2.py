"""Qwen2 / Qwen2.5: Llama's decoder with biased q/k/v projections (o_proj and the MLP unbiased) and no q/k norm.
Sliding-window configs are refused by models.check_model_config (only `use_sliding_window: true` turns it on)."""
from transformers import PretrainedConfig

from nanovllm.distributed.tp import TPInfo
from nanovllm.layers.attention import AttentionBackend
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: PretrainedConfig, tp: TPInfo, backend: AttentionBackend,
                   rotary_emb: RotaryEmbedding, layer_idx: int) -> LlamaDecoderLayer:
        attn = LlamaAttention(config, tp, backend, rotary_emb, qkv_bias=True, o_bias=False)
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp)
        return LlamaDecoderLayer(attn, mlp, config)

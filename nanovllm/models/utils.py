"""Small facts read off a Hugging Face model config, shared by the models and the KV-cache sizing."""
from transformers import PretrainedConfig


def head_dim_of(hf_config: PretrainedConfig) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def uses_sliding_window(hf_config: PretrainedConfig) -> bool:
    layer_types = getattr(hf_config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        return True
    return bool(getattr(hf_config, "use_sliding_window", False) and getattr(hf_config, "sliding_window", None))

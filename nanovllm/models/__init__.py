"""Model registry: Hugging Face `architectures` name -> our model class."""
from transformers import PretrainedConfig

from nanovllm.layers.rotary_embedding import rope_parameters_of
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM
from nanovllm.models.utils import uses_sliding_window

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(hf_config: PretrainedConfig, where: str = "model") -> type:
    """The class for the checkpoint's architecture; ValueError listing the supported ones."""
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"{where} has architectures {archs} (model_type {getattr(hf_config, 'model_type', None)!r}); "
                     f"supported: {sorted(MODEL_REGISTRY)}")


def check_model_config(hf_config: PretrainedConfig, where: str = "model") -> None:
    """ValueError for a checkpoint we cannot run correctly."""
    model_class(hf_config, where)
    if uses_sliding_window(hf_config):
        raise ValueError(f"{where} uses sliding-window attention (use_sliding_window / layer_types with "
                         f"'sliding_attention', sliding_window={getattr(hf_config, 'sliding_window', None)}), which "
                         "this engine does not implement; running it with full attention would give wrong outputs. "
                         "Use a checkpoint with use_sliding_window=false")
    try:
        rope_parameters_of(hf_config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e

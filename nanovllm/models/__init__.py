from nanovllm.models.qwen3 import Qwen3ForCausalLM

# HF `architectures` name -> model class
MODEL_REGISTRY = {"Qwen3ForCausalLM": Qwen3ForCausalLM}

"""nano-vllm: a small, fast offline LLM inference engine."""
from nanovllm.engine.errors import CheckpointError, EngineDeadError, RequestsFailedError
from nanovllm.entrypoints.async_llm import AsyncLLM as AsyncLLM  # re-exported (imports no server packages)
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "CheckpointError", "EngineDeadError", "RequestsFailedError"]

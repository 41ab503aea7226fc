"""Support for tests and benchmarks (not used by the engine): tiny random checkpoints, a random Qwen3-0.6B, the
teacher-forced check against HF, and fault injection into tensor-parallel workers."""
from nanovllm.testing.checkpoints import build_tokenizer, make_checkpoint
from nanovllm.testing.faults import WorkerFault, install_fault

__all__ = ["build_tokenizer", "make_checkpoint", "WorkerFault", "install_fault"]

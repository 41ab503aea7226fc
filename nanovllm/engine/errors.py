"""Exceptions for failures inside a step (bad input raises ValueError / FileNotFoundError before any work)."""


class EngineDeadError(RuntimeError):
    """A tensor-parallel worker died or raised, or rank 0 failed in the middle of a tensor-parallel step. The
    engine cannot run again: every later call raises this too (exit() still cleans up); create a new LLM."""


class RequestsFailedError(RuntimeError):
    """A step failed: the requests in request_ids were aborted and removed (blocks freed, the prefix-cache
    entries of their blocks forgotten). The original exception is chained as __cause__. Unless that is an
    EngineDeadError, the engine can run again."""

    def __init__(self, message: str, request_ids: list[int]) -> None:
        super().__init__(message)
        self.request_ids = request_ids

    def __reduce__(self) -> tuple:  # picklable (AsyncLLM's engine process sends it to the parent)
        return type(self), (str(self), self.request_ids)


class CheckpointError(ValueError):
    """The checkpoint's weights cannot be loaded: a safetensors file is unreadable (corrupt or truncated), a tensor
    has the wrong shape, or parameters are missing or unknown. The message names the file or tensors. Raised the same
    way whatever the tensor-parallel size."""

"""Per-step attention metadata, set once per forward and read by every attention layer."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Context:
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None   # [B+1] int32, prefix sums of query lengths
    cu_seqlens_k: torch.Tensor | None = None   # [B+1] int32, prefix sums of key lengths (chunk ends)
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None   # [N] int32, cache slot of each new token, -1 = skip
    context_lens: torch.Tensor | None = None   # [B] int32, decode: keys per sequence
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32, -1 padded


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(**kwargs) -> None:
    global _CONTEXT
    _CONTEXT = Context(**kwargs)


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()


@contextmanager
def forward_context(**kwargs) -> Iterator[Context]:
    """Set the step's metadata for the duration of one forward; cleared even when it raises."""
    set_context(**kwargs)
    try:
        yield _CONTEXT
    finally:
        reset_context()

"""Per-step attention metadata, set once per forward and read by every attention layer.

It is thread-local: two engines driven from two threads each see their own step's metadata."""
import threading
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
    decode_order: torch.Tensor | None = None   # [B] int32, decode: rows by context length, longest first
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32, -1 padded


_EMPTY = Context()
_LOCAL = threading.local()


def get_context() -> Context:
    return getattr(_LOCAL, "context", _EMPTY)


@contextmanager
def forward_context(context: Context) -> Iterator[Context]:
    """Make context this thread's step metadata for the duration of one forward; cleared even when it raises."""
    _LOCAL.context = context
    try:
        yield context
    finally:
        _LOCAL.context = _EMPTY

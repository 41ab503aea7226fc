"""Typed messages from rank 0 to the tensor-parallel workers (pickled into the shared-memory channel).

Workers never see a Sequence: a step is described by flat arrays, built on rank 0 by engine/step_builder.py."""
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class SamplingInput:
    """Per-row sampling parameters, used on rank 0 only (workers receive the step without them)."""
    temperatures: np.ndarray        # [B] float32, 0 = greedy
    seeds: np.ndarray               # [B] int64, the counter RNG's key per row
    positions: np.ndarray           # [B] int64, index of the token each row samples (the RNG's counter)
    top_k: np.ndarray | None = None  # [B] int32, <= 0 = off; None when no row filters (top-k / top-p)
    top_p: np.ndarray | None = None  # [B] float32, 1 = off
    min_p: np.ndarray | None = None  # [B] float32, 0 = off; None when no row uses it
    banned: np.ndarray | None = None  # [2, M] int64: (row, token id) pairs masked out (min_tokens)
    logprob_rows: np.ndarray | None = None  # [R] int64 rows that want logprobs; None when none does
    num_logprobs: int = 0                   # top-k logprobs per such row (the largest any of them asks for)


@dataclass
class StepInput:
    """One forward step. N = tokens computed, B = sequences, W = block-table width."""
    is_prefill: bool
    input_ids: np.ndarray           # [N] int32; -1 where the id is a sample of the previous step still on device
    prev_rows: np.ndarray | None    # [N] int32 row of the previous step's sampled ids to take (-1: input_ids'); None
    positions: np.ndarray           # [N] int32
    slot_mapping: np.ndarray        # [N] int32, cache slot of each token's K/V, -1 = skip
    block_tables: np.ndarray        # [B, W] int32, -1 padded
    cu_seqlens_q: np.ndarray | None = None  # [B+1] int32 (prefill)
    cu_seqlens_k: np.ndarray | None = None  # [B+1] int32 (prefill): keys run to each chunk's end
    context_lens: np.ndarray | None = None  # [B] int32 (decode)
    decode_order: np.ndarray | None = None  # [B] int32 (decode): rows by context length, longest first
    sampling: SamplingInput | None = None

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


@dataclass
class InstallHook:
    """Run hook(runner, step) at the start of every later step on the workers (fault injection in tests)."""
    hook: Callable


@dataclass
class Shutdown:
    """Free everything and leave the worker loop."""


Message = StepInput | InstallHook | Shutdown

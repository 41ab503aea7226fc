"""Rank 0: turn a scheduled batch into the StepInput message every rank executes (flat numpy arrays)."""
from collections.abc import Callable

import numpy as np

from nanovllm.engine.sequence import PENDING, Sequence
from nanovllm.worker.messages import SamplingInput, StepInput


def build_step_input(seqs: list[Sequence], is_prefill: bool, block_size: int,
                     banned_tokens: Callable[[Sequence, int], list[int]]) -> StepInput:
    """Called after scheduling and before the batch is marked launched (num_scheduled_tokens are set)."""
    step = build_prefill(seqs, block_size) if is_prefill else build_decode(seqs, block_size)
    step.sampling = build_sampling(seqs, banned_tokens)
    return step


def block_tables(seqs: list[Sequence]) -> np.ndarray:
    """[B, W] int32, row i = seqs[i].block_table padded with -1."""
    table = np.full((len(seqs), max(len(seq.block_table) for seq in seqs)), -1, dtype=np.int32)
    for i, seq in enumerate(seqs):
        table[i, :len(seq.block_table)] = seq.block_table
    return table


def slots(tables: np.ndarray, rows: np.ndarray | int, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slot of each position: its block (looked up in the row's block table) * block_size + offset."""
    return tables[rows, positions // block_size] * block_size + positions % block_size


def build_prefill(seqs: list[Sequence], block_size: int) -> StepInput:
    """Each sequence's scheduled tokens (never pending: only decode reads a previous step's sample)."""
    tables = block_tables(seqs)
    input_ids, positions, slot_mapping = [], [], []
    cu_q, cu_k = [0], [0]
    for i, seq in enumerate(seqs):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
        input_ids.extend(seq.token_ids[start:end])
        pos = np.arange(start, end, dtype=np.int32)
        positions.append(pos)
        slot_mapping.append(slots(tables, i, pos, block_size))
        cu_q.append(cu_q[-1] + end - start)
        cu_k.append(cu_k[-1] + end)  # keys run to the chunk's end (GeeeekExplorer/nano-vllm#212)
    return StepInput(is_prefill=True, input_ids=np.asarray(input_ids, dtype=np.int32), prev_rows=None,
                     positions=np.concatenate(positions), slot_mapping=np.concatenate(slot_mapping).astype(np.int32),
                     block_tables=tables, cu_seqlens_q=np.asarray(cu_q, dtype=np.int32),
                     cu_seqlens_k=np.asarray(cu_k, dtype=np.int32))


def build_decode(seqs: list[Sequence], block_size: int) -> StepInput:
    """One token per sequence: the one at num_computed_tokens (its last), which may still be pending on the device,
    then taken from the previous step's sampled ids (row last_sample_row)."""
    n = len(seqs)
    tables = block_tables(seqs)
    positions = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int32, count=n)
    input_ids = np.fromiter((seq.token_ids[seq.num_computed_tokens] for seq in seqs), dtype=np.int32, count=n)
    pending = input_ids == PENDING
    prev_rows = None
    if pending.any():
        prev_rows = np.fromiter((seq.last_sample_row for seq in seqs), dtype=np.int32, count=n)
        prev_rows[~pending] = -1
    slot_mapping = slots(tables, np.arange(n), positions, block_size)
    context_lens = positions + 1
    return StepInput(is_prefill=False, input_ids=input_ids, prev_rows=prev_rows, positions=positions,
                     slot_mapping=slot_mapping, block_tables=tables, context_lens=context_lens,
                     decode_order=decode_order(context_lens))


def decode_order(context_lens: np.ndarray) -> np.ndarray:
    """Rows by context length, longest first (ties in row order): the decode attention kernel starts the long
    sequences' programs first, so no long one is left running alone at the end."""
    return np.argsort(-context_lens, kind="stable").astype(np.int32)


def build_sampling(seqs: list[Sequence], banned_tokens: Callable[[Sequence, int], list[int]]) -> SamplingInput:
    """Row i samples the token at index len(seqs[i]) (when the step reaches the sequence's end)."""
    params = [seq.sampling_params for seq in seqs]
    temperatures = np.array([0.0 if p.greedy else p.temperature for p in params], dtype=np.float32)
    sampled = [p for p in params if not p.greedy]
    use_sort = any(p.top_k > 0 or p.top_p < 1 for p in sampled)
    banned = [(i, t) for i, seq in enumerate(seqs) if seq.samples_this_step
              for t in banned_tokens(seq, seq.num_tokens - seq.num_prompt_tokens)]
    logprob_rows = [i for i, seq in enumerate(seqs) if seq.sampling_params.logprobs is not None and
                    seq.samples_this_step]
    return SamplingInput(
        temperatures=temperatures,
        seeds=np.array([seq.sampling_seed for seq in seqs], dtype=np.int64),
        positions=np.array([seq.num_tokens for seq in seqs], dtype=np.int64),
        top_k=np.array([p.top_k for p in params], dtype=np.int32) if use_sort else None,
        top_p=np.array([p.top_p for p in params], dtype=np.float32) if use_sort else None,
        min_p=np.array([p.min_p for p in params], dtype=np.float32) if any(p.min_p > 0 for p in sampled) else None,
        banned=np.array(banned, dtype=np.int64).T.copy() if banned else None,
        logprob_rows=np.array(logprob_rows, dtype=np.int64) if logprob_rows else None,
        num_logprobs=max((seqs[i].sampling_params.logprobs for i in logprob_rows), default=0))

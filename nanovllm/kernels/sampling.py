"""Fused Gumbel-max sampling: one Triton pass over the logits, seeded noise generated in-kernel.

Row b samples argmax_v(logits[b, v] / T_b + g[b, v]) with Gumbel noise g = -log(-log(u)), where
u[b, v] = sampling_rng.seeded_uniform(seeds, positions, V)[b, v] is recomputed bit for bit in the kernel
(the same counter hash in uint32 arithmetic). Rows with T_b < GREEDY_EPS take the plain argmax. Ties go to the
lowest index. This is the exponential trick of layers/sampler.py (argmax of softmax(logits / T) / Exp(1) noise
with Exp = -log(u)) written in the log domain, so the same seeds sample the same tokens up to float rounding.

Kernel layout: grid (row groups, vocabulary chunks). A program takes ROWS (1, 2 or 4) rows x one chunk, walks
the chunk in tiles, and keeps per-lane running (best score, its index) per row; the column half of the hash is
read from a per-(vocab, device) table (column_hashes) and shared by the rows (rows are unrolled, so each lane
holds every row of its columns).
Chunks meet in a caller-owned workspace (new_workspace): each program folds every row's winner into the row's
slot with one 64-bit atomic max on (ordered score, inverted index), then counts itself done on the row group's
counter; the last program of the group writes the ids and resets the slots and the counter for the next launch
(the workspace is left as it was found, so one built before CUDA graph capture serves every replay). No second
kernel; a single-chunk vocabulary writes the ids directly. The grid depends only on (B, V): no host syncs.

Float notes (GPU): the noise is computed in the log2 domain (argmax unchanged) with the hardware lg2.approx (ftz:
no subnormal fix-ups; every input is normal); -log2(u) takes a 2-term series in w = 1 - u for w < 2**-8, where
lg2.approx would lose relative accuracy, so -log2(u) keeps a relative error below ~4e-5 everywhere (the score
moves far less than a bf16 logit's rounding). NaN logits are never picked (torch.argmax would).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch import cuda_sm_count, pdl_launch, use_pdl, wait_for_previous_kernel
from nanovllm.layers.sampling_rng import seeded_uniform, value_hash

GREEDY_EPS = 1e-5
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_GREEDY_EPS: tl.constexpr = tl.constexpr(GREEDY_EPS)
_INT32_MAX: tl.constexpr = tl.constexpr(2**31 - 1)
INT64_MIN = -2**63
_INT64_MIN: tl.constexpr = tl.constexpr(INT64_MIN)


# ----------------------------------------------------------------------------------------------
# Counter hash (uint32 twin of layers/sampling_rng.py)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (products wrap mod 2**32, as sampling_rng.mul32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _value_hash(value):
    """The key-independent half of sampling_rng.combine: mix32(value * GOLDEN ^ 0x5BD1E995)."""
    return _mix32((value * 0x9E3779B9) ^ 0x5BD1E995)


@triton.jit
def _cell_bits(keys, column_hash):
    """sampling_rng.cell_bits: the per-logit mix of a row key and a column hash."""
    x = (keys ^ column_hash) * 0x7FEB352D
    return (x ^ (x >> 15)) * 0x846CA68B


@triton.jit
def _row_keys(seeds, positions):
    """uint32 keys of sampling_rng.row_keys from int64 seeds and positions."""
    key = _mix32(seeds.to(tl.uint32))
    key = _mix32(key ^ _value_hash((seeds >> 32).to(tl.uint32)))
    return _mix32(key ^ _value_hash(positions.to(tl.uint32)))


@triton.jit
def _uniform(bits):
    """((bits >> 9) + 0.5) * 2**-23 exactly, as seeded_uniform: 1.m in [1, 2) from the bits, minus (1 - 2**-24)."""
    one_m = ((bits >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    return one_m - 0.99999994039535522


# ----------------------------------------------------------------------------------------------
# Gumbel-max kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _log2(x, APPROX: tl.constexpr):
    if APPROX:  # one MUFU op on NVIDIA GPUs (ftz: every input here is a normal float, no subnormal fix-up)
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _neg_log2_uniform(u, APPROX: tl.constexpr):
    """-log2(u) with small relative error for u in (0, 1), also next to 1: log2(e) (w + w^2/2) for w = 1 - u
    < 2**-8 (truncation < w^2/3 <= 2**-17.6 relative), else -lg2(u) (relative error <= 2**-22 / (2**-8 log2 e)
    = 4.2e-5: the score moves by < 6e-5, far below a bf16 logit's rounding)."""
    w = 1.0 - u  # exact for u on the 2**-24 grid
    series = w * (LOG2E + w * (LOG2E / 2))
    return tl.where(w < 0.00390625, series, -_log2(u, APPROX))


@triton.jit
def _best_update(best_val, best_tile, score, tile):
    """Per-lane running argmax over tiles, keeping the tile number (a scalar: no per-element column index);
    strict > keeps the earlier (lower) index on ties."""
    take = score > best_val
    return tl.where(take, score, best_val), tl.where(take, tile, best_tile)


@triton.jit
def _lane_argmax(best_val, best_idx):
    """[TILE_V] lanes -> (max, lowest index reaching it)."""
    top = tl.max(best_val, 0)
    return top, tl.min(tl.where(best_val == top, best_idx, _INT32_MAX), 0)


@triton.jit
def _row_params(temp_ptr, seed_ptr, pos_ptr, row, num_rows):
    """Scalars of one row: in the batch?, sampled?, log2(e) / T, hash key. Rows past the batch read as greedy."""
    ok = row < num_rows
    temp = tl.load(temp_ptr + row, mask=ok, other=0.0)
    sampled = temp >= _GREEDY_EPS
    coef = LOG2E / tl.where(sampled, temp, 1.0)
    key = _row_keys(tl.load(seed_ptr + row, mask=ok, other=0), tl.load(pos_ptr + row, mask=ok, other=0))
    return ok, sampled, coef, key


@triton.jit
def _gumbel_score(x, col_hash, sampled, coef, key, MIXED: tl.constexpr, APPROX_LOG: tl.constexpr):
    """x [TILE_V] fp32 -> x log2(e) / T - log2(-log2 u) if the row is sampled (a scalar; always when not MIXED),
    else x."""
    noise = _log2(_neg_log2_uniform(_uniform(_cell_bits(key, col_hash)), APPROX_LOG), APPROX_LOG)
    score = x * coef - noise
    if MIXED:  # a program with greedy rows: one more select per element
        score = tl.where(sampled, score, x)
    return score


@triton.jit
def _gumbel_rows(x0, x1, x2, x3, col_hash, sampled0, sampled1, sampled2, sampled3, coef0, coef1, coef2, coef3,
                 key0, key1, key2, key3, ROWS: tl.constexpr, MIXED: tl.constexpr, APPROX_LOG: tl.constexpr):
    """_gumbel_score of each of the ROWS rows (the others pass through)."""
    x0 = _gumbel_score(x0, col_hash, sampled0, coef0, key0, MIXED, APPROX_LOG)
    if ROWS > 1:
        x1 = _gumbel_score(x1, col_hash, sampled1, coef1, key1, MIXED, APPROX_LOG)
    if ROWS > 2:
        x2 = _gumbel_score(x2, col_hash, sampled2, coef2, key2, MIXED, APPROX_LOG)
        x3 = _gumbel_score(x3, col_hash, sampled3, coef3, key3, MIXED, APPROX_LOG)
    return x0, x1, x2, x3


@triton.jit
def _pack(top, idx):
    """(score fp32, index int32) -> int64 whose signed order is the score's, then the lower index: the float's
    bits made order-preserving as int32 (negative floats flip their magnitude bits) above INT32_MAX - index."""
    bits = top.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & _INT32_MAX)
    return (ordered.to(tl.int64) << 32) | (idx.to(tl.int64) ^ _INT32_MAX)  # ^: INT32_MAX - idx


@triton.jit
def _fold_row(best_ptr, out_ptr, row, ok, best_val, best_tile, cols0, TILE_V: tl.constexpr, DIRECT: tl.constexpr):
    """A program's winner of one row: the id itself (DIRECT), or folded into the row's workspace slot."""
    top, idx = _lane_argmax(best_val, cols0 + best_tile * TILE_V)
    if DIRECT:
        tl.store(out_ptr + row, idx.to(tl.int64), mask=ok)
    else:
        tl.atomic_max(best_ptr + row, _pack(top, idx), mask=ok, sem="relaxed")


@triton.jit
def _finish_row(best_ptr, out_ptr, row, ok):
    """Last program of a row group: the row's folded winner -> its id; the slot back to INT64_MIN."""
    packed = tl.atomic_xchg(best_ptr + row, _INT64_MIN, mask=ok, sem="relaxed")
    tl.store(out_ptr + row, (packed & _INT32_MAX) ^ _INT32_MAX, mask=ok)


@triton.jit
def _load_rows(ptr0, ptr1, ptr2, ptr3, cols, full, limit, ROWS: tl.constexpr):
    """One tile [TILE_V] of each of the ROWS rows; unmasked when `full` (a uniform scalar: every column < limit),
    else columns >= limit read -inf. Rows r >= ROWS repeat row 0's tile (never used)."""
    if full:
        x0 = tl.load(ptr0 + cols)
        x1, x2, x3 = x0, x0, x0
        if ROWS > 1:
            x1 = tl.load(ptr1 + cols)
        if ROWS > 2:
            x2 = tl.load(ptr2 + cols)
            x3 = tl.load(ptr3 + cols)
    else:
        ok = cols < limit
        x0 = tl.load(ptr0 + cols, mask=ok, other=float("-inf"))
        x1, x2, x3 = x0, x0, x0
        if ROWS > 1:
            x1 = tl.load(ptr1 + cols, mask=ok, other=float("-inf"))
        if ROWS > 2:
            x2 = tl.load(ptr2 + cols, mask=ok, other=float("-inf"))
            x3 = tl.load(ptr3 + cols, mask=ok, other=float("-inf"))
    return x0, x1, x2, x3


@triton.jit
def _gumbel_partial_kernel(logits_ptr,   # [B, V] any row stride, last dim contiguous
                           temp_ptr,     # [B] fp32
                           seed_ptr,     # [B] int64
                           pos_ptr,      # [B] int64
                           best_ptr,     # [>= B] int64 workspace slots, INT64_MIN between launches (unused: DIRECT)
                           count_ptr,    # [>= B / ROWS] int64 workspace counters, 0 between launches (unused: DIRECT)
                           out_ptr,      # [B] int64
                           col_hash_ptr,  # [V] int32: sampling_rng.value_hash of each column (column_hashes)
                           num_rows, vocab, stride_b,
                           TILES,  # tiles per program: a runtime value, so batch sizes share one compiled kernel
                           ROWS: tl.constexpr, TILE_V: tl.constexpr,
                           DIRECT: tl.constexpr, APPROX_LOG: tl.constexpr, USE_PDL: tl.constexpr):
    # The ROWS (1, 2 or 4) rows are unrolled by hand, not a [ROWS, TILE_V] block: each lane then holds every row
    # of its columns, so the column half of the hash (a table read, not ~11 integer ops) serves them all, and a
    # row's temperature, key and greedy flag are scalars. Rows r >= ROWS are never touched.
    wait_for_previous_kernel(USE_PDL)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    row0 = tl.program_id(0) * ROWS
    end_row = tl.minimum(num_rows, row0 + ROWS)  # rows from here on read as greedy and masked
    ok0, sampled0, coef0, key0 = _row_params(temp_ptr, seed_ptr, pos_ptr, row0, end_row)
    ok1, sampled1, coef1, key1 = _row_params(temp_ptr, seed_ptr, pos_ptr, row0 + 1, end_row)
    ok2, sampled2, coef2, key2 = _row_params(temp_ptr, seed_ptr, pos_ptr, row0 + 2, end_row)
    ok3, sampled3, coef3, key3 = _row_params(temp_ptr, seed_ptr, pos_ptr, row0 + 3, end_row)
    any_sampled = sampled0 | sampled1 | sampled2 | sampled3
    # Every row of the program is sampled (rows outside it, or past the batch, count as sampled): no selects.
    all_sampled = tl.where(ok0, sampled0, True) & tl.where(ok1, sampled1, True) & tl.where(ok2, sampled2, True) \
        & tl.where(ok3, sampled3, True)
    # Rows past the batch read the last row (in bounds, so full tiles load unmasked) and are never stored.
    ptr0 = logits_ptr + row0.to(tl.int64) * stride_b
    ptr1 = logits_ptr + tl.minimum(row0 + 1, num_rows - 1).to(tl.int64) * stride_b
    ptr2 = logits_ptr + tl.minimum(row0 + 2, num_rows - 1).to(tl.int64) * stride_b
    ptr3 = logits_ptr + tl.minimum(row0 + 3, num_rows - 1).to(tl.int64) * stride_b

    start = chunk * (TILES * TILE_V)
    cols0 = start + tl.arange(0, TILE_V)
    val0 = tl.full([TILE_V], float("-inf"), tl.float32)
    val1, val2, val3 = val0, val0, val0
    zero = tl.zeros([TILE_V], tl.int32)
    tile0, tile1, tile2, tile3 = zero, zero, zero, zero  # each lane's best tile (all -inf: the first, lowest index)
    # Register double buffer: tile t + 1's logits load while tile t's noise is computed (TILES >= 1).
    nxt0, nxt1, nxt2, nxt3 = _load_rows(ptr0, ptr1, ptr2, ptr3, cols0, start + TILE_V <= vocab, vocab, ROWS)
    for t in tl.range(0, TILES):
        cols = cols0 + t * TILE_V
        x0, x1, x2, x3 = nxt0.to(tl.float32), nxt1.to(tl.float32), nxt2.to(tl.float32), nxt3.to(tl.float32)
        ahead_end = start + (t + 2) * TILE_V
        limit = tl.where(t + 1 == TILES, 0, vocab)  # nothing to prefetch after the last tile
        nxt0, nxt1, nxt2, nxt3 = _load_rows(ptr0, ptr1, ptr2, ptr3, cols + TILE_V, ahead_end <= limit, limit, ROWS)
        if any_sampled:  # a uniform branch: all-greedy programs skip the noise
            if ahead_end - TILE_V <= vocab:  # a full tile: no masks
                col_hash = tl.load(col_hash_ptr + cols)
            else:
                col_hash = tl.load(col_hash_ptr + cols, mask=cols < vocab, other=0)
            col_hash = col_hash.to(tl.uint32, bitcast=True)
            if all_sampled:  # uniform: the common case, no per-element select
                x0, x1, x2, x3 = _gumbel_rows(x0, x1, x2, x3, col_hash, sampled0, sampled1, sampled2, sampled3,
                                              coef0, coef1, coef2, coef3, key0, key1, key2, key3,
                                              ROWS, False, APPROX_LOG)
            else:
                x0, x1, x2, x3 = _gumbel_rows(x0, x1, x2, x3, col_hash, sampled0, sampled1, sampled2, sampled3,
                                              coef0, coef1, coef2, coef3, key0, key1, key2, key3,
                                              ROWS, True, APPROX_LOG)
        val0, tile0 = _best_update(val0, tile0, x0, t)
        if ROWS > 1:
            val1, tile1 = _best_update(val1, tile1, x1, t)
        if ROWS > 2:
            val2, tile2 = _best_update(val2, tile2, x2, t)
            val3, tile3 = _best_update(val3, tile3, x3, t)

    _fold_row(best_ptr, out_ptr, row0, ok0, val0, tile0, cols0, TILE_V, DIRECT)
    if ROWS > 1:
        _fold_row(best_ptr, out_ptr, row0 + 1, ok1, val1, tile1, cols0, TILE_V, DIRECT)
    if ROWS > 2:
        _fold_row(best_ptr, out_ptr, row0 + 2, ok2, val2, tile2, cols0, TILE_V, DIRECT)
        _fold_row(best_ptr, out_ptr, row0 + 3, ok3, val3, tile3, cols0, TILE_V, DIRECT)
    if not DIRECT:
        # acq_rel: this program's folds happen before its count; the last counter sees every program's folds.
        done = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
        if done == num_chunks - 1:
            _finish_row(best_ptr, out_ptr, row0, ok0)
            if ROWS > 1:
                _finish_row(best_ptr, out_ptr, row0 + 1, ok1)
            if ROWS > 2:
                _finish_row(best_ptr, out_ptr, row0 + 2, ok2)
                _finish_row(best_ptr, out_ptr, row0 + 3, ok3)
            tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def sampler_config(batch: int, vocab: int, device: torch.device) -> dict:
    """rows per program, tile width, tiles per program, warps: depends only on (batch, vocab, device)."""
    rows = min(2, triton.next_power_of_2(max(batch, 1)))
    if device.type != "cuda":  # interpreter: few, wide programs
        return {"rows": rows, "tile_v": min(64, triton.next_power_of_2(vocab)), "tiles": 4, "num_warps": 1}
    tile_v = 1024 if rows == 1 else 512
    sms = cuda_sm_count(device)
    groups, num_tiles = triton.cdiv(batch, rows), triton.cdiv(vocab, tile_v)
    # ~16 programs per SM. 2 rows x 512 columns (48 registers: ~10 programs resident per SM) beat 4 rows (80
    # registers) at B=256 on an H100 (fused_bench --sweep at 80d965b: 45.5 us for 12-16 tiles against 54.3 us
    # for 4 rows x 9 tiles)
    tiles = max(1, min(64, triton.cdiv(groups * num_tiles, 16 * sms)))
    return {"rows": rows, "tile_v": tile_v, "tiles": tiles, "num_warps": 4}


_COLUMN_HASHES: dict[tuple[int, str], torch.Tensor] = {}


def column_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """[vocab] int32: sampling_rng.value_hash of every vocabulary index (the column half of each logit's hash),
    built once per (vocab, device) and kept, so the kernel reads it instead of re-hashing every column in every
    row group. Built outside CUDA graph capture (warmup does it first)."""
    key = (vocab, str(device))
    table = _COLUMN_HASHES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the sampler's column-hash table for vocab {vocab} on {device} does not exist yet and "
                               "cannot be built during CUDA graph capture: call nanovllm.kernels.sampling.warmup "
                               "(or sample once) before capturing")
        hashes = value_hash(torch.arange(vocab, dtype=torch.int64, device=device))  # uint32 values in int64
        table = torch.where(hashes >= 2**31, hashes - 2**32, hashes).to(torch.int32)
        _COLUMN_HASHES[key] = table
    return table


def _check_inputs(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, out: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1 or logits.dtype not in (torch.float32, torch.float16,
                                                                           torch.bfloat16):
        raise ValueError(f"logits must be [B, V] fp32/fp16/bf16 with a contiguous last dim, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    batch = logits.shape[0]
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary dimension: nothing to sample")
    for name, t, dtype in (("temperatures", temperatures, torch.float32), ("seeds", seeds, torch.int64),
                           ("positions", positions, torch.int64)):
        if t.shape != (batch,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be [{batch}] {dtype} on {logits.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if out is not None and (out.shape != (batch,) or out.dtype != torch.int64 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{batch}] int64 tensor, got {tuple(out.shape)} {out.dtype}")


def new_workspace(max_batch: int, device: torch.device) -> torch.Tensor:
    """The split-vocabulary sampler's workspace for batches up to max_batch: [2, max_batch] int64, row 0 the per-row
    folded winners (INT64_MIN), row 1 the per-row-group counters (0). Every launch leaves it in this state, so one
    workspace serves every call and every CUDA graph replay on its stream (one launch at a time uses it)."""
    ws = torch.zeros(2, max(max_batch, 1), dtype=torch.int64, device=device)
    ws[0].fill_(INT64_MIN)
    return ws


def _check_workspace(ws: torch.Tensor, batch: int, device: torch.device) -> None:
    if ws.dim() != 2 or ws.shape[0] != 2 or ws.shape[1] < batch or ws.dtype != torch.int64 \
            or not ws.is_contiguous() or ws.device != device:
        raise ValueError(f"workspace must be new_workspace(max_batch >= {batch}, {device}) ([2, >= {batch}] "
                         f"contiguous int64), got {tuple(ws.shape)} {ws.dtype} on {ws.device}")


def sample_gumbel(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  out: torch.Tensor | None = None, config: dict | None = None,
                  workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [B] int64: argmax(logits / T + Gumbel(seed, position)) per row, plain argmax where
    T < GREEDY_EPS. logits [B, V] (row stride free); temperatures [B] fp32; seeds, positions [B] int64.
    Writes into `out` when given. `workspace` (new_workspace) is reused when given, else a fresh one is filled for
    the call. `config` overrides sampler_config (benchmarks only)."""
    _check_inputs(logits, temperatures, seeds, positions, out)
    batch, vocab = logits.shape
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    cfg = config or sampler_config(batch, vocab, logits.device)
    if cfg["rows"] not in (1, 2, 4):
        raise ValueError(f"sampler config rows={cfg['rows']}: the kernel unrolls 1, 2 or 4 rows per program")
    num_chunks = triton.cdiv(vocab, cfg["tile_v"] * cfg["tiles"])
    direct = num_chunks == 1
    if direct:
        workspace = out.view(1, -1)  # never touched
    elif workspace is None:
        workspace = new_workspace(batch, logits.device)
    else:
        _check_workspace(workspace, batch, logits.device)
    _gumbel_partial_kernel[(triton.cdiv(batch, cfg["rows"]), num_chunks)](
        logits, temperatures, seeds, positions, workspace[0], workspace[-1], out, column_hashes(vocab, logits.device),
        batch, vocab, logits.stride(0), cfg["tiles"],
        ROWS=cfg["rows"], TILE_V=cfg["tile_v"], DIRECT=direct,
        APPROX_LOG=logits.device.type == "cuda" and torch.version.hip is None,
        **pdl_launch(use_pdl(logits)), num_warps=cfg["num_warps"])
    return out


def warmup(vocab: int, max_batch: int, dtype: torch.dtype, device: torch.device) -> int:
    """Compile, once, every kernel variant sample_gumbel can pick for batches 1..max_batch (variants differ by rows
    per program, tile width, and direct vs split), so no compilation lands in a timed step.
    Builds the column-hash table too. Returns the number of variants."""
    keys = {}
    for batch in range(1, max_batch + 1):
        cfg = sampler_config(batch, vocab, device)
        num_chunks = triton.cdiv(vocab, cfg["tile_v"] * cfg["tiles"])
        key = (cfg["rows"], cfg["tile_v"], cfg["num_warps"], num_chunks == 1)
        keys.setdefault(key, batch)
    for batch in keys.values():
        logits = torch.zeros(batch, vocab, dtype=dtype, device=device)
        ones = torch.ones(batch, dtype=torch.float32, device=device)
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        sample_gumbel(logits, ones, zeros, zeros)
    return len(keys)


def gumbel_scores_torch(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                        positions: torch.Tensor) -> torch.Tensor:
    """[B, V] fp32 scores whose row argmax is the sample: logits / T + g (sampled rows), logits (greedy rows)."""
    x = logits.float()
    greedy = (temperatures < GREEDY_EPS).unsqueeze(1)
    u = seeded_uniform(seeds, positions, logits.shape[1])
    gumbel = -torch.log(-torch.log(u))
    temps = torch.where(greedy.squeeze(1), torch.ones_like(temperatures), temperatures)
    return torch.where(greedy, x, x / temps.unsqueeze(1) + gumbel)


def sample_gumbel_torch(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                        positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of sample_gumbel built on sampling_rng.seeded_uniform (same signature and semantics)."""
    _check_inputs(logits, temperatures, seeds, positions, out)
    result = gumbel_scores_torch(logits, temperatures, seeds, positions).argmax(dim=-1)
    if out is None:
        return result
    return out.copy_(result)

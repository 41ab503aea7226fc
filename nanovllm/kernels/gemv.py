"""Small-M linear for decode: y = x @ W^T (+ b) for x [M, K] with 1 <= M <= MAX_M, streaming W [N, K] once.

At batch 1-16 a linear layer is bound by reading its weight (cuBLAS reaches ~40% of HBM bandwidth there). Each
program streams a [BLOCK_N, BLOCK_K] tile sequence of W along K (16-byte loads along the contiguous K) and reads the
M rows of x beside it (x is tiny and stays in L1/L2). Two inner products, chosen per config:
- dot=False ("fma"): per x row, sum_k w * x on the CUDA cores in fp32; M is not padded but the work grows with it;
- dot=True: tl.dot(W tile [BLOCK_N, BLOCK_K], x^T [BLOCK_K, 16]) on the tensor cores (W on the MMA's M side,
  "swap AB"), so the math does not grow with M.
num_stages >= 2 streams W through shared memory with cp.async (every stage's loads in flight before the first use);
num_stages = 1 loads into registers (ptxas then keeps only a few 16-byte loads in flight per thread).
When N / BLOCK_N alone gives too few programs, K is split into SPLIT_K chunks: each chunk's fp32 partial sums go to a
workspace and a second small kernel adds them in a fixed order (deterministic), adds the bias and rounds once. The
grid depends only on the shapes (CUDA-graph safe); no host syncs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanovllm.kernels.activation import silu_and_mul_torch, silu_mul
from nanovllm.kernels.launch import cuda_sm_count, pdl_launch, use_pdl, wait_for_previous_kernel

MAX_M = 16                # rows of x this path takes; larger batches go to F.linear
FMA_MAX_M = 4             # default: CUDA-core inner product up to this M, tensor cores above
TILE_ELEMS = 8192         # default W elements per program per K step (16 KB of bf16)
MAX_BLOCK_K = 4096        # default: the whole K in one step up to this
REDUCE_BLOCK = 256        # outputs per program of the split-K reduction
INTERPRETER_SMS = 4       # nominal SM count for config choice on CPU (the Triton interpreter)
CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "dot")

# Measured configs keyed on (M bucket = next power of 2 of M, N, K); shapes not listed use default_config.
# Filled from `python3 -m benchmarks.gemv_bench --sweep` on an H100 (paste its printed dict here).
CONFIGS: dict[tuple[int, int, int], dict] = {
    (1, 1024, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 2, 'dot': False},
    (1, 1024, 3072): {'BLOCK_N': 1, 'BLOCK_K': 4096, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (1, 2048, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (1, 2048, 8192): {'BLOCK_N': 1, 'BLOCK_K': 4096, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (1, 3072, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (1, 4096, 1024): {'BLOCK_N': 16, 'BLOCK_K': 1024, 'SPLIT_K': 1, 'num_warps': 8, 'num_stages': 1, 'dot': False},
    (1, 6144, 1024): {'BLOCK_N': 16, 'BLOCK_K': 1024, 'SPLIT_K': 1, 'num_warps': 8, 'num_stages': 1, 'dot': False},
    (1, 16384, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 1024, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 1024, 3072): {'BLOCK_N': 1, 'BLOCK_K': 4096, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 2048, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 2048, 8192): {'BLOCK_N': 2, 'BLOCK_K': 4096, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 2, 'dot': False},
    (2, 3072, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 4096, 1024): {'BLOCK_N': 8, 'BLOCK_K': 1024, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (2, 6144, 1024): {'BLOCK_N': 32, 'BLOCK_K': 256, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (2, 16384, 2048): {'BLOCK_N': 2, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (4, 1024, 2048): {'BLOCK_N': 4, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (4, 1024, 3072): {'BLOCK_N': 2, 'BLOCK_K': 4096, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (4, 2048, 2048): {'BLOCK_N': 4, 'BLOCK_K': 2048, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (4, 2048, 8192): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (4, 3072, 2048): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 6, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (4, 4096, 1024): {'BLOCK_N': 4, 'BLOCK_K': 1024, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 1, 'dot': False},
    (4, 6144, 1024): {'BLOCK_N': 32, 'BLOCK_K': 256, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (4, 16384, 2048): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (8, 1024, 2048): {'BLOCK_N': 64, 'BLOCK_K': 64, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 4, 'dot': True},
    (8, 1024, 3072): {'BLOCK_N': 32, 'BLOCK_K': 256, 'SPLIT_K': 6, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (8, 2048, 2048): {'BLOCK_N': 64, 'BLOCK_K': 64, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 4, 'dot': True},
    (8, 2048, 8192): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (8, 3072, 2048): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 6, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (8, 4096, 1024): {'BLOCK_N': 16, 'BLOCK_K': 256, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 4, 'dot': True},
    (8, 6144, 1024): {'BLOCK_N': 16, 'BLOCK_K': 256, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 3, 'dot': True},
    (8, 16384, 2048): {'BLOCK_N': 64, 'BLOCK_K': 128, 'SPLIT_K': 1, 'num_warps': 4, 'num_stages': 3, 'dot': True},
}


@triton.jit
def _load_x(x_ptr, m, stride_xm, ks, k_ok, K, GATED: tl.constexpr):
    """Rows m (scalar or [BLOCK_M, 1]) of the GEMV input at columns ks, in fp32: x itself, or (GATED, x = [gate | up]
    [M, 2K]) silu(gate) * up rounded once to x's dtype, as activation.silu_and_mul would have stored it."""
    row = x_ptr + m * stride_xm
    if GATED:
        gate = tl.load(row + ks, mask=k_ok, other=0.0).to(tl.float32)
        up = tl.load(row + K + ks, mask=k_ok, other=0.0).to(tl.float32)
        return silu_mul(gate, up).to(x_ptr.dtype.element_ty).to(tl.float32)
    return tl.load(row + ks, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _accumulate(acc, w, x_ptr, M, K, stride_xm, cols, col_ok, ks, k_ok,
                BLOCK_M: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += W tile [BLOCK_N, BLOCK_K] @ x[:, ks]^T."""
    if DOT:
        # x^T padded to BLOCK_M >= 16 columns with zeros; W is the MMA's M side.
        x = _load_x(x_ptr, cols[:, None], stride_xm, ks[None, :], col_ok[:, None] & k_ok[None, :], K,
                    GATED)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=PRECISION)
    else:
        wf = w.to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            # Rows m >= M (BLOCK_M is M rounded up) re-read row M - 1; the store drops them.
            xm = _load_x(x_ptr, tl.minimum(m, M - 1), stride_xm, ks, k_ok, K, GATED)  # [BLOCK_K]
            part = tl.sum(wf * xm[None, :], axis=1)  # [BLOCK_N]
            acc = tl.where(cols[None, :] == m, acc + part[:, None], acc)
    return acc


@triton.jit
def _small_m_linear_kernel(x_ptr,    # [M, K] ([M, 2K] = [gate | up] when GATED), row stride stride_xm
                           w_ptr,    # [N, K] contiguous
                           b_ptr,    # [N] (read only when HAS_BIAS)
                           out_ptr,  # [M, N], row stride stride_om; or fp32 partials [splits, M, N] (PARTIAL)
                           M, N, K, stride_xm, stride_om, k_chunk,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT: tl.constexpr, PRECISION: tl.constexpr, PARTIAL: tl.constexpr,
                           HAS_BIAS: tl.constexpr, STAGES: tl.constexpr, ONE_STEP: tl.constexpr,
                           GATED: tl.constexpr, USE_PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features n
    cols = tl.arange(0, BLOCK_M)                    # rows m of x (= columns of the [BLOCK_N, BLOCK_M] tile)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < M
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    # This split's K range; k_chunk is a multiple of BLOCK_K, so `ks < K` is the only mask K needs.
    k_start = pid_k * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if ONE_STEP:
        # One K step per program (decode at M=1): the weights, which no kernel writes, are read before waiting for
        # the previous kernel (PDL), so their load overlaps its tail.
        ks = k_start + offs_k
        k_ok = ks < K
        w = tl.load(w_ptrs + k_start, mask=row_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        wait_for_previous_kernel(USE_PDL)
        acc = _accumulate(acc, w, x_ptr, M, K, stride_xm, cols, col_ok, ks, k_ok, BLOCK_M, DOT, PRECISION, GATED)
    else:
        wait_for_previous_kernel(USE_PDL)
        # An explicit num_stages also software-pipelines the loads that feed no tl.dot (the fma path) through
        # shared memory (cp.async): all stages' W loads are in flight before the first use.
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            ks = k0 + offs_k
            k_ok = ks < K
            w = tl.load(w_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc = _accumulate(acc, w, x_ptr, M, K, stride_xm, cols, col_ok, ks, k_ok, BLOCK_M, DOT, PRECISION,
                              GATED)
    mask = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # fp32 partial sums of this split: slab pid_k of [splits, M, N]
        part_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + cols[None, :] * N + rows[:, None]
        tl.store(part_ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + cols[None, :] * stride_om + rows[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(part_ptr,  # [SPLITS, M, N] fp32 contiguous
                           b_ptr,     # [N] (read only when HAS_BIAS)
                           out_ptr,   # [M, N], row stride stride_om
                           M, N, stride_om,
                           SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.arange(0, SPLITS_P2)
    ok = offs < N
    # Load every split's partial at once, sum over the split axis (a fixed order: deterministic).
    ptrs = part_ptr + s.to(tl.int64)[:, None] * M * N + m * N + offs[None, :]  # [SPLITS_P2, BLOCK]
    y = tl.sum(tl.load(ptrs, mask=(s[:, None] < SPLITS) & ok[None, :], other=0.0), axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return cuda_sm_count(device)


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    """SPLIT_K for `tiles` programs along N: 1 if they fill the SMs, else enough K chunks for ~2 programs per SM,
    each chunk at least one BLOCK_K (and 256) deep."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), k // max(256, block_k)))


def k_chunks(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(chunk, splits): each split covers `chunk` of K, a multiple of BLOCK_K; splits <= SPLIT_K all hold some K."""
    chunk = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return chunk, triton.cdiv(k, chunk)


@functools.lru_cache(maxsize=1024)
def default_config(m: int, n: int, k: int, sms: int) -> dict:
    """A config from first principles: ~16 KB W tiles per K step, >= 2 programs per SM, split K only if N is small
    (cached: do not mutate the result)."""
    if m <= FMA_MAX_M:
        block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)  # the whole K in one step where K <= 4096
        block_n = min(triton.next_power_of_2(n), max(1, TILE_ELEMS // block_k))
        min_n, warps, stages = 1, 4, 2
    else:
        block_k = min(triton.next_power_of_2(k), 256)
        block_n, min_n, warps, stages = 32, 16, 4, 3
    block_k = max(block_k, 16)
    while block_n > min_n and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    split = split_for(triton.cdiv(n, block_n), k, block_k, sms)
    if split > 1 and m <= FMA_MAX_M:  # one K step per chunk
        block_k = max(16, min(block_k, triton.next_power_of_2(triton.cdiv(k, split))))
    split = k_chunks(k, split, block_k)[1]
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages,
            "dot": m > FMA_MAX_M}


def get_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """A copy of the table's config for (M bucket, N, K) on CUDA, else of default_config (cached)."""
    cfg = CONFIGS.get((m_bucket(m), n, k)) if device.type == "cuda" else None
    return dict(cfg if cfg is not None else default_config(m, n, k, num_sms(device)))


def check_config(cfg: dict) -> None:
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"config {cfg} lacks {missing}; a config has the keys {CONFIG_KEYS}")
    for key in ("BLOCK_N", "BLOCK_K"):
        if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key}={cfg[key]} must be a power of 2")
    if cfg["SPLIT_K"] < 1:
        raise ValueError(f"config SPLIT_K={cfg['SPLIT_K']} must be >= 1")
    if cfg["dot"] and min(cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        raise ValueError(f"a dot config needs BLOCK_N and BLOCK_K >= 16, got {cfg}")


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def in_features(x: torch.Tensor, gated: bool) -> int:
    """K of the linear that x feeds: x's last dim, or half of it for a gated [gate | up] input."""
    return x.shape[-1] // 2 if gated else x.shape[-1]


def supports(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether small_m_linear takes this call on a GPU: x [M, K] ([M, 2K] when gated) with 1 <= M <= MAX_M and a
    contiguous last dim, weight [N, K] contiguous, both bf16 or both fp16 on the same CUDA device."""
    return (x.is_cuda and weight.device == x.device and x.dim() == 2 and weight.dim() == 2
            and 1 <= x.shape[0] <= MAX_M and (not gated or x.shape[1] % 2 == 0)
            and in_features(x, gated) == weight.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.stride(1) == 1 and weight.is_contiguous())


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
           gated: bool) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"small_m_linear takes at most {MAX_M} rows, got M={x.shape[0]}; use F.linear")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if gated and x.shape[1] % 2:
        raise ValueError(f"a gated x is [M, 2K] = [gate | up]; got an odd last dim {x.shape[1]}")
    k = in_features(x, gated)
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, {k}] tensor, got {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype} on {weight.device}) must match x ({x.dtype} on {x.device})")
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous() or bias.device != x.device):
        raise ValueError(f"bias must be a contiguous [{n}] tensor on {x.device}, got {tuple(bias.shape)} "
                         f"on {bias.device}")
    if out is not None and (out.shape != (x.shape[0], n) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be a ({x.shape[0]}, {n}) {x.dtype} tensor with a contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            cfg: dict, gated: bool) -> None:
    m, (n, k) = x.shape[0], weight.shape
    dot = bool(cfg["dot"])
    block_m = max(16, m_bucket(m)) if dot else m_bucket(m)
    k_chunk, splits = k_chunks(k, cfg["SPLIT_K"], cfg["BLOCK_K"])
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    pdl = use_pdl(x)
    _small_m_linear_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        x, weight, bias if has_bias else x, target, m, n, k, x.stride(0), out.stride(0), k_chunk,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], DOT=dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PARTIAL=splits > 1, HAS_BIAS=has_bias,
        STAGES=cfg["num_stages"], ONE_STEP=k_chunk == cfg["BLOCK_K"], GATED=gated, **pdl_launch(pdl),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:  # small programs: the partials are few bytes, latency is what counts
        block = min(REDUCE_BLOCK, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(triton.cdiv(n, block), m)](
            target, bias if has_bias else x, out, m, n, out.stride(0),
            SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), BLOCK=block, HAS_BIAS=has_bias,
            **pdl_launch(pdl), num_warps=2)


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, config: dict | None = None, gated: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] (M <= MAX_M, row stride free, last dim contiguous), weight [N, K]
    contiguous, bias [N]: fp32 accumulation, one rounding to x's dtype; returns [M, N] (into `out` if given, whose
    row stride is free). gated: x is [M, 2K] = [gate | up] and the linear reads silu(gate) * up (rounded to x's
    dtype, as activation.silu_and_mul stores it) without it ever being written. `config` overrides the table
    (benchmarks, tests): a dict with CONFIG_KEYS."""
    _check(x, weight, bias, out, gated)
    m, (n, k) = x.shape[0], weight.shape
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # empty inner product: the bias alone
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    cfg = get_config(m, n, k, x.device) if config is None else config
    check_config(cfg)
    _launch(x, weight, bias, out, cfg, gated)
    return out


def small_m_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         gated: bool = False) -> torch.Tensor:
    """Reference: F.linear in fp32 on the same inputs (gated: on silu_and_mul_torch(x)), rounded once to x's dtype."""
    if gated:
        x = silu_and_mul_torch(x)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

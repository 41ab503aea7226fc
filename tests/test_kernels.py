"""Triton attention kernels vs the pure-torch reference.

Without CUDA every kernel runs in the Triton CPU interpreter (tiny shapes, fp32/fp16); tests marked `gpu`
run bf16 at realistic shapes on a CUDA device, plus a CUDA-graph capture/replay of decode.
"""

import os

import pytest
import torch
from kernel_harness import (
    DEV,
    NAN,
    assert_close,
    assert_order_free,
    cdiv,
    cu_seqlens,
    gpu,
    interp,
    needs_cuda,
    only_if_interp_missed,
    poison_allocator,
    rand,
    random_lens,
    rerun_in_fresh_process,
)

from nanovllm.kernels.torch_attention import decode_attention_torch, store_kvcache_torch, varlen_attention_torch
from nanovllm.kernels.triton_attention import decode_attention_triton, store_kvcache, varlen_attention_triton

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.float32: (2e-4, 1e-4), torch.float16: (4e-3, 3e-3), torch.bfloat16: (2e-2, 1e-2)}[dtype]


class PagedCache:
    """NaN-poisoned paged K/V cache with sequences placed in random, distinct blocks."""

    def __init__(self, lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, gen: torch.Generator, spare_blocks: int = 3, stale: int | None = None,
                 first_block: int = 0):
        self.block_size = block_size
        need = [cdiv(n, block_size) for n in lens]
        self.num_blocks = first_block + sum(need) + spare_blocks
        shape = (self.num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.full(shape, NAN, dtype=dtype, device=DEV)
        self.v = torch.full(shape, NAN, dtype=dtype, device=DEV)
        perm = (torch.randperm(self.num_blocks - first_block, generator=gen) + first_block).tolist()
        width = max(need + [1]) + 2
        # Unused table entries hold stale ids: real blocks (NaN-poisoned) or, with `stale`, far out of range.
        table = torch.randint(0, self.num_blocks, (len(lens), width), generator=gen)
        if stale is not None:
            table.fill_(stale)
        for i, n in enumerate(need):
            table[i, :n] = torch.tensor(perm[:n], dtype=torch.long)
            perm = perm[n:]
        self.block_table = table.to(torch.int32).to(DEV)

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        """Physical slots of tokens [start, end) of sequence `seq` (int64)."""
        pos = torch.arange(start, end, device=DEV)
        return self.block_table[seq, pos // self.block_size].long() * self.block_size + pos % self.block_size


def fill_cache(cache: PagedCache, lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               gen: torch.Generator, new: list[int] | None = None) -> None:
    """Write random K/V for every sequence: old tokens with the reference store, the last new[i] tokens
    with the Triton store (from non-contiguous views, as the attention layer passes them)."""
    new = new or [0] * len(lens)
    old_slots = torch.cat([cache.slots(i, 0, n - m) for i, (n, m) in enumerate(zip(lens, new, strict=True))])
    new_slots = torch.cat([cache.slots(i, n - m, n) for i, (n, m) in enumerate(zip(lens, new, strict=True))])
    for slots, store in ((old_slots, store_kvcache_torch), (new_slots, store_kvcache)):
        if slots.numel() == 0:
            continue
        kv = rand((slots.numel(), 3, num_kv_heads, head_dim), dtype, gen)  # keys/values are strided views
        store(kv[:, 0], kv[:, 2], cache.k, cache.v, slots)


def check_prefill(q_lens: list[int], k_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                  block_size: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache = PagedCache(k_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    fill_cache(cache, k_lens, num_kv_heads, head_dim, dtype, gen, new=q_lens)
    q = rand((sum(q_lens), num_heads, head_dim), dtype, gen)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    scale = head_dim ** -0.5
    poison_allocator(DEV)
    out = varlen_attention_triton(q, cache.k, cache.v, cu_q, cu_k, max(q_lens), max(k_lens),
                                  cache.block_table, scale)
    ref = varlen_attention_torch(q, cache.k, cache.v, cu_q, cu_k, cache.block_table, scale)
    assert_close(out, ref, *tolerances(dtype))


def check_decode(ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, seed: int, config: dict | None = None, stale: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache = PagedCache(ctx_lens, num_kv_heads, head_dim, block_size, dtype, gen, stale=stale)
    fill_cache(cache, ctx_lens, num_kv_heads, head_dim, dtype, gen, new=[min(1, n) for n in ctx_lens])
    q = rand((len(ctx_lens), num_heads, head_dim), dtype, gen)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    poison_allocator(DEV)
    out = decode_attention_triton(q, cache.k, cache.v, ctx, cache.block_table, scale, config=config)
    ref = decode_attention_torch(q, cache.k, cache.v, ctx, cache.block_table, scale)
    assert_close(out, ref, *tolerances(dtype))
    assert (out[ctx == 0] == 0).all(), "padded rows must be exactly zero"
    assert_order_free(out, q, cache.k, cache.v, ctx, cache.block_table, scale, gen, config=config)


# ----------------------------------------------------------------------------------------------
# CPU interpreter (or GPU) tests: tiny shapes
# ----------------------------------------------------------------------------------------------

SMALL_DTYPES = [torch.float32, torch.float16]


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_store_kvcache_skips_padding(dtype, index_dtype):
    gen = torch.Generator().manual_seed(11 + (dtype == torch.float16) + 2 * (index_dtype == torch.int64))
    num_blocks, block_size, num_kv_heads, head_dim, n = 6, 16, 3, 32, 40  # 3 heads: non-power-of-two
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype, device=DEV)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[torch.randperm(n, generator=gen)[:9]] = -1
    slots = slots.to(index_dtype).to(DEV)
    qkv = rand((n, 5, num_kv_heads, head_dim), torch.float32, gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 3]  # strided views
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slots)
    store_kvcache_torch(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEV)
    written[slots[slots >= 0].long()] = True
    assert torch.isnan(k_cache.view(-1, num_kv_heads, head_dim)[~written]).all(), "untouched slots changed"


@interp
def test_store_kvcache_casts_to_cache_dtype():
    gen = torch.Generator().manual_seed(12)
    k_cache = torch.full((2, 16, 2, 16), NAN, dtype=torch.float16, device=DEV)
    v_cache, k_ref, v_ref = k_cache.clone(), k_cache.clone(), k_cache.clone()
    key, value = rand((5, 2, 16), torch.float32, gen), rand((5, 2, 16), torch.float32, gen)
    slots = torch.tensor([0, 17, -1, 31, 5], device=DEV)
    store_kvcache(key, value, k_cache, v_cache, slots)
    store_kvcache_torch(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


PREFILL_CASES = [  # (q_lens, k_lens, num_heads, num_kv_heads, head_dim, block_size)
    ([19], [19], 2, 2, 32, 16),                         # plain prefill, MHA, partial last block
    ([37, 5, 64], [37, 5, 64], 4, 2, 32, 16),           # ragged batch, GQA 2
    ([12, 30], [45, 30], 4, 1, 16, 32),                 # prefix-cached seq next to a plain one, GQA 4
    ([16, 7, 1], [80, 23, 50], 6, 2, 32, 64),           # chunked prefill (k_len >> q_len), GQA 3
    ([40], [70], 16, 8, 64, 32),                        # Qwen-like GQA 16/8 (head_dim 64), prefix cache
    ([33, 3], [33, 100], 3, 3, 128, 16),                # head_dim 128, odd head count
]


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_matches_reference(case, dtype):
    q_lens, k_lens, heads, kv_heads, head_dim, block_size = PREFILL_CASES[case]
    check_prefill(q_lens, k_lens, heads, kv_heads, head_dim, block_size, dtype,
                  seed=100 + 10 * case + (dtype == torch.float16))


DECODE_CASES = [  # (ctx_lens, num_heads, num_kv_heads, head_dim, block_size, config)
    ([1, 17, 0, 100, 64], 4, 2, 32, 16, None),            # padded row, splits of a 16-token block table
    ([130, 0, 0, 33], 6, 2, 32, 32, None),                # GQA 3, trailing padding
    ([95, 200, 7], 16, 8, 64, 64, None),                  # Qwen-like GQA ratio, head_dim 64
    ([150, 3], 4, 1, 16, 16, {"tile_n": 32, "num_warps": 4, "num_stages": 1, "max_splits": 3, "min_split_tiles": 1}),
    ([150, 0, 61], 2, 2, 128, 64,
     {"tile_n": 16, "num_warps": 4, "num_stages": 1, "max_splits": 1, "min_split_tiles": 1}),
    ([257, 40], 8, 2, 32, 256, {"tile_n": 64, "num_warps": 4, "num_stages": 1, "max_splits": 8, "min_split_tiles": 1}),
]


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_matches_reference(case, dtype):
    ctx_lens, heads, kv_heads, head_dim, block_size, config = DECODE_CASES[case]
    check_decode(ctx_lens, heads, kv_heads, head_dim, block_size, dtype,
                 seed=200 + 10 * case + (dtype == torch.float16), config=config)


@interp
def test_decode_all_rows_padded():
    check_decode([0, 0, 0], 4, 2, 32, 16, torch.float32, seed=300)


@interp
def test_bad_shapes_raise_value_error():
    cache = torch.zeros(2, 16, 2, 32, device=DEV)
    with pytest.raises(ValueError):
        decode_attention_triton(torch.zeros(1, 3, 32, device=DEV), cache, cache,
                                torch.ones(1, dtype=torch.int32, device=DEV),
                                torch.zeros(1, 2, dtype=torch.int32, device=DEV), 1.0)
    with pytest.raises(ValueError):
        store_kvcache(torch.zeros(1, 2, 24, device=DEV), torch.zeros(1, 2, 24, device=DEV),
                      cache[..., :24], cache[..., :24], torch.zeros(1, dtype=torch.int32, device=DEV))


@interp
def test_decode_order_checked():
    cache = torch.zeros(2, 16, 2, 32, device=DEV)
    q, ctx = torch.zeros(3, 4, 32, device=DEV), torch.ones(3, dtype=torch.int32, device=DEV)
    table = torch.zeros(3, 1, dtype=torch.int32, device=DEV)
    for bad in (torch.arange(2, dtype=torch.int32), torch.arange(3), torch.arange(3, dtype=torch.int32)[None]):
        with pytest.raises(ValueError, match="order must be"):
            decode_attention_triton(q, cache, cache, ctx, table, 1.0, order=bad.to(DEV))


@only_if_interp_missed
def test_kernels_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# GPU tests: bf16, realistic shapes (Qwen3-0.6B: 16 q heads, 8 kv heads, head_dim 128)
# ----------------------------------------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [256, 16])
@pytest.mark.parametrize("mode", ["plain", "prefix", "chunked"])
def test_gpu_prefill_bf16(block_size, mode):
    seed = 1000 + block_size + len(mode)
    gen = torch.Generator().manual_seed(seed)
    q_lens = random_lens(gen, 7, 1, 1500)
    if mode == "chunked":  # a 256-token chunk (or the whole rest) after up to 3000 cached tokens
        q_lens = [min(q, 256) for q in q_lens]
    cached = {"plain": [0] * 7, "prefix": random_lens(gen, 7, 0, 1000), "chunked": random_lens(gen, 7, 1, 3000)}[mode]
    k_lens = [q + c for q, c in zip(q_lens, cached, strict=True)]
    check_prefill(q_lens, k_lens, 16, 8, 128, block_size, torch.bfloat16, seed=seed + 1)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [
    (6, 2, 128, torch.bfloat16), (4, 1, 64, torch.bfloat16), (8, 8, 256, torch.bfloat16),
    (16, 8, 128, torch.float16), (16, 8, 128, torch.float32), (32, 4, 32, torch.bfloat16)])
def test_gpu_prefill_shapes(heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(2000 + heads * 100 + head_dim)
    q_lens = random_lens(gen, 4, 1, 700)
    k_lens = [q + p for q, p in zip(q_lens, random_lens(gen, 4, 0, 500), strict=True)]
    check_prefill(q_lens, k_lens, heads, kv_heads, head_dim, 16 * (1 + (heads % 2)), dtype, seed=2001 + heads)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 37, 64, 256])
@pytest.mark.parametrize("block_size", [256, 16])
def test_gpu_decode_bf16(batch, block_size):
    gen = torch.Generator().manual_seed(3000 + batch * 7 + block_size)
    ctx = random_lens(gen, batch, 1, 4000 if batch <= 64 else 1500)
    if batch > 2:
        ctx[1] = 0  # padded row with far out-of-range stale table entries
    check_decode(ctx, 16, 8, 128, block_size, torch.bfloat16, seed=3001 + batch, stale=10**7)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [
    (6, 2, 128, torch.bfloat16), (4, 1, 64, torch.bfloat16), (8, 8, 256, torch.bfloat16),
    (16, 8, 128, torch.float16), (16, 8, 128, torch.float32), (32, 2, 128, torch.bfloat16)])
def test_gpu_decode_shapes(heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(4000 + heads * 100 + head_dim)
    check_decode(random_lens(gen, 5, 1, 3000) + [0], heads, kv_heads, head_dim, 32, dtype, seed=4001 + heads)


@gpu
@needs_cuda
def test_gpu_int64_page_offsets():
    """Blocks past id 8192 of a 256 x 8 x 128 page: element offsets beyond 2**31."""
    gen = torch.Generator().manual_seed(5000)
    lens = [700, 1, 300]
    cache = PagedCache(lens, 8, 128, 256, torch.bfloat16, gen, first_block=8200)
    fill_cache(cache, lens, 8, 128, torch.bfloat16, gen, new=[200, 1, 300])
    scale = 128 ** -0.5
    q = rand((len(lens), 16, 128), torch.bfloat16, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    assert_close(decode_attention_triton(q, cache.k, cache.v, ctx, cache.block_table, scale),
                 decode_attention_torch(q, cache.k, cache.v, ctx, cache.block_table, scale), 2e-2, 1e-2)
    q = rand((sum(lens), 16, 128), torch.bfloat16, gen)
    cu = cu_seqlens(lens)
    assert_close(varlen_attention_triton(q, cache.k, cache.v, cu, cu, max(lens), max(lens),
                                         cache.block_table, scale),
                 varlen_attention_torch(q, cache.k, cache.v, cu, cu, cache.block_table, scale), 2e-2, 1e-2)


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph_replay():
    """Capture once with a static batch; replay with new lengths / block tables (incl. padding rows)."""
    batch, heads, kv_heads, head_dim, block_size, width = 37, 16, 8, 128, 16, 256
    gen = torch.Generator().manual_seed(6000)
    num_blocks = batch * width
    k_cache = rand((num_blocks, block_size, kv_heads, head_dim), torch.bfloat16, gen)
    v_cache = rand((num_blocks, block_size, kv_heads, head_dim), torch.bfloat16, gen)
    q = rand((batch, heads, head_dim), torch.bfloat16, gen)
    ctx = torch.ones(batch, dtype=torch.int32, device=DEV)
    table = torch.zeros(batch, width, dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile + warm up outside the capture
        decode_attention_triton(q, k_cache, v_cache, ctx, table, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k_cache, v_cache, ctx, table, scale)
    for step in range(3):
        lens = torch.randint(0, width * block_size + 1, (batch,), generator=gen)
        lens[torch.randperm(batch, generator=gen)[:5]] = 0
        lens[0] = [1, 7, width * block_size][step]
        ctx.copy_(lens.to(torch.int32))
        table.copy_(torch.randperm(num_blocks, generator=gen)[:batch * width].view(batch, width).to(torch.int32))
        q.copy_(rand((batch, heads, head_dim), torch.bfloat16, gen))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_torch(q, k_cache, v_cache, ctx, table, scale)
        assert_close(out, ref, 2e-2, 1e-2)


def test_pdl_is_off_for_cpu_tensors_and_by_environment():
    """Programmatic dependent launch: never for CPU tensors (the interpreter); NANOVLLM_PDL=0 turns it off."""
    import subprocess
    import sys

    from nanovllm.kernels.launch import pdl_launch, use_pdl
    assert not use_pdl(torch.zeros(1))
    assert pdl_launch(False) == {"USE_PDL": False}  # no launch_pdl keyword: Triton < 3.3 rejects it
    assert pdl_launch(True) == {"USE_PDL": True, "launch_pdl": True}
    code = "import nanovllm.kernels.launch as l; print(l._PDL_ALLOWED)"
    for flag, expected in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NANOVLLM_PDL=flag),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-1000:]

"""FP8 (e4m3) KV cache: the quantising stores (store_kvcache, qk_norm_rope_store) and the fp8 prefill / decode
kernels vs the torch reference with the same quantisation (tight) and vs attention over the unquantised K/V
(loose: the quantisation error itself).

The Triton CPU interpreter loads and converts float8 correctly (except NaN codes, read as +-480), but its
float -> float8 cast does not round to nearest even; our stores encode e4m3 with integer arithmetic instead, so
the interpreter tests cover the exact GPU code. Caches start as NaN codes and scales as NaN, so any read of an
unwritten slot shows up (through the scale) as NaN.
"""

import pytest
import torch
import triton
import triton.language as tl
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
    rand,
    random_lens,
    rel_err,
    rerun_in_fresh_process,
)

from nanovllm.kernels import triton_attention as ta
from nanovllm.kernels.rope_store import qk_norm_rope_store, qk_norm_rope_store_torch
from nanovllm.kernels.torch_attention import (
    FP8_DTYPE,
    FP8_V_BLOCK,
    decode_attention_torch,
    kv_scale_shape,
    new_kv_cache,
    quantize_fp8_torch,
    store_kvcache_torch,
    varlen_attention_torch,
)
from nanovllm.kernels.triton_attention import decode_attention_triton, store_kvcache, varlen_attention_triton

TIGHT = {torch.float32: (2e-4, 1e-4), torch.float16: (4e-3, 3e-3), torch.bfloat16: (2e-2, 1e-2)}
LOOSE_REL = 0.06  # rel. Frobenius error of attention over fp8 K/V vs the unquantised K/V (measured ~0.03)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

NAN_CODE, MAX_CODE = 0x7F, 0x7E  # float8_e4m3fn NaN and 448


def fp8_cache(shape, token_major: bool = False, code: int = NAN_CODE,
              v_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisoned fp8 cache (every code `code`) and its NaN-poisoned scales for a K cache of `shape`. token_major:
    the engine's V layout (token-contiguous runs of v_block tokens, torch_attention.new_kv_cache's v), else
    head_dim-contiguous (its k)."""
    caches = new_kv_cache(*shape, FP8_DTYPE, DEV, v_block_size=v_block)
    caches[1 if token_major else 0].view(torch.uint8).fill_(code)
    return caches[1 if token_major else 0], torch.full(kv_scale_shape(caches[0]), NAN, device=DEV)


class Fp8Paged:
    """Sequences in random distinct blocks of poisoned fp8 caches, and the same K/V unquantised in caches of the
    input dtype. Unused block-table entries hold stale block ids (`stale` = far out of range). K codes and all
    scales are NaN-poisoned; V codes hold the largest finite code, 448 (the kernels' contract: V past a sequence
    is read and multiplied by zero, so it must be finite). V is token-contiguous as in the engine (runs of v_block
    tokens, default the engine's) unless v_token_major=False."""

    def __init__(self, lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 gen: torch.Generator, stale: int | None = None, first_block: int = 0, v_token_major: bool = True,
                 v_block: int | None = None):
        self.block_size = block_size
        need = [cdiv(n, block_size) for n in lens]
        num_blocks = first_block + sum(need) + 3
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k, self.k_scale = fp8_cache(shape)
        self.v, self.v_scale = fp8_cache(shape, token_major=v_token_major, code=MAX_CODE, v_block=v_block)
        self.k_hp = torch.full(shape, NAN, dtype=dtype, device=DEV)
        self.v_hp = torch.full(shape, NAN, dtype=dtype, device=DEV)
        perm = (torch.randperm(num_blocks - first_block, generator=gen) + first_block).tolist()
        table = torch.full((len(lens), max(need + [1]) + 2), stale if stale is not None else 0)
        if stale is None:
            table = torch.randint(0, num_blocks, table.shape, generator=gen)
        for i, n in enumerate(need):
            table[i, :n] = torch.tensor(perm[:n], dtype=torch.long)
            perm = perm[n:]
        self.block_table = table.to(torch.int32).to(DEV)

    def scales(self) -> dict:
        return {"k_scale": self.k_scale, "v_scale": self.v_scale}

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, device=DEV)
        return self.block_table[seq, pos // self.block_size].long() * self.block_size + pos % self.block_size

    def fill(self, lens: list[int], new: list[int], dtype: torch.dtype, gen: torch.Generator) -> None:
        """Old tokens through the torch store, the last new[i] through the Triton store (strided views)."""
        kv_heads, head_dim = self.k.shape[2:]
        old = torch.cat([self.slots(i, 0, n - m) for i, (n, m) in enumerate(zip(lens, new, strict=True))])
        fresh = torch.cat([self.slots(i, n - m, n) for i, (n, m) in enumerate(zip(lens, new, strict=True))])
        for slots, store in ((old, store_kvcache_torch), (fresh, store_kvcache)):
            if slots.numel() == 0:
                continue
            kv = rand((slots.numel(), 3, kv_heads, head_dim), dtype, gen)
            store(kv[:, 0], kv[:, 2], self.k, self.v, slots, **self.scales())
            store_kvcache_torch(kv[:, 0], kv[:, 2], self.k_hp, self.v_hp, slots)


def check_prefill(q_lens, k_lens, heads, kv_heads, head_dim, block_size, dtype, seed, **cache_kw) -> float:
    gen = torch.Generator().manual_seed(seed)
    cache = Fp8Paged(k_lens, kv_heads, head_dim, block_size, dtype, gen, **cache_kw)
    cache.fill(k_lens, q_lens, dtype, gen)
    q = rand((sum(q_lens), heads, head_dim), dtype, gen)
    cu_q, cu_k, scale = cu_seqlens(q_lens), cu_seqlens(k_lens), head_dim ** -0.5
    out = varlen_attention_triton(q, cache.k, cache.v, cu_q, cu_k, max(q_lens), max(k_lens), cache.block_table,
                                  scale, **cache.scales())
    ref = varlen_attention_torch(q, cache.k, cache.v, cu_q, cu_k, cache.block_table, scale, **cache.scales())
    assert_close(out, ref, *TIGHT[dtype])
    exact = varlen_attention_torch(q, cache.k_hp, cache.v_hp, cu_q, cu_k, cache.block_table, scale)
    err = rel_err(out, exact)
    assert err < LOOSE_REL, f"fp8 prefill vs unquantised K/V: rel err {err:.3f}"
    return err


def check_decode(ctx_lens, heads, kv_heads, head_dim, block_size, dtype, seed, config=None, **cache_kw) -> float:
    gen = torch.Generator().manual_seed(seed)
    cache = Fp8Paged(ctx_lens, kv_heads, head_dim, block_size, dtype, gen, **cache_kw)
    cache.fill(ctx_lens, [min(1, n) for n in ctx_lens], dtype, gen)
    q = rand((len(ctx_lens), heads, head_dim), dtype, gen)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    out = decode_attention_triton(q, cache.k, cache.v, ctx, cache.block_table, scale, config=config,
                                  **cache.scales())
    ref = decode_attention_torch(q, cache.k, cache.v, ctx, cache.block_table, scale, **cache.scales())
    assert_close(out, ref, *TIGHT[dtype])
    assert (out[ctx == 0] == 0).all(), "padded rows must be exactly zero"
    assert_order_free(out, q, cache.k, cache.v, ctx, cache.block_table, scale, gen, config=config, **cache.scales())
    exact = decode_attention_torch(q, cache.k_hp, cache.v_hp, ctx, cache.block_table, scale)
    err = rel_err(out, exact)
    assert err < LOOSE_REL, f"fp8 decode vs unquantised K/V: rel err {err:.3f}"
    return err


# ----------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------

@triton.jit
def _encode_probe_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, ta._fp8_e4m3_bits(y), mask=offs < n)


def encoder_inputs() -> torch.Tensor:
    """Every e4m3 value, every midpoint between neighbours (ties) and its fp32 neighbours, tiny values, +-0,
    and random magnitudes over [2**-14, 448]."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    values = values[torch.isfinite(values)].unique()  # sorted, -448 .. 448
    mids = (values[1:] + values[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, 1e9))
    down = torch.nextafter(mids, torch.full_like(mids, -1e9))
    gen = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.rand(4000, generator=gen) * 22.8 - 14)
    randoms = mags * torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0)
    tiny = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, 2.0**-10, -2.0**-10, 3 * 2.0**-11, 2.0**-7, 448.0])
    return torch.cat([values, mids, up, down, randoms.clamp(-448, 448), tiny])


@interp
def test_fp8_encoder_matches_torch_cast():
    """Round to nearest even (ties, subnormals, signed zeros, the 448 edge) bit for bit as torch's cast."""
    y = encoder_inputs()
    out = torch.full(y.shape, 0x55, dtype=torch.uint8, device=DEV)
    _encode_probe_kernel[(cdiv(y.numel(), 1024),)](y.to(DEV), out, y.numel(), BLOCK=1024)
    ref = y.to(FP8_DTYPE).view(torch.uint8)
    bad = (out.cpu() != ref).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. {y[bad[:5]].tolist()}"


def test_quantize_fp8_torch_error_bound():
    """Per (token, head): |x - code * scale| <= half an e4m3 step (2**-4 relative, 2**-10 scale near zero);
    an all-zero head gets scale 1 and zero codes; the largest |x| maps to +-448."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, 64, generator=gen) * torch.exp2(torch.randint(-20, 20, (50, 4, 1), generator=gen))
    x[3, 1] = 0
    x[7, 2, 5] = 1e4  # one outlier coarsens only its own head
    codes, scale = quantize_fp8_torch(x)
    assert codes.dtype == FP8_DTYPE and scale.shape == (50, 4) and scale.dtype == torch.float32
    deq = codes.float() * scale.unsqueeze(-1)
    assert ((x - deq).abs() <= x.abs() * 2.0**-4 + scale.unsqueeze(-1) * 2.0**-10).all()
    assert scale[3, 1] == 1 and (codes[3, 1].float() == 0).all()
    assert (codes.float().abs().amax(-1)[torch.arange(50) != 3] == 448).all()


def test_torch_fp8_attention_is_attention_over_dequantised_kv():
    """The torch reference with an fp8 cache equals plain attention over codes * scales (pure torch, no Triton)."""
    gen = torch.Generator().manual_seed(2)
    lens, kv_heads, head_dim, block_size = [21, 5], 2, 16, 8
    shape = (8, block_size, kv_heads, head_dim)
    (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape), fp8_cache(shape)
    table = torch.tensor([[3, 0, 6], [5, 1, 2]], dtype=torch.int32, device=DEV)
    pos = [torch.arange(n) for n in lens]
    slots = torch.cat([table[i, p // block_size].cpu().long() * block_size + p % block_size
                       for i, p in enumerate(pos)]).to(DEV)
    k = torch.randn(sum(lens), kv_heads, head_dim, generator=gen)
    v = torch.randn(sum(lens), kv_heads, head_dim, generator=gen)
    store_kvcache_torch(k.to(DEV), v.to(DEV), k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    (kq, ks), (vq, vs) = quantize_fp8_torch(k), quantize_fp8_torch(v)
    k_deq, v_deq = kq.float() * ks.unsqueeze(-1), vq.float() * vs.unsqueeze(-1)
    q = torch.randn(2, 4, head_dim, generator=gen)
    out = decode_attention_torch(q.to(DEV), k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device=DEV),
                                 table, 0.25, k_scale=k_scale, v_scale=v_scale)
    splits = [0, lens[0], sum(lens)]
    for i in range(2):
        kk = k_deq[splits[i]:splits[i + 1]].repeat_interleave(2, 1)  # [len, H, D]
        vv = v_deq[splits[i]:splits[i + 1]].repeat_interleave(2, 1)
        probs = torch.softmax(torch.einsum("hd,khd->hk", q[i], kk) * 0.25, -1)
        torch.testing.assert_close(out[i].cpu(), torch.einsum("hk,khd->hd", probs, vv), rtol=1e-5, atol=1e-5)


STORE_CASES = [(40, 3, 32, 16, torch.float32), (17, 2, 16, 8, torch.float16), (1, 8, 128, 256, torch.float32)]


@interp
@pytest.mark.parametrize("v_block", [None, 4])
@pytest.mark.parametrize("case", range(len(STORE_CASES)))
def test_store_kvcache_fp8_matches_reference(case, v_block):
    """Triton store == torch store: identical codes and scales; slot -1 rows and other slots untouched."""
    n, kv_heads, head_dim, block_size, dtype = STORE_CASES[case]
    gen = torch.Generator().manual_seed(20 + case)
    num_blocks = cdiv(2 * n, block_size) + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape), fp8_cache(shape, token_major=True, v_block=v_block)
    ref = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    if n > 3:
        slots[torch.randperm(n, generator=gen)[:n // 4]] = -1
    slots = slots.to(DEV)
    qkv = rand((n, 5, kv_heads, head_dim), dtype, gen, scale=3.0)
    qkv[0, 1, 0] = 0  # an all-zero head
    key, value = qkv[:, 1], qkv[:, 3]  # strided views
    store_kvcache(key, value, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    store_kvcache_torch(key, value, ref[0], ref[1], slots, k_scale=ref[2], v_scale=ref[3])
    for out, expected in zip((k_cache, v_cache), ref[:2], strict=True):
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    for out, expected in zip((k_scale, v_scale), ref[2:], strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEV)
    written[slots[slots >= 0]] = True
    assert torch.isnan(k_scale.transpose(1, 2).reshape(-1, kv_heads)[~written]).all()
    assert (k_cache.view(torch.uint8).reshape(-1, kv_heads * head_dim)[~written] == 0x7F).all()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(4, 2, 32, True), (16, 8, 128, True), (3, 1, 24, False)])
def test_qk_norm_rope_store_fp8_matches_reference(heads, kv_heads, head_dim, norm, dtype):
    """Fused store in fp8 == RoPE followed by the torch fp8 store (codes and scales), q as in the bf16 path."""
    gen = torch.Generator().manual_seed(30 + heads + head_dim + (dtype == torch.float16))
    n, block_size = 21, 16
    qkv = rand((n, (heads + 2 * kv_heads) * head_dim), dtype, gen, scale=2.0)
    num_blocks = cdiv(2 * n, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    v_block = 4 if heads == 4 else None  # V runs shorter than a block
    (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape), fp8_cache(shape, token_major=True, v_block=v_block)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[2, 11]] = -1
    positions = torch.randint(0, 500, (n,), generator=gen).to(DEV)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(512).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(DEV)
    weights = (rand((head_dim,), dtype, gen) + 1, rand((head_dim,), dtype, gen) + 1) if norm else (None, None)

    def run(fn, qkv, k_cache, v_cache, k_scale, v_scale):
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return fn(q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v.view(n, kv_heads, head_dim),
                  positions, cos_sin, k_cache, v_cache, slots.to(DEV), *weights, 1e-6, k_scale=k_scale,
                  v_scale=v_scale)
    ref_state = [t.clone() for t in (qkv, k_cache, v_cache, k_scale, v_scale)]
    q_out = run(qk_norm_rope_store, qkv, k_cache, v_cache, k_scale, v_scale)
    q_ref = run(qk_norm_rope_store_torch, *ref_state)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
    for out, expected in ((k_cache, ref_state[1]), (v_cache, ref_state[2])):
        same = (out.view(torch.uint8) == expected.view(torch.uint8)).float().mean().item()
        assert same >= 0.99, f"only {same:.2%} of the fp8 codes equal the reference"
    torch.testing.assert_close(k_scale, ref_state[3], rtol=1e-3, atol=0, equal_nan=True)
    torch.testing.assert_close(v_scale, ref_state[4], rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Attention over fp8 caches
# ----------------------------------------------------------------------------------------------

PREFILL_CASES = [  # (q_lens, k_lens, heads, kv_heads, head_dim, block_size)
    ([19], [19], 2, 2, 32, 16),
    ([37, 5, 64], [37, 5, 64], 4, 2, 32, 16),
    ([12, 30], [45, 30], 4, 1, 16, 32),                 # prefix-cached next to plain
    ([16, 7, 1], [80, 23, 50], 6, 2, 32, 64),           # chunked prefill
    ([33, 3], [33, 100], 3, 3, 128, 16),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_fp8_matches_reference(case, dtype):
    check_prefill(*PREFILL_CASES[case], dtype, seed=100 + 10 * case + (dtype == torch.float16))


DECODE_CASES = [  # (ctx_lens, heads, kv_heads, head_dim, block_size, config)
    ([1, 17, 0, 100, 64], 4, 2, 32, 16, None),
    ([130, 0, 0, 33], 6, 2, 32, 32, None),
    ([95, 200, 7], 16, 8, 64, 64, None),
    ([150, 3], 4, 1, 16, 16, {"tile_n": 32, "num_warps": 4, "num_stages": 1, "max_splits": 3, "min_split_tiles": 1}),
    ([257, 40], 8, 2, 32, 256, {"tile_n": 64, "num_warps": 4, "num_stages": 1, "max_splits": 8,
                                "min_split_tiles": 1}),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_fp8_matches_reference(case, dtype):
    ctx_lens, heads, kv_heads, head_dim, block_size, config = DECODE_CASES[case]
    seed = 200 + 10 * case + (dtype == torch.float16)
    check_decode(ctx_lens, heads, kv_heads, head_dim, block_size, dtype, seed=seed, config=config)


@interp
def test_fp8_attention_with_head_dim_contiguous_v():
    """The kernels follow V's strides: a head_dim-contiguous fp8 V gives the same results as the engine's layout."""
    check_decode([95, 200, 7], 16, 8, 64, 64, torch.float32, seed=7, v_token_major=False)
    check_prefill([16, 7, 1], [80, 23, 50], 6, 2, 32, 64, torch.float32, seed=8, v_token_major=False)


@interp
@pytest.mark.parametrize("v_block", [4, 16])
def test_fp8_attention_with_other_v_runs(v_block):
    """V in token-contiguous runs of 4 or 16 tokens (the engine's: FP8_V_BLOCK, here whole 64-token blocks) through
    the store, prefill and decode kernels (tiles of 32 tokens)."""
    check_decode([95, 200, 7], 16, 8, 64, 64, torch.float32, seed=9, v_block=v_block)
    check_prefill([16, 7, 1], [80, 23, 50], 6, 2, 32, 64, torch.float32, seed=10, v_block=v_block)


def test_new_kv_cache_layouts():
    """fp8: K head-major, V head-major in token-contiguous runs of FP8_V_BLOCK tokens (at most a block), the storage
    zero-filled (finite codes past every sequence); bf16: plain."""
    k, v = new_kv_cache(3, 16, 2, 32, FP8_DTYPE, "cpu")
    assert k.shape == (3, 16, 2, 32) and v.shape == (3, 1, 16, 2, 32) and k.stride(3) == 1 and v.stride(2) == 1
    assert not k.view(torch.uint8).any() and not v.view(torch.uint8).any()
    k, v = new_kv_cache(3, 64, 2, 32, FP8_DTYPE, "cpu", v_block_size=16)
    assert k.stride() == (4096, 32, 2048, 1)  # [blocks, H, 64, D]
    assert v.shape == (3, 4, 16, 2, 32) and v.stride() == (4096, 512, 1, 2048, 16)  # [blocks, H, 4, D, 16]
    _, v = new_kv_cache(2, 256, 2, 32, FP8_DTYPE, "cpu")
    assert v.shape == (2, 256 // FP8_V_BLOCK, FP8_V_BLOCK, 2, 32) and v.stride(2) == 1
    with pytest.raises(ValueError, match="must divide block_size"):
        new_kv_cache(3, 64, 2, 32, FP8_DTYPE, "cpu", v_block_size=24)
    k, v = new_kv_cache(3, 16, 2, 32, torch.bfloat16, "cpu")
    assert k.is_contiguous() and v.is_contiguous()


@interp
def test_cache_layout_is_checked():
    (kc, ks), (vc, vs) = fp8_cache((2, 16, 2, 32)), fp8_cache((2, 16, 2, 32), token_major=True)
    key, slot = torch.zeros(1, 2, 32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="contiguous head_dim or token dim"):
        heads_last = torch.zeros(2, 16, 32, 2, device=DEV).to(FP8_DTYPE).permute(0, 1, 3, 2)  # heads contiguous
        store_kvcache(key, key, kc, heads_last, slot, k_scale=ks, v_scale=vs)
    for bad in (vc[:, :, :8], vc[..., :16], kc[:, :8]):
        with pytest.raises(ValueError, match="must both be"):
            store_kvcache(key, key, kc, bad, slot, k_scale=ks, v_scale=vs)


@interp
def test_fp8_scale_arguments_are_checked():
    (kc, ks), (vc, vs) = fp8_cache((2, 16, 2, 32)), fp8_cache((2, 16, 2, 32))
    plain = torch.zeros(2, 16, 2, 32, device=DEV)
    key = torch.zeros(1, 2, 32, device=DEV)
    slot = torch.zeros(1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="need float8_e4m3fn"):
        store_kvcache(key, key, plain, plain, slot, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="both"):
        store_kvcache(key, key, kc, vc, slot, k_scale=ks)
    with pytest.raises(ValueError, match="needs k_scale"):
        store_kvcache(key, key, kc, vc, slot)
    with pytest.raises(ValueError, match="kv_scale_shape"):
        store_kvcache(key, key, kc, vc, slot, k_scale=ks.transpose(1, 2), v_scale=vs)
    with pytest.raises(ValueError, match="kv_scale_shape"):
        decode_attention_torch(key, kc, vc, slot + 1, slot.view(1, 1), 1.0, k_scale=ks.double(), v_scale=vs)


@only_if_interp_missed
def test_fp8_kernels_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 queries, Qwen3-0.6B heads (16 / 8, head_dim 128)
# ----------------------------------------------------------------------------------------------

@gpu
@needs_cuda
def test_gpu_fp8_encoder_matches_torch_cast():
    y = encoder_inputs().to(DEV)
    out = torch.empty(y.shape, dtype=torch.uint8, device=DEV)
    _encode_probe_kernel[(cdiv(y.numel(), 1024),)](y, out, y.numel(), BLOCK=1024)
    assert torch.equal(out, y.to(FP8_DTYPE).view(torch.uint8))


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [256, 16])
@pytest.mark.parametrize("mode", ["plain", "prefix", "chunked"])
def test_gpu_prefill_fp8_bf16(block_size, mode):
    seed = 7000 + block_size + len(mode)
    gen = torch.Generator().manual_seed(seed)
    q_lens = random_lens(gen, 6, 1, 1500)
    if mode == "chunked":
        q_lens = [min(q, 256) for q in q_lens]
    cached = {"plain": [0] * 6, "prefix": random_lens(gen, 6, 0, 1000), "chunked": random_lens(gen, 6, 1, 3000)}[mode]
    k_lens = [q + c for q, c in zip(q_lens, cached, strict=True)]
    check_prefill(q_lens, k_lens, 16, 8, 128, block_size, torch.bfloat16, seed=seed + 1)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 64, 256])
@pytest.mark.parametrize("block_size,v_block", [(256, None), (256, 256), (256, 8), (16, None)])
def test_gpu_decode_fp8_bf16(batch, block_size, v_block):
    gen = torch.Generator().manual_seed(8000 + batch * 7 + block_size)
    ctx = random_lens(gen, batch, 1, 4000 if batch <= 64 else 1500)
    if batch > 2:
        ctx[1] = 0  # padded row with far out-of-range stale table entries
    check_decode(ctx, 16, 8, 128, block_size, torch.bfloat16, seed=8001 + batch, stale=10**7, v_block=v_block)


@gpu
@needs_cuda
def test_gpu_decode_fp8_long_context():
    """32k-token contexts: fp32 softmax state and accumulators keep the result as tight as at short contexts."""
    check_decode([32768, 20000, 1], 16, 8, 128, 256, torch.bfloat16, seed=8500)


@gpu
@needs_cuda
def test_gpu_fp8_int64_page_offsets():
    """Blocks past id 8192 of a 256 x 8 x 128 page: element offsets beyond 2**31."""
    lens = [700, 1, 300]
    check_decode(lens, 16, 8, 128, 256, torch.bfloat16, seed=8601, first_block=8200)
    check_prefill(lens, lens, 16, 8, 128, 256, torch.bfloat16, seed=8602, first_block=8200)


@gpu
@needs_cuda
def test_gpu_decode_fp8_cuda_graph_replay():
    batch, heads, kv_heads, head_dim, block_size, width = 37, 16, 8, 128, 16, 128
    gen = torch.Generator().manual_seed(8700)
    num_blocks = batch * width
    shape = (num_blocks, block_size, kv_heads, head_dim)
    (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape), fp8_cache(shape, token_major=True, code=MAX_CODE)
    slots = torch.arange(num_blocks * block_size, device=DEV)
    for chunk in slots.split(1 << 16):
        kv = rand((chunk.numel(), 2, kv_heads, head_dim), torch.bfloat16, gen)
        store_kvcache(kv[:, 0], kv[:, 1], k_cache, v_cache, chunk, k_scale=k_scale, v_scale=v_scale)
    q = rand((batch, heads, head_dim), torch.bfloat16, gen)
    ctx = torch.ones(batch, dtype=torch.int32, device=DEV)
    table = torch.zeros(batch, width, dtype=torch.int32, device=DEV)
    scale = head_dim ** -0.5
    kw = {"k_scale": k_scale, "v_scale": v_scale}
    decode_attention_triton(q, k_cache, v_cache, ctx, table, scale, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k_cache, v_cache, ctx, table, scale, **kw)
    for step in range(3):
        lens = torch.randint(0, width * block_size + 1, (batch,), generator=gen)
        lens[torch.randperm(batch, generator=gen)[:5]] = 0
        lens[0] = [1, 7, width * block_size][step]
        ctx.copy_(lens.to(torch.int32))
        table.copy_(torch.randperm(num_blocks, generator=gen)[:batch * width].view(batch, width).to(torch.int32))
        q.copy_(rand((batch, heads, head_dim), torch.bfloat16, gen))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, decode_attention_torch(q, k_cache, v_cache, ctx, table, scale, **kw), *TIGHT[torch.bfloat16])


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 256, 3000])
def test_gpu_qk_norm_rope_store_fp8(n):
    """Fused fp8 store at Qwen3-0.6B shapes vs RoPE + the torch fp8 store: codes almost all equal."""
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 256
    gen = torch.Generator().manual_seed(8800 + n)
    qkv = rand((n, (heads + 2 * kv_heads) * head_dim), torch.bfloat16, gen, scale=2.0)
    num_blocks = cdiv(2 * n, block_size) + 1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(shape), fp8_cache(shape, token_major=True)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(DEV)
    positions = torch.randint(0, 40960, (n,), generator=gen).to(DEV)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin = torch.outer(torch.arange(40960).float(), inv_freq)
    cos_sin = torch.cat([cos_sin.cos(), cos_sin.sin()], -1).to(DEV)
    weights = (rand((head_dim,), torch.bfloat16, gen) + 1, rand((head_dim,), torch.bfloat16, gen) + 1)

    def run(fn, qkv, k_cache, v_cache, k_scale, v_scale):
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return fn(q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v.view(n, kv_heads, head_dim),
                  positions, cos_sin, k_cache, v_cache, slots, *weights, 1e-6, k_scale=k_scale, v_scale=v_scale)
    ref_state = [t.clone() for t in (qkv, k_cache, v_cache, k_scale, v_scale)]
    run(qk_norm_rope_store, qkv, k_cache, v_cache, k_scale, v_scale)
    run(qk_norm_rope_store_torch, *ref_state)
    for out, expected in ((k_cache, ref_state[1]), (v_cache, ref_state[2])):
        same = (out.view(torch.uint8) == expected.view(torch.uint8)).float().mean().item()
        assert same >= 0.98, f"only {same:.2%} of the fp8 codes equal the reference"
    # slots nobody wrote keep their NaN poison in both
    torch.testing.assert_close(k_scale, ref_state[3], rtol=1e-2, atol=0, equal_nan=True)
    torch.testing.assert_close(v_scale, ref_state[4], rtol=0, atol=0, equal_nan=True)

"""Fused Triton kernels (sampling, RMSNorm, q/k-norm + RoPE + K/V store, SiLU-and-mul) vs their torch references.

Without CUDA the kernels run in the Triton CPU interpreter (tiny shapes, fp32/fp16); tests marked `gpu` run bf16
at Qwen3-0.6B shapes (H=16, H_kv=8, D=128, hidden 1024, intermediate 3072, vocab 151,936) on a CUDA device.
Outputs and untouched memory are NaN-poisoned so every element written (or wrongly written) shows.
"""

import pytest
import torch
import triton
import triton.language as tl
from kernel_harness import (
    DEV,
    HAS_CUDA,
    NAN,
    gpu,
    interp,
    needs_cuda,
    only_if_interp_missed,
    poison,
    rand,
    rerun_in_fresh_process,
    strided_rows,
)

from nanovllm.kernels import sampling
from nanovllm.kernels.activation import silu_and_mul, silu_and_mul_torch
from nanovllm.kernels.norm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch
from nanovllm.kernels.rope_store import qk_norm_rope_store, qk_norm_rope_store_torch
from nanovllm.kernels.sampling import GREEDY_EPS, gumbel_scores_torch, sample_gumbel, sample_gumbel_torch
from nanovllm.layers.sampling_rng import seeded_exponential, seeded_uniform, value_hash

SMALL_DTYPES = [torch.float32, torch.float16]
MIN_EXACT = 0.95
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def assert_ulps(out: torch.Tensor, ref: torch.Tensor, ulps: float, fp32_rel: float = 2e-6,
                per_vector: bool = False) -> None:
    """Elementwise |out - ref| <= ulps units in the last place of out's dtype (fp32: fp32_rel relative).
    per_vector: ulps of the largest element of each last-dim vector (outputs that cancel, like RoPE's, inherit
    the rounding of their inputs' magnitude)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "NaN/inf in output (an element was not written?)"
    rel = fp32_rel if out.dtype == torch.float32 else ulps * ULP[out.dtype]
    err = (out.double() - ref.double()).abs()
    mag = ref.double().abs()
    if per_vector and mag.numel():
        mag = mag + mag.amax(-1, keepdim=True)
    bound = rel * mag + 1e-6
    worst = (err - bound).argmax() if err.numel() else None
    assert (err <= bound).all(), f"max err {err.flatten()[worst]:.3e} at {worst}, ref {ref.flatten()[worst]:.4e}"
    if out.dtype != torch.float32 and out.numel():  # 16-bit outputs: rounding flips stay rare
        exact = (out == ref).double().mean().item()
        assert exact >= MIN_EXACT, f"only {exact:.2%} of the elements equal the reference"


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------

@triton.jit
def _uniform_probe_kernel(seed_ptr, pos_ptr, out_ptr, vocab, V_P2: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, V_P2)
    key = sampling._row_keys(tl.load(seed_ptr + b), tl.load(pos_ptr + b))
    u = sampling._uniform(sampling._cell_bits(key, sampling._value_hash(cols.to(tl.uint32))))
    tl.store(out_ptr + b * vocab + cols, u, mask=cols < vocab)


@triton.jit
def _neg_log2_probe_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr, APPROX: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    u = tl.load(u_ptr + offs, mask=offs < n, other=0.5)
    tl.store(out_ptr + offs, sampling._neg_log2_uniform(u, APPROX), mask=offs < n)


def sampler_inputs(batch: int, vocab: int, dtype, gen, temps: list[float] | None = None, scale: float = 2.0):
    logits = strided_rows(batch, vocab, dtype, gen)
    logits.mul_(scale)
    if temps is None:
        temps = [[0.0, 0.7, 1.0, 1e-6, 2.5, 0.3][i % 6] for i in range(batch)]
    temperatures = torch.tensor(temps, dtype=torch.float32, device=DEV)
    seeds = torch.randint(-2**63, 2**63 - 1, (batch,), generator=gen).to(DEV)
    positions = torch.randint(0, 2**40, (batch,), generator=gen).to(DEV)
    return logits, temperatures, seeds, positions


def check_samples(out: torch.Tensor, logits, temperatures, seeds, positions, margin: float = 1e-4) -> None:
    """Greedy rows: exactly torch.argmax. Sampled rows: the reference's pick, except at float near-ties where
    any token whose reference score is within `margin` of the row max is accepted."""
    greedy = temperatures < GREEDY_EPS
    assert torch.equal(out[greedy], logits.float().argmax(-1)[greedy])
    scores = gumbel_scores_torch(logits, temperatures, seeds, positions)
    ref = scores.argmax(-1)
    top2 = scores.topk(2, dim=-1).values if scores.shape[1] > 1 else torch.cat([scores, scores - 1], 1)
    clear = (top2[:, 0] - top2[:, 1]) > margin * (1 + top2[:, 0].abs())
    assert torch.equal(out[clear], ref[clear]), "sampled tokens differ from the reference away from near-ties"
    picked = scores.gather(1, out.unsqueeze(1)).squeeze(1)
    assert (picked >= top2[:, 0] - margin * (1 + top2[:, 0].abs())).all()


@interp
def test_uniform_bits_match_sampling_rng():
    """The in-kernel hash reproduces sampling_rng.seeded_uniform bit for bit (any int64 seed, 64-bit positions)."""
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 123456789012345, -987654321], dtype=torch.int64)
    positions = torch.tensor([0, 5, 2**32 + 7, 2**40 + 3, 1, 2**31, 99], dtype=torch.int64)
    vocab = 37
    out = poison((len(seeds), vocab), torch.float32)
    _uniform_probe_kernel[(len(seeds),)](seeds.to(DEV), positions.to(DEV), out, vocab,
                                         V_P2=triton.next_power_of_2(vocab))
    assert torch.equal(out.cpu(), seeded_uniform(seeds, positions, vocab))


def test_column_hashes_table():
    """The kernel's column-hash table is sampling_rng.value_hash as int32 bit patterns, built once per key."""
    table = sampling.column_hashes(1000, torch.device("cpu"))
    expected = value_hash(torch.arange(1000, dtype=torch.int64))
    assert table.dtype == torch.int32 and torch.equal(table.to(torch.int64) & 0xFFFFFFFF, expected)
    assert (expected >= 2**31).any(), "the bit patterns above 2**31 are covered"
    assert sampling.column_hashes(1000, torch.device("cpu")) is table


@interp
def test_neg_log2_uniform_relative_error():
    """-log2(u) keeps a small relative error on the whole uniform grid, also next to 1 (the series branch) and
    with the hardware lg2.approx on GPUs (relative error <= 2**-22 / |log2 u| outside the series branch, whose
    truncation error is <= 2**-17.6)."""
    grid = (torch.arange(2**23, dtype=torch.float64) + 0.5) * 2.0**-23
    u = torch.cat([grid[:64], grid[-4096:], grid[::2049], torch.tensor([0.5, 15 / 16, 15 / 16 + 2**-24])])
    u = u.float()
    out = poison(u.shape, torch.float32)
    block = triton.next_power_of_2(u.numel())
    _neg_log2_probe_kernel[(1,)](u.to(DEV), out, u.numel(), BLOCK=block, APPROX=HAS_CUDA)
    exact = -torch.log2(u.double())
    rel = ((out.cpu().double() - exact) / exact).abs()
    assert rel.max().item() < (4.5e-5 if HAS_CUDA else 6e-6), f"max relative error {rel.max().item():.2e}"


SAMPLER_CASES = [(1, 7), (5, 33), (6, 300), (33, 65), (3, 1000)]  # (B, V); V > 256 spans several chunks


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("case", range(len(SAMPLER_CASES)))
def test_sampler_matches_reference(case, dtype):
    batch, vocab = SAMPLER_CASES[case]
    gen = torch.Generator().manual_seed(10 + case + 100 * (dtype == torch.float16))
    logits, temps, seeds, positions = sampler_inputs(batch, vocab, dtype, gen)
    out = torch.full((batch,), -7, dtype=torch.int64, device=DEV)
    assert sample_gumbel(logits, temps, seeds, positions, out=out) is out
    check_samples(out, logits, temps, seeds, positions)
    assert torch.equal(sample_gumbel_torch(logits, temps, seeds, positions), out)  # no near-ties in these


@interp
def test_sampler_configs_agree():
    """Every tiling (rows per program, tile, tiles per program: one chunk or many) picks the same tokens, with
    greedy rows mixed into programs and with every row sampled (the kernel's select-free branch)."""
    gen = torch.Generator().manual_seed(20)
    for temps in (None, [0.7, 1.0, 2.5, 0.3, 0.9, 1.3, 0.5]):
        logits, temps, seeds, positions = sampler_inputs(7, 333, torch.float32, gen, temps)
        ref = sample_gumbel_torch(logits, temps, seeds, positions)
        for rows, tile_v, tiles in [(1, 16, 1), (2, 32, 3), (4, 64, 8), (1, 512, 1), (4, 128, 1), (4, 16, 2)]:
            cfg = {"rows": rows, "tile_v": tile_v, "tiles": tiles, "num_warps": 1}
            assert torch.equal(sample_gumbel(logits, temps, seeds, positions, config=cfg), ref), cfg


@interp
def test_sampler_ties_take_lowest_index():
    vocab = 300
    logits = torch.zeros(4, vocab, device=DEV)
    logits[0, [17, 150, 299]] = 5.0      # greedy: max in three chunks
    logits[1] = float("-inf")            # greedy, all -inf -> 0
    logits[2] = float("-inf")            # sampled, all -inf -> 0
    logits[3, :] = float("-inf")
    logits[3, [260, 270]] = 1.0          # sampled: only two finite logits
    temps = torch.tensor([0.0, 0.0, 1.0, 1.0], device=DEV)
    seeds = torch.arange(4, device=DEV)
    out = sample_gumbel(logits, temps, seeds, seeds, config={"rows": 2, "tile_v": 32, "tiles": 2, "num_warps": 1})
    assert out[:3].tolist() == [17, 0, 0] and out[3].item() in (260, 270)
    assert torch.equal(out, sample_gumbel_torch(logits, temps, seeds, seeds))


@interp
def test_sampler_empty_batch_and_bad_inputs():
    logits = torch.zeros(0, 5, device=DEV)
    empty_f, empty_i = torch.zeros(0, device=DEV), torch.zeros(0, dtype=torch.int64, device=DEV)
    assert sample_gumbel(logits, empty_f, empty_i, empty_i).shape == (0,)
    logits = torch.zeros(2, 5, device=DEV)
    temps, ids = torch.ones(2, device=DEV), torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="temperatures"):
        sample_gumbel(logits, temps.double(), ids, ids)
    with pytest.raises(ValueError, match="seeds"):
        sample_gumbel(logits, temps, ids.int(), ids)
    with pytest.raises(ValueError, match="positions"):
        sample_gumbel(logits, temps, ids, ids[:1])
    with pytest.raises(ValueError, match="logits"):
        sample_gumbel(logits.t(), temps, ids, ids)
    with pytest.raises(ValueError, match="out"):
        sample_gumbel(logits, temps, ids, ids, out=torch.zeros(2, dtype=torch.int32, device=DEV))


@interp
def test_sampler_workspace_is_reused_and_restored():
    """One workspace serves calls of any batch up to its size and any chunking; each call leaves it as new_workspace
    built it (slots INT64_MIN, counters 0). All-negative and all -inf rows check the packed (score, index) order."""
    ws = sampling.new_workspace(9, torch.device(DEV))
    fresh = ws.clone()
    gen = torch.Generator().manual_seed(25)
    for batch, vocab, cfg in [(9, 333, (4, 16, 2)), (3, 1000, (1, 64, 4)), (7, 257, (2, 32, 1)), (9, 300, (4, 8, 3))]:
        logits, temps, seeds, positions = sampler_inputs(batch, vocab, torch.float32, gen)
        logits = logits - logits.abs().max() - 1.0  # every score negative for the greedy rows
        logits[batch // 2] = float("-inf")
        config = dict(zip(("rows", "tile_v", "tiles"), cfg, strict=True)) | {"num_warps": 1}
        out = sample_gumbel(logits, temps, seeds, positions, config=config, workspace=ws)
        assert torch.equal(out, sample_gumbel_torch(logits, temps, seeds, positions)), (batch, vocab, cfg)
        assert out[batch // 2].item() == 0  # an all -inf row takes index 0, as torch.argmax
        assert torch.equal(ws, fresh), "the workspace was not restored"


@interp
def test_sampler_bad_workspace():
    logits = torch.zeros(3, 300, device=DEV)
    temps, ids = torch.ones(3, device=DEV), torch.zeros(3, dtype=torch.int64, device=DEV)
    cfg = {"rows": 1, "tile_v": 16, "tiles": 1, "num_warps": 1}
    for bad in (sampling.new_workspace(2, torch.device(DEV)), torch.zeros(3, dtype=torch.int64, device=DEV),
                sampling.new_workspace(3, torch.device(DEV)).int()):
        with pytest.raises(ValueError, match="workspace"):
            sample_gumbel(logits, temps, ids, ids, config=cfg, workspace=bad)


CHI2_999_6DOF = 27.86  # chi-square 0.9999 quantile, 6 degrees of freedom


@triton.jit
def _score_probe_kernel(logits_ptr, seed_ptr, pos_ptr, col_hash_ptr, out_ptr, temperature, n, vocab,
                        BLOCK: tl.constexpr, APPROX: tl.constexpr):
    """out[d, v] = the sampler's score of token v for draw d (its own noise code and column-hash table, one draw
    per element)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (draw, token)
    ok = offs < n * vocab
    draw, col = offs // vocab, offs % vocab
    key = sampling._row_keys(tl.load(seed_ptr + draw, mask=ok, other=0), tl.load(pos_ptr + draw, mask=ok, other=0))
    x = tl.load(logits_ptr + col, mask=ok, other=0.0)
    col_hash = tl.load(col_hash_ptr + col, mask=ok, other=0).to(tl.uint32, bitcast=True)
    score = sampling._gumbel_score(x, col_hash, temperature > 0, sampling.LOG2E / temperature, key, False, APPROX)
    tl.store(out_ptr + offs, score, mask=ok)


@interp
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_distribution_chi_square(temperature):
    """20k draws over many (seed, position) pairs follow softmax(logits / T) on a 7-token vocabulary. On a GPU the
    whole kernel draws; the interpreter (too slow for 5,000 programs) takes the argmax of the kernel's own score
    code, evaluated for every (draw, token) by a probe kernel."""
    vocab, draws = 7, 20000
    base = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5])
    seeds = torch.arange(draws, device=DEV) // 50
    positions = torch.arange(draws, device=DEV) % 50 + 1000
    if HAS_CUDA:
        logits = base.repeat(draws, 1).to(DEV)
        temps = torch.full((draws,), temperature, device=DEV)
        out = sample_gumbel(logits, temps, seeds, positions, config={"rows": 4, "tile_v": 8, "tiles": 1,
                                                                     "num_warps": 1})
    else:
        scores = poison((draws, vocab), torch.float32)
        block = 8192
        _score_probe_kernel[(triton.cdiv(draws * vocab, block),)](
            base.to(DEV), seeds, positions, sampling.column_hashes(vocab, torch.device(DEV)), scores, temperature,
            draws, vocab, BLOCK=block, APPROX=False)
        out = scores.argmax(-1)
    counts = torch.bincount(out.cpu(), minlength=vocab).double()
    expected = torch.softmax(base.double() / temperature, 0) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_999_6DOF, f"chi2 {chi2:.1f}; counts {counts.tolist()} expected {expected.tolist()}"


@interp
def test_sampler_rows_are_independent_of_the_batch():
    """A row's token depends only on its logits, temperature, seed and position: permuting the batch or
    inserting rows changes nothing."""
    gen = torch.Generator().manual_seed(30)
    logits, temps, seeds, positions = sampler_inputs(9, 200, torch.float32, gen, scale=0.5)
    out = sample_gumbel(logits, temps, seeds, positions)
    perm = torch.randperm(9, generator=gen).to(DEV)
    assert torch.equal(sample_gumbel(logits[perm].contiguous(), temps[perm], seeds[perm], positions[perm]), out[perm])
    extra_logits, extra_temps, extra_seeds, extra_pos = sampler_inputs(4, 200, torch.float32, gen)
    both = sample_gumbel(torch.cat([extra_logits[:2], logits, extra_logits[2:]]),
                         torch.cat([extra_temps[:2], temps, extra_temps[2:]]),
                         torch.cat([extra_seeds[:2], seeds, extra_seeds[2:]]),
                         torch.cat([extra_pos[:2], positions, extra_pos[2:]]))
    assert torch.equal(both[2:11], out)


@interp
def test_sampler_seed_and_position_change_the_draw():
    vocab, n = 64, 32
    logits = torch.zeros(n, vocab, device=DEV)
    temps = torch.ones(n, device=DEV)
    fixed = torch.full((n,), 1234, device=DEV)
    varying = torch.arange(n, device=DEV)
    by_position = sample_gumbel(logits, temps, fixed, varying)
    by_seed = sample_gumbel(logits, temps, varying, fixed)
    assert by_position.unique().numel() >= n // 2 and by_seed.unique().numel() >= n // 2
    assert not torch.equal(by_position, by_seed)
    assert torch.equal(sample_gumbel(logits, temps, fixed, varying), by_position)  # deterministic


@interp
def test_sampler_equals_exponential_trick():
    """Same seeds, same tokens as layers/sampler.py's argmax(softmax(logits / T) / Exp(1)) with seeded Exp."""
    gen = torch.Generator().manual_seed(40)
    logits, temps, seeds, positions = sampler_inputs(16, 500, torch.float32, gen, temps=[0.8] * 16)
    probs = torch.softmax(logits.float() / 0.8, -1)
    trick = (probs / seeded_exponential(seeds, positions, 500).clamp(min=1e-10)).argmax(-1)
    assert torch.equal(sample_gumbel(logits, temps, seeds, positions), trick)


# ----------------------------------------------------------------------------------------------
# RMSNorm / add + RMSNorm
# ----------------------------------------------------------------------------------------------

NORM_SHAPES = [(0, 8), (1, 1), (5, 7), (33, 100), (4, 1024)]


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    n, d = shape
    gen = torch.Generator().manual_seed(50 + n + d)
    x = strided_rows(n, d, dtype, gen)
    weight = rand((d,), dtype, gen) + 1.0
    out = poison((n, d), dtype)
    assert rms_norm(x, weight, 1e-6, out=out) is out
    assert_ulps(out, rms_norm_torch(x, weight, 1e-6), ulps=1)
    assert_ulps(rms_norm(x, weight, 1e-6), out, ulps=0, fp32_rel=0)  # the allocating call is the same


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm_matches_reference(shape, dtype):
    n, d = shape
    gen = torch.Generator().manual_seed(60 + n + d)
    x = strided_rows(n, d, dtype, gen)
    res_buf = torch.full((n, d + 4), NAN, dtype=dtype, device=DEV)
    residual = res_buf[:, 2:2 + d]
    residual.copy_(rand((n, d), dtype, gen, scale=3.0))
    ref_res = residual.clone()
    weight = rand((d,), torch.float32, gen).to(dtype)
    out = poison((n, d), dtype)
    normed, new_res = add_rms_norm(x, residual, weight, 1e-5, out=out)
    ref_normed, ref_res = add_rms_norm_torch(x, ref_res, weight, 1e-5)
    assert normed is out and new_res is residual
    assert torch.equal(new_res, ref_res), "new residual must be x + residual rounded to the dtype, exactly"
    assert_ulps(normed, ref_normed, ulps=1)
    assert torch.isnan(res_buf[:, :2]).all() and torch.isnan(res_buf[:, 2 + d:]).all(), "wrote outside the view"


@interp
def test_norm_bad_inputs():
    x = torch.zeros(3, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.zeros(3, 8, dtype=torch.float16, device=DEV), torch.ones(8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="last dim"):
        rms_norm(x.t(), torch.ones(3, device=DEV), 1e-6)


# ----------------------------------------------------------------------------------------------
# SiLU and mul
# ----------------------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (5, 7), (33, 100), (3, 1500)])
def test_silu_and_mul_matches_reference(shape, dtype):
    n, inter = shape
    gen = torch.Generator().manual_seed(70 + n + inter)
    x = strided_rows(n, 2 * inter, dtype, gen)
    x.mul_(4)
    out = poison((n, inter), dtype)
    assert silu_and_mul(x, out=out) is out
    assert_ulps(out, silu_and_mul_torch(x), ulps=1, fp32_rel=1e-5)
    with pytest.raises(ValueError):
        silu_and_mul(torch.zeros(2, 5, device=DEV))


# ----------------------------------------------------------------------------------------------
# q/k norm + RoPE + K/V store
# ----------------------------------------------------------------------------------------------

def cos_sin(max_pos: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[max_pos, D] fp32 [cos | sin], built as RotaryEmbedding builds it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(DEV)


class RopeCase:
    """q/k/v as views of a qkv GEMM output [N, (H + 2 H_kv) D], NaN-poisoned caches, slots with -1 rows."""

    def __init__(self, n: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, gen,
                 norm: bool = True, max_pos: int = 4096, num_blocks: int | None = None, theta: float = 1e4):
        self.dtype, self.eps = dtype, 1e-6
        qkv = rand((n, (heads + 2 * kv_heads) * head_dim), dtype, gen, scale=2.0)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        self.qkv = qkv
        self.q = q.view(n, heads, head_dim)
        self.k = k.view(n, kv_heads, head_dim)
        self.v = v.view(n, kv_heads, head_dim)
        self.positions = torch.randint(0, max_pos, (n,), generator=gen).to(DEV)
        self.cos_sin = cos_sin(max_pos, head_dim, theta)
        num_blocks = num_blocks or max(2, -(-2 * n // block_size))
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache, self.v_cache = poison(shape, dtype), poison(shape, dtype)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
        if n > 2:
            slots[torch.randperm(n, generator=gen)[: n // 3]] = -1
        self.slots = slots.to(torch.int32).to(DEV)
        self.q_weight = rand((head_dim,), dtype, gen) + 1 if norm else None
        self.k_weight = rand((head_dim,), dtype, gen) + 1 if norm else None

    def clone_state(self):
        return self.qkv.clone(), self.k_cache.clone(), self.v_cache.clone()

    def args(self, qkv, k_cache, v_cache):
        n, heads, d = self.q.shape
        kv = self.k.shape[1]
        q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
        return (q.view(n, heads, d), k.view(n, kv, d), v.view(n, kv, d), self.positions, self.cos_sin,
                k_cache, v_cache, self.slots, self.q_weight, self.k_weight, self.eps)


def check_rope_store(case: RopeCase, ulps: float = 1) -> None:
    qkv, k_cache, v_cache = case.clone_state()
    ref_qkv, ref_k, ref_v = case.clone_state()
    args = case.args(qkv, k_cache, v_cache)
    q_out = qk_norm_rope_store(*args)
    ref_q = qk_norm_rope_store_torch(*case.args(ref_qkv, ref_k, ref_v))
    assert q_out.data_ptr() == args[0].data_ptr(), "q must be rotated in place"
    assert_ulps(q_out, ref_q, ulps, per_vector=True)
    heads_d = case.q.shape[1] * case.q.shape[2]
    assert torch.equal(qkv[:, heads_d:], case.qkv[:, heads_d:]), "k / v inputs must not be modified"
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=DEV)
    written[case.slots[case.slots >= 0].long()] = True
    flat = (-1,) + tuple(k_cache.shape[2:])
    assert torch.isnan(k_cache.view(flat)[~written]).all() and torch.isnan(v_cache.view(flat)[~written]).all(), \
        "slots outside slot_mapping (or of -1 rows) were written"
    assert_ulps(k_cache.view(flat)[written], ref_k.view(flat)[written], ulps, per_vector=True)
    assert torch.equal(v_cache.view(flat)[written], ref_v.view(flat)[written])


ROPE_CASES = [  # (N, H, H_kv, D, block_size, norm)
    (0, 4, 2, 16, 16, True),
    (1, 4, 2, 16, 16, True),
    (5, 3, 1, 32, 16, True),      # odd head count, GQA 3
    (33, 4, 2, 24, 16, True),     # half dim 12: not a power of two
    (33, 16, 8, 128, 32, True),   # Qwen3-0.6B heads
    (9, 6, 3, 64, 16, False),     # no q/k norm (Llama / Qwen2)
]


@interp
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
def test_qk_norm_rope_store_matches_reference(case, dtype):
    n, heads, kv_heads, head_dim, block_size, norm = ROPE_CASES[case]
    gen = torch.Generator().manual_seed(80 + case + 100 * (dtype == torch.float16))
    check_rope_store(RopeCase(n, heads, kv_heads, head_dim, block_size, dtype, gen, norm=norm))


@interp
def test_qk_norm_rope_store_int64_slots_and_positions():
    gen = torch.Generator().manual_seed(90)
    case = RopeCase(7, 2, 2, 16, 16, torch.float32, gen)
    case.slots = case.slots.long()
    case.positions = case.positions.int()
    check_rope_store(case)


@interp
def test_qk_norm_rope_store_bad_inputs():
    gen = torch.Generator().manual_seed(91)
    case = RopeCase(3, 2, 1, 16, 16, torch.float32, gen)
    args = list(case.args(*case.clone_state()))
    bad = list(args)
    bad[4] = case.cos_sin[:, :8]
    with pytest.raises(ValueError, match="cos_sin_cache"):
        qk_norm_rope_store(*bad)
    bad = list(args)
    bad[7] = case.slots[:2]
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store(*bad)
    bad = list(args)
    bad[8] = torch.ones(15, device=DEV)
    with pytest.raises(ValueError, match="q_weight"):
        qk_norm_rope_store(*bad)


@only_if_interp_missed
def test_fused_kernels_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at Qwen3-0.6B shapes
# ----------------------------------------------------------------------------------------------

QWEN_VOCAB, QWEN_HIDDEN, QWEN_INTER = 151936, 1024, 3072


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 256])
def test_gpu_sampler_bf16(batch):
    gen = torch.Generator().manual_seed(1000 + batch)
    logits, temps, seeds, positions = sampler_inputs(batch, QWEN_VOCAB, torch.bfloat16, gen, scale=3.0)
    out = sample_gumbel(logits, temps, seeds, positions)
    check_samples(out, logits, temps, seeds, positions)
    mismatches = (out != sample_gumbel_torch(logits, temps, seeds, positions)).sum().item()
    assert mismatches <= max(1, batch // 100), f"{mismatches} rows differ from the reference"


@gpu
@needs_cuda
def test_gpu_sampler_distribution():
    """GPU draws (hardware lg2 path) follow softmax(logits / T): chi-square over 50k draws, 7 tokens."""
    vocab, draws, temperature = 7, 50000, 0.8
    base = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5])
    logits = base.repeat(draws, 1).to(DEV, torch.bfloat16)
    out = sample_gumbel(logits, torch.full((draws,), temperature, device=DEV),
                        torch.arange(draws, device=DEV), torch.full((draws,), 3, device=DEV))
    counts = torch.bincount(out.cpu(), minlength=vocab).double()
    expected = torch.softmax(base.bfloat16().double() / temperature, 0) * draws
    assert ((counts - expected) ** 2 / expected).sum().item() < CHI2_999_6DOF


@gpu
@needs_cuda
def test_gpu_sampler_cuda_graph():
    """Capture once; replay with new logits, temperatures, seeds and positions."""
    batch = 64
    gen = torch.Generator().manual_seed(1100)
    logits, temps, seeds, positions = sampler_inputs(batch, QWEN_VOCAB, torch.bfloat16, gen)
    out = torch.empty(batch, dtype=torch.int64, device=DEV)
    ws = sampling.new_workspace(batch, torch.device(DEV))
    sample_gumbel(logits, temps, seeds, positions, out=out, workspace=ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_gumbel(logits, temps, seeds, positions, out=out, workspace=ws)
    fresh = sampling.new_workspace(batch, torch.device(DEV))
    for _ in range(3):
        new = sampler_inputs(batch, QWEN_VOCAB, torch.bfloat16, gen)
        for dst, src in zip((logits, temps, seeds, positions), new, strict=True):
            dst.copy_(src)
        graph.replay()
        check_samples(out.clone(), logits, temps, seeds, positions)
        assert torch.equal(ws, fresh), "a replay left the workspace dirty"


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 256, 4097])
def test_gpu_norms_bf16(n):
    gen = torch.Generator().manual_seed(1200 + n)
    x = strided_rows(n, QWEN_HIDDEN, torch.bfloat16, gen)
    weight = rand((QWEN_HIDDEN,), torch.bfloat16, gen) + 1
    assert_ulps(rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6), ulps=2)
    residual = rand((n, QWEN_HIDDEN), torch.bfloat16, gen, scale=4.0)
    ref_res = residual.clone()
    normed, new_res = add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_res = add_rms_norm_torch(x, ref_res, weight, 1e-6)
    assert torch.equal(new_res, ref_res)
    assert_ulps(normed, ref_normed, ulps=2)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 256, 4097])
def test_gpu_silu_and_mul_bf16(n):
    gen = torch.Generator().manual_seed(1300 + n)
    x = strided_rows(n, 2 * QWEN_INTER, torch.bfloat16, gen)
    assert_ulps(silu_and_mul(x), silu_and_mul_torch(x), ulps=1)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,norm", [(1, True), (256, True), (3000, True), (256, False)])
def test_gpu_qk_norm_rope_store_bf16(n, norm):
    gen = torch.Generator().manual_seed(1400 + n + norm)
    case = RopeCase(n, 16, 8, 128, 256, torch.bfloat16, gen, norm=norm, max_pos=40960, theta=1e6)
    check_rope_store(case, ulps=2)


@gpu
@needs_cuda
def test_gpu_qk_norm_rope_store_cuda_graph():
    gen = torch.Generator().manual_seed(1500)
    case = RopeCase(64, 16, 8, 128, 16, torch.bfloat16, gen, num_blocks=64)
    qkv, k_cache, v_cache = case.clone_state()
    args = case.args(qkv, k_cache, v_cache)
    qk_norm_rope_store(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qk_norm_rope_store(*args)
    for _ in range(2):
        fresh = RopeCase(64, 16, 8, 128, 16, torch.bfloat16, gen, num_blocks=64)
        qkv.copy_(fresh.qkv)
        case.positions.copy_(fresh.positions)
        case.slots.copy_(fresh.slots)
        k_cache.fill_(NAN)
        v_cache.fill_(NAN)
        ref_qkv, ref_k, ref_v = fresh.qkv.clone(), k_cache.clone(), v_cache.clone()
        graph.replay()
        ref_q = qk_norm_rope_store_torch(*case.args(ref_qkv, ref_k, ref_v))
        assert_ulps(args[0], ref_q, ulps=2, per_vector=True)
        written = case.slots[case.slots >= 0].long()
        assert_ulps(k_cache.view(-1, 8, 128)[written], ref_k.view(-1, 8, 128)[written], ulps=2, per_vector=True)
        assert torch.equal(v_cache.view(-1, 8, 128)[written], ref_v.view(-1, 8, 128)[written])

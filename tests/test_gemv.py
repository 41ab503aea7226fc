"""small_m_linear (the decode GEMV) vs F.linear on the same inputs in float64.

Without CUDA the kernels run in the Triton CPU interpreter (tiny odd shapes, fp32/fp16, both inner products, split K);
tests marked `gpu` run bf16 at the Qwen3-0.6B and Llama-3.2-1B shapes on a CUDA device, also inside a CUDA graph.
Outputs are NaN-poisoned so every element written (or wrongly written) shows.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
from kernel_harness import (
    DEV,
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

from nanovllm.kernels import activation, gemv
from nanovllm.kernels.gemv import (
    MAX_M,
    check_config,
    default_config,
    small_m_linear,
    small_m_linear_torch,
    supports,
)

HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
ACC_REL = 2.0 ** -16  # fp32 accumulation in another order, relative to sum_k |x w|
MIN_EXACT = 0.9       # 16-bit outputs: share equal to the reference rounded once


def cfg(block_n: int, block_k: int, split: int = 1, dot: bool = False, stages: int = 2, warps: int = 4) -> dict:
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages,
            "dot": dot}


# Interpreter configs: each inner product, with and without a K loop and split K.
SMALL_CONFIGS = {
    "default": None,
    "fma": cfg(8, 256),
    "fma_regs": cfg(4, 256, stages=1),
    "fma_loop": cfg(16, 32, stages=3),
    "fma_split": cfg(8, 32, split=3),
    "dot": cfg(16, 64, dot=True, stages=3),
    "dot_split": cfg(16, 32, split=4, dot=True),
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def assert_linear(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """|out - ref| <= half an ulp of out's dtype * |ref| + ACC_REL * sum_k |x w| (+ |b|), ref in float64 (free of
    TF32 settings); and 16-bit outputs mostly equal the reference rounded once."""
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0])
    assert torch.isfinite(out).all(), "NaN/inf in output (an element was not written?)"
    b64 = None if bias is None else bias.double()
    ref = F.linear(x.double(), w.double(), b64)
    scale = F.linear(x.double().abs(), w.double().abs(), None if b64 is None else b64.abs())
    err = (out.double() - ref).abs()
    bound = HALF_ULP[out.dtype] * ref.abs() + ACC_REL * scale + 1e-30
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"max err {err.flatten()[worst]:.3e} at {worst}, ref {ref.flatten()[worst]:.4e}"
    if out.dtype != torch.float32:
        exact = (out == ref.to(out.dtype)).double().mean().item()
        assert exact >= MIN_EXACT, f"only {exact:.2%} of the elements equal the reference rounded once"


# ----------------------------------------------------------------------------------------------
# Interpreter (or GPU): tiny odd shapes
# ----------------------------------------------------------------------------------------------

@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_matches_reference(dtype, m, name):
    """Strided x, bias, NaN-poisoned out; N and K not multiples of any block."""
    gen = torch.Generator().manual_seed(100 * m + 10 * list(SMALL_CONFIGS).index(name) + (dtype == torch.float16))
    n, k = 37, 75 if m == 3 else 130
    x, w, b = strided_rows(m, k, dtype, gen), rand((n, k), dtype, gen), rand((n,), dtype, gen)
    out = poison((m, n), dtype)
    assert small_m_linear(x, w, b, out=out, config=SMALL_CONFIGS[name]) is out
    assert_linear(out, x, w, b)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_gated_equals_silu_and_mul_then_linear(dtype, m, name):
    """gated=True: x = [gate | up] [M, 2K] (row-strided, odd K); the GEMV reads silu(gate) * up rounded as the
    silu_and_mul kernel stores it, so it equals that kernel followed by the plain GEMV, bit for bit."""
    gen = torch.Generator().manual_seed(300 + 10 * m + list(SMALL_CONFIGS).index(name))
    n, k = 29, 75 if m == 3 else 130
    gate_up, w, b = strided_rows(m, 2 * k, dtype, gen), rand((n, k), dtype, gen), rand((n,), dtype, gen)
    out = poison((m, n), dtype)
    small_m_linear(gate_up, w, b, out=out, config=SMALL_CONFIGS[name], gated=True)
    act = activation.silu_and_mul(gate_up)
    assert_linear(out, act, w, b)
    assert torch.equal(out, small_m_linear(act, w, b, config=SMALL_CONFIGS[name]))


def test_gated_inputs_checked():
    gate_up, w = torch.zeros(2, 16), torch.zeros(5, 8)
    with pytest.raises(ValueError, match="odd last dim"):
        small_m_linear(torch.zeros(2, 15), w, gated=True)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        small_m_linear(gate_up, torch.zeros(5, 16), gated=True)
    ref = small_m_linear_torch(gate_up, w, gated=True)
    assert ref.shape == (2, 5)


@interp
@pytest.mark.parametrize("name", ["default", "fma_split", "dot_split"])
def test_no_bias_and_strided_out(name):
    """Without bias, into a row-strided `out` whose padding must stay untouched."""
    gen = torch.Generator().manual_seed(7)
    m, n, k, pad = 5, 29, 97, 4
    x, w = rand((m, k), torch.float16, gen), rand((n, k), torch.float16, gen)
    buf = poison((m, n + 2 * pad), torch.float16)
    out = buf[:, pad:pad + n]
    small_m_linear(x, w, out=out, config=SMALL_CONFIGS[name])
    assert_linear(out, x, w)
    assert torch.isnan(buf[:, :pad]).all() and torch.isnan(buf[:, pad + n:]).all(), "wrote outside out"


@interp
@pytest.mark.parametrize("name", ["fma_split", "dot_split", "default"])
def test_deterministic(name):
    gen = torch.Generator().manual_seed(11)
    x, w, b = rand((4, 150), torch.float32, gen), rand((33, 150), torch.float32, gen), rand((33,), torch.float32, gen)
    first = small_m_linear(x, w, b, config=SMALL_CONFIGS[name])
    assert torch.equal(first, small_m_linear(x, w, b, config=SMALL_CONFIGS[name]))


@interp
def test_edge_sizes():
    gen = torch.Generator().manual_seed(3)
    w, b = rand((6, 0), torch.float32, gen), rand((6,), torch.float32, gen)
    assert torch.equal(small_m_linear(rand((2, 0), torch.float32, gen), w, b), b.expand(2, 6))
    assert torch.equal(small_m_linear(rand((2, 0), torch.float32, gen), w), torch.zeros(2, 6, device=DEV))
    assert small_m_linear(rand((0, 8), torch.float32, gen), rand((6, 8), torch.float32, gen)).shape == (0, 6)
    x, w1 = rand((MAX_M, 19), torch.float32, gen), rand((1, 19), torch.float32, gen)  # N = 1, M = MAX_M
    assert_linear(small_m_linear(x, w1), x, w1)


def test_torch_reference_rounds_once():
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=gen).half() for s in ((3, 40), (7, 40), (7,)))
    ref = small_m_linear_torch(x, w, b)
    assert ref.dtype == torch.float16
    assert torch.equal(ref, (x.float() @ w.float().t() + b.float()).half())


def test_bad_inputs_raise():
    x, w = torch.zeros(2, 8), torch.zeros(5, 8)
    cases = [  # (x, weight, bias, out, message)
        (torch.zeros(MAX_M + 1, 8), w, None, None, "at most"),
        (torch.zeros(2, 8, 1), w, None, None, r"\[M, K\]"),
        (torch.zeros(8, 2).t(), w, None, None, "contiguous last dim"),
        (x, torch.zeros(5, 9), None, None, "weight must be"),
        (x, torch.zeros(8, 5).t(), None, None, "weight must be"),
        (x, w.half(), None, None, "must match x"),
        (x.long(), w.long(), None, None, "bf16, fp16 or fp32"),
        (x, w, torch.zeros(4), None, "bias must be"),
        (x, w, None, torch.zeros(2, 5, dtype=torch.float16), "out must be"),
        (x, w, None, torch.zeros(5, 2).t(), "out must be"),
    ]
    for x_, w_, b_, out, match in cases:
        with pytest.raises(ValueError, match=match):
            small_m_linear(x_, w_, b_, out=out)


@pytest.mark.parametrize("bad, match", [
    ({"BLOCK_N": 8}, "lacks"),
    (cfg(12, 64), "power of 2"),
    (cfg(8, 64, split=0), "SPLIT_K"),
    (cfg(8, 64, dot=True), ">= 16"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        small_m_linear(torch.zeros(2, 8), torch.zeros(5, 8), config=bad)


def test_supports_needs_cuda_tensors():
    x, w = torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(5, 8, dtype=torch.bfloat16)
    assert not supports(x, w)


GPU_SHAPES = {  # name: (N, K)
    "qwen3_qkv": (4096, 1024), "qwen3_o": (1024, 2048), "qwen3_gate_up": (6144, 1024), "qwen3_down": (1024, 3072),
    "qwen3_lm_head": (151936, 1024),
    "llama1b_qkv": ((32 + 2 * 8) * 64, 2048), "llama1b_o": (2048, 2048), "llama1b_gate_up": (2 * 8192, 2048),
    "llama1b_down": (2048, 8192), "llama1b_lm_head": (128256, 2048),
}


@pytest.mark.parametrize("n, k", list(GPU_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_default_config_fills_an_h100(n, k, m):
    """Valid, K fully covered, and enough programs for 132 SMs (without a GPU: pure arithmetic)."""
    c = default_config(m, n, k, 132)
    check_config(c)
    chunk, splits = gemv.k_chunks(k, c["SPLIT_K"], c["BLOCK_K"])
    assert splits == c["SPLIT_K"] and chunk % c["BLOCK_K"] == 0 and splits * chunk >= k > (splits - 1) * chunk
    assert triton.cdiv(n, c["BLOCK_N"]) * splits >= 132
    assert c["BLOCK_N"] * c["BLOCK_K"] <= 16384  # bounded registers / shared memory per step


def test_config_table_entries_are_valid():
    for (bucket, n, k), c in gemv.CONFIGS.items():
        assert bucket == gemv.m_bucket(bucket) <= MAX_M and n > 0 and k > 0
        check_config(c)


def test_get_config_prefers_the_table(monkeypatch):
    entry = cfg(4, 512, split=2)
    monkeypatch.setitem(gemv.CONFIGS, (4, 300, 700), entry)
    assert gemv.get_config(3, 300, 700, torch.device("cuda")) == entry
    assert gemv.get_config(3, 300, 700, torch.device("cpu")) == default_config(3, 300, 700, gemv.INTERPRETER_SMS)


@only_if_interp_missed
def test_gemv_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at model shapes
# ----------------------------------------------------------------------------------------------

def gpu_inputs(m: int, n: int, k: int, seed: int, bias: bool = False):
    """x ~ N(0, 1), W ~ N(0, 1/K) (outputs of order 1), b ~ N(0, 1); drawn on the GPU (LM heads are large)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn((m, k), generator=gen, device=DEV).bfloat16()
    w = torch.randn((n, k), generator=gen, device=DEV).mul_(k ** -0.5).bfloat16()
    b = torch.randn((n,), generator=gen, device=DEV).bfloat16() if bias else None
    return x, w, b


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gpu_model_shapes(name, m):
    n, k = GPU_SHAPES[name]
    x, w, _ = gpu_inputs(m, n, k, seed=m)
    assert supports(x, w)
    out = poison((m, n), torch.bfloat16)
    small_m_linear(x, w, out=out)
    assert_linear(out, x, w)


GPU_CONFIGS = {
    "fma_smem": cfg(8, 1024), "fma_regs": cfg(4, 2048, stages=1), "fma_loop": cfg(8, 512, stages=3),
    "fma_split": cfg(8, 512, split=4), "fma_wide": cfg(4, 4096, warps=8),
    "mma": cfg(16, 256, dot=True, stages=4), "mma_split": cfg(32, 256, split=4, dot=True, stages=3),
    "wgmma": cfg(64, 128, dot=True, stages=3), "wgmma_split": cfg(128, 64, split=8, dot=True, stages=4, warps=8),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
@pytest.mark.parametrize("m, n, k", [(1, 1024, 2048), (5, 1000, 1000), (16, 3072, 1032)])
def test_gpu_paths(name, m, n, k):
    """Every inner product / pipelining / split-K variant compiled for the GPU, with bias and a strided x; also
    N and K that are not multiples of 16 (unvectorised, masked loads)."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = strided_rows(m, k, torch.bfloat16, gen), gpu_inputs(m, n, k, seed=6)[1], rand((n,), torch.bfloat16, gen)
    out = poison((m, n), torch.bfloat16)
    small_m_linear(x, w, b, out=out, config=GPU_CONFIGS[name])
    assert_linear(out, x, w, b)
    assert torch.equal(out, small_m_linear(x, w, b, config=GPU_CONFIGS[name])), "not deterministic"


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["default", "fma_split", "wgmma_split"])
def test_gpu_cuda_graph(name):
    """Captured once, replayed on new x: same results as eager (the grid and workspace depend on shapes only)."""
    config = None if name == "default" else GPU_CONFIGS[name]
    m, (n, k) = 4, GPU_SHAPES["qwen3_o"]
    x, w, b = gpu_inputs(m, n, k, seed=9, bias=True)
    out = poison((m, n), torch.bfloat16)
    small_m_linear(x, w, b, out=out, config=config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        small_m_linear(x, w, b, out=out, config=config)
    for seed in (10, 11):
        x.copy_(gpu_inputs(m, n, k, seed=seed)[0])
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        assert_linear(out, x, w, b)
        assert torch.equal(out, small_m_linear(x, w, b, config=config))


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_gpu_gated_down_projection(m):
    """The decode MLP's down projection with silu(gate) * up read inside the GEMV equals silu_and_mul + GEMV bit for
    bit, at the Qwen3-0.6B shape, with the table's config for each M."""
    n, k = GPU_SHAPES["qwen3_down"]
    gen = torch.Generator().manual_seed(40 + m)
    gate_up, w = strided_rows(m, 2 * k, torch.bfloat16, gen), gpu_inputs(m, n, k, seed=41)[1]
    assert supports(gate_up, w, gated=True) and not supports(gate_up, w)
    out = poison((m, n), torch.bfloat16)
    small_m_linear(gate_up, w, out=out, gated=True)
    act = activation.silu_and_mul(gate_up)
    assert torch.equal(out, small_m_linear(act, w))
    assert_linear(out, act, w)


@gpu
@needs_cuda
def test_gpu_supports():
    x, w, _ = gpu_inputs(4, 64, 32, seed=1)
    assert supports(x, w) and supports(x.half(), w.half())
    assert supports(torch.zeros(MAX_M, 32, device=DEV, dtype=torch.bfloat16), w)
    assert not supports(torch.zeros(MAX_M + 1, 32, device=DEV, dtype=torch.bfloat16), w)
    assert not supports(x[:0], w)
    assert not supports(x.float(), w.float())
    assert not supports(x, w.half())
    assert not supports(x, w.t().contiguous().t())
    assert not supports(x.t().contiguous().t(), w)
    assert not supports(x.cpu(), w)

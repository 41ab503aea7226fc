"""What the Triton kernel test files share: interpreter mode without CUDA, the markers, the fresh-process rerun.

Without a GPU the kernels run in Triton's CPU interpreter, which works only if TRITON_INTERPRET was set before
triton's first import (its builtins, tl.zeros, tl.sum, ..., are @jit code bound then). conftest.py sets it first;
this module sets it too, for a file imported some other way. If triton was imported earlier anyway, INTERP_OK is
False, the `interp` tests skip, and each file's fresh-process test reruns them in a process that starts with it set.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
NAN = float("nan")
INTERP_OK = HAS_CUDA or isinstance(tl.standard.zeros, InterpretedFunction)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
interp = pytest.mark.skipif(not INTERP_OK, reason="triton imported before TRITON_INTERPRET was set: "
                            "the file's *_in_fresh_process test runs these")
only_if_interp_missed = pytest.mark.skipif(INTERP_OK, reason="the kernels already run in this process")


def rerun_in_fresh_process(test_file: str, timeout_s: int = 900) -> None:
    """Run test_file's tests (all but its fresh-process one) in a process that has TRITON_INTERPRET=1 from its start."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
           "-W", "ignore::pytest.PytestUnknownMarkWarning", "-k", "not fresh_process"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ---- inputs --------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rand(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn on the CPU generator (the same on every device), moved to DEV."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=DEV)


def poison(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, NAN, dtype=dtype, device=DEV)


def strided_rows(n: int, d: int, dtype: torch.dtype, gen: torch.Generator, pad: int = 3) -> torch.Tensor:
    """[n, d] view with row stride d + 2 * pad inside a NaN-padded buffer."""
    buf = poison((n, d + 2 * pad), dtype)
    buf[:, pad:pad + d] = rand((n, d), dtype, gen)
    return buf[:, pad:pad + d]


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)


def random_lens(gen: torch.Generator, n: int, lo: int, hi: int) -> list[int]:
    """n lengths drawn uniformly from [lo, hi]."""
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


# ---- checks --------------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error, computed in float32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float, rel: float) -> None:
    """Same shape and dtype, all finite (poisoned outputs and caches show as NaN), max abs err <= atol, rel <= rel."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "NaN/inf in output: an unwritten output, cache slot or scale was read"
    max_err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    err = rel_err(out, ref)
    assert max_err <= atol and err <= rel, f"max abs err {max_err:.3e}, rel Frobenius err {err:.3e}"


def poison_allocator(device: str, nbytes: int = 64 << 20) -> None:
    """Leave NaN in freed memory so that outputs allocated next start as NaN (effective on CUDA)."""
    torch.full((nbytes // 4,), NAN, dtype=torch.float32, device=device)


def assert_order_free(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      ctx: torch.Tensor, table: torch.Tensor, scale: float, gen: torch.Generator, **kw) -> None:
    """Decode programs remapped by a random permutation, and by the engine's longest-first order, write the same
    rows bit for bit into a NaN-poisoned allocator."""
    from nanovllm.engine.step_builder import decode_order
    from nanovllm.kernels.triton_attention import decode_attention_triton
    for order in (torch.randperm(len(ctx), generator=gen), torch.from_numpy(decode_order(ctx.cpu().numpy()))):
        poison_allocator(DEV)
        again = decode_attention_triton(q, k_cache, v_cache, ctx, table, scale,
                                        order=order.to(DEV, torch.int32), **kw)
        assert torch.equal(again, out), "the program order changed the result"

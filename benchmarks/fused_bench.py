"""Microbenchmark of the fused Triton kernels vs their torch references and the layers/ path the engine runs
today (not a test). Needs a CUDA GPU. Shapes: Qwen3-0.6B (hidden 1024, intermediate 3072, 16 / 8 heads,
head_dim 128, vocab 151,936, bf16, KV block 256).

Times are medians of triton.testing.do_bench. "graph" = per call inside a CUDA graph of REPS back-to-back calls
(what the engine sees under graph replay); "eager" = one Python call (launch overhead included). GB/s = bytes
the fused kernel must move / its graph time. "current" = the layers/ modules' path (torch.compile'd ops, the
exponential-trick sampler), "n/a" if that API is not importable in this checkout.

    python3 -m benchmarks.fused_bench            # markdown table last
    python3 -m benchmarks.fused_bench --sweep    # also sampler tilings (rows, tile_v, tiles)
    python3 -m benchmarks.fused_bench --store-layouts  # the K/V store by fp8 V layout, warm and cold L2
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton.testing import do_bench

from nanovllm.kernels import activation, norm, rope_store, sampling
from nanovllm.kernels import triton_attention as ta
from nanovllm.kernels.torch_attention import new_kv_cache

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BLOCK_SIZE = 1024, 3072, 16, 8, 128, 151936, 256
DTYPE, EPS, REPS = torch.bfloat16, 1e-6, 20


def time_eager(fn: Callable) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def time_graph(fn: Callable) -> float:
    """us per call of fn inside a CUDA graph of REPS calls."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    ms = do_bench(graph.replay, warmup=10, rep=200, return_mode="median")
    return ms * 1e3 / REPS


def maybe(make: Callable[[], Callable]) -> Callable | None:
    """The current-path callable, or None when this checkout's layers/ API differs."""
    try:
        fn = make()
        fn()
        return fn
    except Exception as exc:  # API drift in layers/ while the engine is restructured
        print(f"  (current path unavailable: {type(exc).__name__}: {exc})")
        return None


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    n: int
    fused: Callable
    ref: Callable
    current: Callable | None  # None: not available
    nbytes: int               # bytes the fused kernel must move
    ref_in_graph: bool = True  # False: the reference syncs (boolean indexing), timed eagerly

def sampler_case(batch: int):
    logits = torch.randn(batch, VOCAB, device="cuda").mul_(3).to(DTYPE)
    temps = torch.full((batch,), 0.6, device="cuda")
    seeds = torch.randint(0, 2**62, (batch,), device="cuda")
    positions = torch.randint(0, 4096, (batch,), device="cuda")
    out = torch.empty(batch, dtype=torch.int64, device="cuda")
    ws = sampling.new_workspace(batch, torch.device("cuda"))  # the engine's path: a workspace kept across steps
    fused = lambda: sampling.sample_gumbel(logits, temps, seeds, positions, out=out, workspace=ws)  # noqa: E731
    ref = lambda: sampling.sample_gumbel_torch(logits, temps, seeds, positions)  # noqa: E731

    def current():
        from nanovllm.layers.sampler import Sampler, SamplingTensors
        sampler = Sampler()
        params = SamplingTensors(temps)  # today's bench path: unseeded rows, global RNG
        return lambda: sampler(logits, params)
    return Case(f"sample_gumbel T=0.6 (B={batch})", batch, fused, ref, maybe(current), logits.numel() * 2 + batch * 28)


def greedy_sampler_case(batch: int):
    logits = torch.randn(batch, VOCAB, device="cuda").to(DTYPE)
    zeros = torch.zeros(batch, device="cuda")
    ids = torch.zeros(batch, dtype=torch.int64, device="cuda")
    ws = sampling.new_workspace(batch, torch.device("cuda"))
    fused = lambda: sampling.sample_gumbel(logits, zeros, ids, ids, workspace=ws)  # noqa: E731
    ref = lambda: logits.argmax(-1)  # noqa: E731
    return Case(f"sample_gumbel greedy (B={batch})", batch, fused, ref, None, logits.numel() * 2 + batch * 28)


def rms_norm_case(n: int):
    x = torch.randn(n, HIDDEN, device="cuda", dtype=DTYPE)
    w = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    out = torch.empty_like(x)

    def current():
        from nanovllm.layers.layernorm import rms_norm
        return lambda: rms_norm(x, w, EPS)
    return Case("rms_norm", n, lambda: norm.rms_norm(x, w, EPS, out=out), lambda: norm.rms_norm_torch(x, w, EPS),
                maybe(current), 2 * x.numel() * 2)


def add_rms_norm_case(n: int):
    x = torch.randn(n, HIDDEN, device="cuda", dtype=DTYPE)
    res = torch.randn(n, HIDDEN, device="cuda", dtype=DTYPE)
    w = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    out = torch.empty_like(x)

    def current():
        from nanovllm.layers.layernorm import add_rms_norm
        return lambda: add_rms_norm(x, res, w, EPS)
    return Case("add_rms_norm", n, lambda: norm.add_rms_norm(x, res, w, EPS, out=out),
                lambda: norm.add_rms_norm_torch(x, res.clone(), w, EPS), maybe(current), 4 * x.numel() * 2)


def silu_case(n: int):
    x = torch.randn(n, 2 * INTER, device="cuda", dtype=DTYPE)
    out = torch.empty(n, INTER, device="cuda", dtype=DTYPE)

    def current():
        from nanovllm.layers.activation import silu_and_mul
        return lambda: silu_and_mul(x)
    return Case("silu_and_mul", n, lambda: activation.silu_and_mul(x, out=out),
                lambda: activation.silu_and_mul_torch(x), maybe(current), 3 * n * INTER * 2)


def rope_case(n: int, kv_fp8: bool = False, v_block: int | None = None, num_blocks: int | None = None):
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=DTYPE)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    q, k, v = q.view(n, HEADS, HEAD_DIM), k.view(n, KV_HEADS, HEAD_DIM), v.view(n, KV_HEADS, HEAD_DIM)
    # The engine's cache layouts (fp8: token-contiguous V runs of v_block tokens); decode-like slots: each token in
    # a page of its own
    num_blocks = max(num_blocks or 0, n + 1)
    cache_dtype = torch.float8_e4m3fn if kv_fp8 else DTYPE
    k_cache, v_cache = new_kv_cache(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache_dtype, "cuda",
                                    v_block_size=v_block)
    scales = {}
    if kv_fp8:
        shape = ta.kv_scale_shape(k_cache)
        scales = {"k_scale": torch.ones(shape, device="cuda"), "v_scale": torch.ones(shape, device="cuda")}
    slots = (torch.randperm(num_blocks, device="cuda")[:n] * BLOCK_SIZE
             + torch.randint(0, BLOCK_SIZE, (n,), device="cuda")).to(torch.int32)
    positions = torch.randint(0, 40960, (n,), device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(40960, device="cuda").float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    qw, kw = torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE), torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE)
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, slots, qw, kw, EPS)

    def current():  # Qwen3Attention today: q_norm, k_norm, rotary, store_kvcache
        from nanovllm.layers.layernorm import rms_norm
        from nanovllm.layers.rotary_embedding import apply_rotary

        def run():
            qn, kn = rms_norm(q, qw, EPS), rms_norm(k, kw, EPS)
            qr, kr = apply_rotary(positions, qn, kn, cos_sin)
            ta.store_kvcache(kr, v, k_cache, v_cache, slots)
            return qr
        return run
    elem = k_cache.element_size()
    nbytes = n * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * 2 + 2 * n * KV_HEADS * HEAD_DIM * elem \
        + (2 * n * KV_HEADS * 4 if kv_fp8 else 0) + n * (16 + 2 * HEAD_DIM * 4)
    name = "qk_norm_rope_store" + (f" fp8 KV (V runs of {v_cache.shape[1]})" if kv_fp8 else "")
    return Case(name, n, lambda: rope_store.qk_norm_rope_store(*args, **scales),
                lambda: rope_store.qk_norm_rope_store_torch(*args, **scales), None if kv_fp8 else maybe(current),
                nbytes, ref_in_graph=False)


def fmt(us: float | None) -> str:
    return "n/a" if us is None else f"{us:.1f}"


def run_cases(cases: list[Case]) -> list:
    rows = []
    for c in cases:
        g = time_graph(c.fused)
        ref = f"{time_graph(c.ref):.1f}" if c.ref_in_graph else f"{time_eager(c.ref):.1f} (eager)"
        cur = None if c.current is None else time_graph(c.current)
        rows.append((c.name, c.n, g, time_eager(c.fused), ref, cur, c.nbytes / (g * 1e-6) / 1e9))
        print(f"  {c.name} N={c.n}: {g:.1f} us", flush=True)
    return rows


def time_sampler_config(batch: int, cfg: dict, temperature: float = 0.6) -> str:
    logits = torch.randn(batch, VOCAB, device="cuda").to(DTYPE)
    temps = torch.full((batch,), temperature, device="cuda")
    ids = torch.arange(batch, device="cuda")
    cfg = dict(cfg, rows=min(cfg["rows"], triton.next_power_of_2(batch)))
    ws = sampling.new_workspace(batch, torch.device("cuda"))
    try:
        call = lambda: sampling.sample_gumbel(logits, temps, ids, ids, config=cfg, workspace=ws)  # noqa: E731
        return f"{time_graph(call):.1f}"
    except Exception as exc:  # e.g. too many registers for one tiling
        return f"err {type(exc).__name__}"


def compiled_sampler_kernels() -> dict:
    """id -> (registers, spills) of every compiled variant of the sampler kernel (empty if Triton hides them)."""
    try:
        return {id(k): (k.n_regs, k.n_spills) for cache in sampling._gumbel_partial_kernel.device_caches.values()
                for k in cache[0].values()}
    except Exception:  # Triton internals differ between versions
        return {}


SAMPLER_TILINGS = [  # (rows, tile_v, tiles, warps)
    (1, 1024, 1, 4), (1, 1024, 16, 4), (4, 512, 9, 4), (4, 256, 16, 4), (2, 256, 16, 2), (2, 256, 24, 2),
    (2, 512, 8, 4), (2, 512, 12, 4), (2, 512, 16, 4), (2, 512, 18, 4), (2, 512, 20, 4), (2, 1024, 8, 4),
    (2, 1024, 16, 4), (2, 1024, 16, 8)]


def sweep_sampler() -> None:
    print("\n## sample_gumbel tilings (graph us per call; default: " + ", ".join(
        f"B={b}: {sampling.sampler_config(b, VOCAB, torch.device('cuda'))}" for b in (1, 256)) + ")")
    print("| rows | tile_v | tiles | warps | B=1 | B=256 | B=256 greedy | regs/spills |\n" + "|---" * 8 + "|")
    for rows, tile_v, tiles, warps in SAMPLER_TILINGS:
        cfg = {"rows": rows, "tile_v": tile_v, "tiles": tiles, "num_warps": warps}
        before = compiled_sampler_kernels()
        cells = [time_sampler_config(1, cfg), time_sampler_config(256, cfg), time_sampler_config(256, cfg, 0.0)]
        regs = ", ".join(f"{r}/{s}" for i, (r, s) in compiled_sampler_kernels().items() if i not in before)
        print(f"| {rows} | {tile_v} | {tiles} | {warps} | " + " | ".join(cells) + f" | {regs} |", flush=True)


def time_graph_cold(fn: Callable, flush_bytes: int = 256 << 20) -> float:
    """us per call of fn when each call follows a copy of flush_bytes (L2 evicted, as between the engine's layers,
    where attention streams the whole cache): graph of REPS (copy, fn) pairs minus a graph of the copies alone."""
    src = torch.empty(flush_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    flush_only = time_graph(lambda: dst.copy_(src))
    return time_graph(lambda: (dst.copy_(src), fn())) - flush_only


def store_layouts() -> None:
    """The fused q/k norm + RoPE + K/V store at 256 decode tokens (random pages of a 2,048-block cache) for the
    model-dtype cache and fp8 V runs of 256 / 64 / 32 / 16 / 8 tokens: a decode token's V codes of one head land in
    min(128, 4 * run) 32-byte sectors, each a read-modify-write once evicted."""
    print("\n## qk_norm_rope_store, 256 decode tokens, by V layout (us per call)\n"
          "| cache | V run (tokens) | warm L2 (graph) | after a 256 MB copy (graph, copy subtracted) |\n"
          "|---|---|---|---|")
    for fp8, v_block in ((False, None), (True, 256), (True, 64), (True, 32), (True, 16), (True, 8)):
        case = rope_case(256, kv_fp8=fp8, v_block=v_block, num_blocks=2048)
        warm, cold = time_graph(case.fused), time_graph_cold(case.fused)
        print(f"| {'fp8' if fp8 else 'bf16'} | {v_block or '-'} | {warm:.1f} | {cold:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time several sampler tilings")
    parser.add_argument("--sampler-only", action="store_true", help="only the sampler cases")
    parser.add_argument("--store-layouts", action="store_true", help="only the K/V store by fp8 V layout")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    if args.store_layouts:
        return store_layouts()
    if args.sweep:
        sweep_sampler()
    cases = [sampler_case(1), sampler_case(256), greedy_sampler_case(256)]
    if args.sampler_only:
        cases += [rope_case(256), rope_case(256, kv_fp8=True)]
    for n in () if args.sampler_only else (1, 256, 4096):
        cases += [rms_norm_case(n), add_rms_norm_case(n), silu_case(n), rope_case(n)]
    if hasattr(ta, "kv_scale_shape") and not args.sampler_only:
        cases += [rope_case(n, kv_fp8=True) for n in (1, 256, 4096)]
    rows = run_cases(cases)
    print("\n## Fused kernels (bf16, Qwen3-0.6B shapes; us per call)")
    print("| kernel | N | fused graph | fused eager | torch ref graph | current path graph | speedup vs current "
          "| fused GB/s |\n|---|---|---|---|---|---|---|---|")
    for name, n, g, e, r, c, gbs in rows:
        speedup = "n/a" if c is None else f"{c / g:.1f}x"
        print(f"| {name} | {n} | {g:.1f} | {e:.1f} | {r} | {fmt(c)} | {speedup} | {gbs:.0f} |")


if __name__ == "__main__":
    main()

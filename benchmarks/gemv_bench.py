"""Small-M linear (nanovllm/kernels/gemv.py) vs F.linear (cuBLAS) at decode batch sizes (not a test). Needs a GPU.

Shapes: Qwen3-0.6B (qkv [4096, 1024], o [1024, 2048], gate_up [6144, 1024], down [1024, 3072], LM head
[151936, 1024]) and Llama-3.2-1B (qkv [3072, 2048], o [2048, 2048], gate_up [16384, 2048], down [2048, 8192], LM head
[128256, 2048]); bf16, y = x W^T, no bias.

Each (shape, M) is timed per call inside a CUDA graph whose calls cycle through enough copies of the weight to exceed
the 50 MB L2 (>= 256 MB together), so every call streams its weight from HBM and launches back to back, as in a
graph-replayed decode step (a split-K config pays for its second kernel). Timer: triton.testing.do_bench_cudagraph,
median of its replays. (do_bench flushes L2 before every call by writing 256 MB, which leaves ~50 MB of dirty lines
for the timed call to write back: a bias of up to ~25% on a 4 MB weight.) GB/s = weight bytes / time; % of 3.00 TB/s,
the H100's measured copy bandwidth (shared/reference/GPU.md).

    python3 -m benchmarks.gemv_bench            # table / default configs; markdown table last
    python3 -m benchmarks.gemv_bench --sweep    # first tries configs per shape and M (--sweep-ms) within --budget
                                                # seconds and prints the best as a dict for gemv.CONFIGS
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from nanovllm.kernels import gemv

PEAK_BPS = 3.00e12
ROTATE_BYTES = 256 << 20
DTYPE = torch.bfloat16
QWEN_LAYERS = 28
SHAPES = [  # (name, N, K)
    ("qwen3 qkv", 4096, 1024), ("qwen3 o", 1024, 2048), ("qwen3 gate_up", 6144, 1024), ("qwen3 down", 1024, 3072),
    ("qwen3 lm_head", 151936, 1024),
    ("llama1b qkv", 3072, 2048), ("llama1b o", 2048, 2048), ("llama1b gate_up", 16384, 2048),
    ("llama1b down", 2048, 8192), ("llama1b lm_head", 128256, 2048),
]
SWEEP_SHAPES = [s for s in SHAPES if "lm_head" not in s[0]]  # the LM heads take the default (N is large)
QWEN_LAYER_SHAPES = SHAPES[:4]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def weight_sets(n: int, k: int) -> list[torch.Tensor]:
    """Copies of a [N, K] weight that together exceed L2 several times over."""
    count = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=DTYPE).mul_(0.02) for _ in range(count)]


def time_per_call(make_call: Callable[[torch.Tensor], Callable], weights: list[torch.Tensor], rep_ms: int) -> float:
    """us per call; each pass calls once per weight copy."""
    calls = [make_call(w) for w in weights]

    def one_pass() -> None:
        for call in calls:
            call()
    return do_bench_cudagraph(one_pass, rep=rep_ms, return_mode="median") * 1e3 / len(calls)


def ours(x: torch.Tensor, out: torch.Tensor, cfg: dict | None) -> Callable[[torch.Tensor], Callable]:
    return lambda w: (lambda: gemv.small_m_linear(x, w, out=out, config=cfg))


def cublas(x: torch.Tensor) -> Callable[[torch.Tensor], Callable]:
    return lambda w: (lambda: F.linear(x, w))


def gbps(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


def peak_frac(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / PEAK_BPS


def max_rel_err(x: torch.Tensor, w: torch.Tensor, cfg: dict | None) -> float:
    ref = gemv.small_m_linear_torch(x, w).float()
    y = gemv.small_m_linear(x, w, config=cfg).float()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------

def config(block_n: int, block_k: int, n: int, k: int, warps: int, stages: int, dot: bool, sms: int) -> dict:
    split = gemv.k_chunks(k, gemv.split_for(triton.cdiv(n, block_n), k, block_k, sms), block_k)[1]
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": warps, "num_stages": stages,
            "dot": dot}


def candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """Configs to try, most promising first (the default leads); split K chosen as the default would. fma: the whole
    K (<= 4096) in one step, from registers (stages 1) or through shared memory (stages 2), at three tile sizes,
    then K-looped tiles pipelined 3 deep; dot: wgmma (BLOCK_N >= 64) and mma (16, 32) tilings."""
    kp2, np2 = triton.next_power_of_2(k), triton.next_power_of_2(n)
    whole_k = min(kp2, 4096)
    fma = []
    if m <= 8:
        for tile, warps in ((8192, 4), (4096, 4), (16384, 8)):
            block_n = max(1, min(np2, tile // whole_k))
            fma += [config(block_n, whole_k, n, k, warps, stages, False, sms) for stages in (2, 1)]
        for block_k in dict.fromkeys([min(kp2, 512), min(kp2, 1024)]):
            fma.append(config(max(1, min(np2, 8192 // block_k)), block_k, n, k, 4, 3, False, sms))
    dot = [config(block_n, min(block_k, max(16, kp2)), n, k, warps, stages, True, sms)
           for block_n, block_k, warps, stages in ((64, 128, 4, 3), (16, 256, 4, 4), (32, 256, 4, 3),
                                                   (128, 128, 4, 3), (64, 64, 4, 4), (16, 512, 4, 3))]
    ranked = fma + dot if m <= gemv.FMA_MAX_M else dot + fma
    unique = {tuple(sorted(c.items())): c for c in [gemv.default_config(m, n, k, sms)] + ranked}
    return list(unique.values())


def sweep_one(m: int, n: int, k: int, weights: list[torch.Tensor], deadline: float, sms: int) -> tuple[dict, float]:
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    out = torch.empty(m, n, device="cuda", dtype=DTYPE)
    best, best_us, tried = None, float("inf"), 0
    cands = candidates(m, n, k, sms)
    for cfg in cands:
        if tried >= 2 and time.monotonic() > deadline:
            break
        tried += 1
        try:
            err = max_rel_err(x, weights[0], cfg)
            us = time_per_call(ours(x, out, cfg), weights, rep_ms=5) if err < 2e-2 else float("inf")
        except Exception as exc:  # e.g. out of shared memory for one tiling: skip it
            print(f"    {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if err >= 2e-2:
            print(f"    {cfg}: WRONG (max rel err {err:.2e})")
        if us < best_us:
            best, best_us = cfg, us
    print(f"    tried {tried} of {len(cands)} configs")
    return best, best_us


def sweep(ms: list[int], budget_s: float, sms: int) -> dict:
    print(f"\n## Sweep (budget {budget_s:.0f} s)")
    start, found = time.monotonic(), {}
    pairs = [(shape, m) for shape in SWEEP_SHAPES for m in ms]
    shares = [2.0 if m == 1 else 1.0 for _, m in pairs]  # batch 1 (the latency target) gets twice the time
    for i, ((name, n, k), m) in enumerate(pairs):
        if i == 0 or pairs[i - 1][0] != (name, n, k):
            weights = weight_sets(n, k)
        left = budget_s - (time.monotonic() - start)
        deadline = time.monotonic() + left * shares[i] / sum(shares[i:])
        best, us = sweep_one(m, n, k, weights, deadline, sms)
        if best is not None:
            found[(gemv.m_bucket(m), n, k)] = (best, us)
            print(f"  {name} M={m}: {us:.2f} us ({gbps(n * k * 2, us):.0f} GB/s) {best}", flush=True)
    print("\n# Paste into nanovllm/kernels/gemv.py (measured: "
          f"{torch.cuda.get_device_name()}, triton {triton.__version__}):")
    print("CONFIGS: dict[tuple[int, int, int], dict] = {")
    for key in sorted(found):
        print(f"    {key}: {found[key][0]},")
    print("}")
    return {key: cfg for key, (cfg, _) in found.items()}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def measure(ms: list[int], tuned: dict) -> list[tuple]:
    rows = []
    for name, n, k in SHAPES:
        weights = weight_sets(n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            out = torch.empty(m, n, device="cuda", dtype=DTYPE)
            cfg = tuned.get((gemv.m_bucket(m), n, k))
            t_ref = time_per_call(cublas(x), weights, rep_ms=20)
            t_def = time_per_call(ours(x, out, None), weights, rep_ms=20)
            t_tuned = time_per_call(ours(x, out, cfg), weights, rep_ms=20) if cfg else None
            err = max_rel_err(x, weights[0], cfg)
            rows.append((name, n, k, m, t_ref, t_def, t_tuned, err))
            best = min(t_def, t_tuned or t_def)
            print(f"  {name} M={m}: cuBLAS {t_ref:.2f} us, ours {best:.2f} us", flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def print_tables(rows: list[tuple], ms: list[int]) -> None:
    print("\n## Qwen3-0.6B decode step, the 4 linear layers x 28 (sum of per-call graph times)")
    print("| M | cuBLAS ms | ours ms | saved ms |\n|---|---|---|---|")
    per = {(r[0], r[3]): r for r in rows}
    for m in ms:
        ref = sum(per[(s[0], m)][4] for s in QWEN_LAYER_SHAPES) * QWEN_LAYERS / 1e3
        new = sum(min(per[(s[0], m)][5], per[(s[0], m)][6] or math.inf) for s in QWEN_LAYER_SHAPES) * QWEN_LAYERS / 1e3
        print(f"| {m} | {ref:.3f} | {new:.3f} | {ref - new:.3f} |")
    print("\n## small_m_linear vs F.linear (bf16; us per call in a CUDA graph, weights streamed from HBM)")
    print("| shape | N | K | M | cuBLAS us | cuBLAS % of 3.0 TB/s | default us | tuned us | ours GB/s "
          "| ours % of 3.0 TB/s | speedup | max rel err |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k, m, t_ref, t_def, t_tuned, err in rows:
        nbytes = n * k * 2
        best = min(t_def, t_tuned or math.inf)
        tuned = f"{t_tuned:.2f}" if t_tuned else "-"
        print(f"| {name} | {n} | {k} | {m} | {t_ref:.2f} | {peak_frac(nbytes, t_ref):.0%} | {t_def:.2f} | {tuned} "
              f"| {gbps(nbytes, best):.0f} | {peak_frac(nbytes, best):.0%} | {t_ref / best:.2f}x | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="try configs per shape and M; print the best")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the whole sweep")
    parser.add_argument("--ms", default="1,2,4,8,16", help="batch sizes M timed (comma-separated, <= 16)")
    parser.add_argument("--sweep-ms", default="1,2,4,8", help="batch sizes M swept")
    args = parser.parse_args()
    ms, sweep_ms = ([int(v) for v in arg.split(",")] for arg in (args.ms, args.sweep_ms))
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    tuned = sweep(sweep_ms, args.budget, props.multi_processor_count) if args.sweep else {}
    print("\n## Timing (cuBLAS, table/default config" + (", swept best)" if tuned else ")"))
    print_tables(measure(ms, tuned), ms)


if __name__ == "__main__":
    main()

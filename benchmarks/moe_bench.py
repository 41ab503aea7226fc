"""Microbenchmark of the fused MoE kernel (not a test). Needs a CUDA GPU.

Qwen3-30B-A3B shapes: hidden 2048, 128 experts, top-8, moe_intermediate_size 768 (--inter 384: a TP=2 shard),
bf16, routing from random router logits (softmax top-8, renormalised). Weights read = the experts actually hit
(distinct ids) x 3*I*H*2 bytes; FLOPs = 2 * T*K * 3*I*H. Each timing is a CUDA graph of `--layers` MoE calls
over distinct weight sets (so L2 holds no weights between calls, as in a 48-layer model), median per call.

Rows: fused_moe (Triton); fused_moe_torch (the float32 reference, eager); a bf16 torch loop over the experts hit
(HF-style, eager); a dense bf16 GEMM [T*K/active, H] x [H, active*3I] with the same weight bytes and FLOPs.

    python3 -m benchmarks.moe_bench                 # table (markdown) last
    python3 -m benchmarks.moe_bench --sweep         # per T: time each GEMM over tile configs, print the best
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from nanovllm.kernels import fused_moe as fm

HIDDEN, EXPERTS, TOP_K, DTYPE = 2048, 128, 8, torch.bfloat16
TOKENS = (1, 8, 64, 256, 2048)
COPY_TBPS = 3.00  # H100 device-to-device copy bandwidth measured on the test machines (GPU.md)


class Problem:
    """`layers` weight sets and one routed batch of `num_tokens` tokens."""

    def __init__(self, num_tokens: int, inter: int, weights: list[tuple[torch.Tensor, torch.Tensor]]):
        gen = torch.Generator(device="cuda").manual_seed(num_tokens)
        self.x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen).to(DTYPE)
        logits = torch.randn(num_tokens, EXPERTS, device="cuda", generator=gen).to(DTYPE)
        self.topk_weights, self.topk_ids = fm.route_topk(logits, TOP_K, True)
        self.weights = weights
        self.inter = inter
        self.active = int(torch.unique(self.topk_ids).numel())

    @property
    def flops(self) -> float:
        return 2.0 * self.x.shape[0] * TOP_K * 3 * self.inter * HIDDEN

    @property
    def weight_bytes(self) -> float:
        return self.active * 3 * self.inter * HIDDEN * 2.0


def make_weights(layers: int, inter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(layers):
        w13 = torch.randn(EXPERTS, 2 * inter, HIDDEN, device="cuda", dtype=DTYPE) / HIDDEN ** 0.5
        w2 = torch.randn(EXPERTS, HIDDEN, inter, device="cuda", dtype=DTYPE) / inter ** 0.5
        out.append((w13, w2))
    return out


def graph_ms(fn_per_layer, layers: int, rep: int = 200) -> float:
    """Median ms per call of fn_per_layer(layer), all layers in one CUDA graph."""
    def run():
        for layer in range(layers):
            fn_per_layer(layer)
    run()
    torch.cuda.synchronize()
    return do_bench_cudagraph(run, rep=rep, return_mode="median") / layers


def torch_loop_bf16(x, w13, w2, topk_weights, topk_ids):
    """HF-style eager loop in bf16 (host syncs on the experts hit): the naive baseline."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    flat = topk_ids.reshape(-1).long()
    for expert in torch.unique(flat).tolist():
        slots = torch.nonzero(flat == expert).flatten()
        tokens = slots // TOP_K
        gate, up = F.linear(x[tokens], w13[expert]).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights.reshape(-1)[slots, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out


def dense_yardstick_ms(p: Problem, layers: int) -> float:
    """A dense GEMM reading the same weight bytes with the same FLOPs (rows = T*K / active experts)."""
    cols = p.active * 3 * p.inter
    rows = max(1, round(p.x.shape[0] * TOP_K / p.active))
    a = torch.randn(rows, HIDDEN, device="cuda", dtype=DTYPE)
    ws = [torch.randn(cols, HIDDEN, device="cuda", dtype=DTYPE) for _ in range(layers)]
    return graph_ms(lambda layer: F.linear(a, ws[layer]), layers)


def stage_ms(p: Problem, layers: int) -> dict:
    """us per call of the alignment and of each grouped GEMM alone (default config); the rest is the K-sum."""
    cfg = fm.moe_config(p.x.shape[0], TOP_K, EXPERTS)
    flat_ids = p.topk_ids.reshape(-1)
    plan = fm.moe_align_block_size(flat_ids, EXPERTS, cfg.block_m)
    acts = [fm._gate_up(p.x, w13, plan, TOP_K, p.inter, cfg) for w13, _ in p.weights]
    align = graph_ms(lambda layer: fm.moe_align_block_size(flat_ids, EXPERTS, cfg.block_m), layers)
    gate_up = graph_ms(gemm_fn(p, "gate_up", plan, acts, cfg), layers)
    down = graph_ms(gemm_fn(p, "down", plan, acts, cfg), layers)
    return {"align_us": align * 1e3, "gate_up_us": gate_up * 1e3, "down_us": down * 1e3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_row(p: Problem, layers: int) -> dict:
    x, tw, ti = p.x, p.topk_weights, p.topk_ids
    w13, w2 = p.weights[0]
    err = rel_err(fm.fused_moe(x, w13, w2, tw, ti), fm.fused_moe_torch(x, w13, w2, tw, ti))
    fused = graph_ms(lambda layer: fm.fused_moe(x, *p.weights[layer], tw, ti), layers)
    ref = do_bench(lambda: fm.fused_moe_torch(x, w13, w2, tw, ti), rep=200, return_mode="median")
    loop = do_bench(lambda: torch_loop_bf16(x, w13, w2, tw, ti), rep=200, return_mode="median")
    dense = dense_yardstick_ms(p, layers)
    stages = stage_ms(p, layers)
    return {"T": x.shape[0], "active": p.active, "fused_us": fused * 1e3, "ref_us": ref * 1e3, **stages,
            "loop_us": loop * 1e3, "dense_us": dense * 1e3,
            "fused_tflops": p.flops / fused * 1e-9, "dense_tflops": p.flops / dense * 1e-9,
            "fused_gbs": p.weight_bytes / fused * 1e-6, "dense_gbs": p.weight_bytes / dense * 1e-6,
            "copy_frac": p.weight_bytes / fused * 1e-6 / (COPY_TBPS * 1e3),
            "rel_err": err, "config": fm.moe_config(x.shape[0], TOP_K, EXPERTS)}


def print_table(rows: list[dict], inter: int) -> None:
    print(f"\n## fused MoE, E={EXPERTS} K={TOP_K} H={HIDDEN} I={inter} bf16 "
          f"({torch.cuda.get_device_name()}), median us per call")
    print("| T | experts hit | fused | (align / gate_up / down) | torch ref (fp32) | torch loop bf16 | "
          "dense yardstick | fused TFLOP/s | dense TFLOP/s | fused GB/s (weights) | dense GB/s | "
          "fused / 3.00 TB/s | rel err |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['active']} | {r['fused_us']:.1f} | "
              f"{r['align_us']:.1f} / {r['gate_up_us']:.1f} / {r['down_us']:.1f} | "
              f"{r['ref_us']:.0f} | {r['loop_us']:.0f} | "
              f"{r['dense_us']:.1f} | {r['fused_tflops']:.1f} | {r['dense_tflops']:.1f} | {r['fused_gbs']:.0f} | "
              f"{r['dense_gbs']:.0f} | {r['copy_frac']:.0%} | {r['rel_err']:.1e} |")
    for r in rows:
        print(f"T={r['T']}: {r['config']}")


# ----------------------------------------------------------------------------------------------
# --sweep: each GEMM timed alone over tile configs, on the real alignment plan
# ----------------------------------------------------------------------------------------------

def block_m_candidates(num_tokens: int) -> list[int]:
    per_expert = num_tokens * TOP_K / EXPERTS
    if per_expert <= 1:
        return [16]
    if per_expert <= 8:
        return [16, 32]
    if per_expert <= 32:
        return [32, 64]
    return [64, 128]


def tile_candidates(block_m: int, gate_up: bool) -> list[fm.GemmTile]:
    out = []
    widths = (32, 64, 128) if gate_up else (64, 128, 256)
    for bn, (bk, stages) in itertools.product(widths, ((64, 3), (64, 4), (128, 3), (128, 4))):
        b_cols = 2 * bn if gate_up else bn  # gate_up loads a gate and an up tile per step
        if stages * (block_m * bk + bk * b_cols) * 2 > 200 * 1024:  # shared memory
            continue
        out.append(fm.GemmTile(bn, bk, 8 if block_m * b_cols >= 128 * 128 else 4, stages))
    return out


def gemm_fn(p: Problem, name: str, plan: tuple, acts: list[torch.Tensor], cfg: fm.MoeConfig):
    """fn(layer) running one of the two grouped GEMMs alone."""
    if name == "gate_up":
        return lambda layer: fm._gate_up(p.x, p.weights[layer][0], plan, TOP_K, p.inter, cfg)
    flat_w = p.topk_weights.reshape(-1)
    return lambda layer: fm._down(acts[layer], p.weights[layer][1], flat_w, plan, HIDDEN, cfg)


def best_tile(p: Problem, name: str, plan: tuple, acts: list[torch.Tensor], block_m: int, layers: int):
    """(ms, tile) of the fastest tile for one GEMM; prints the runners-up."""
    timings = []
    for tile in tile_candidates(block_m, name == "gate_up"):
        try:
            timings.append((graph_ms(gemm_fn(p, name, plan, acts, fm.MoeConfig(block_m, tile, tile)), layers,
                                     rep=40), tile))
        except Exception as exc:  # a config the compiler rejects (e.g. out of resources): skip it
            print(f"  skip {name} {tile}: {type(exc).__name__}")
    timings.sort(key=lambda t: t[0])
    print(f"T={p.x.shape[0]} block_m={block_m} {name}: best {timings[0][0] * 1e3:.1f} us {timings[0][1]}; "
          f"next {[f'{ms * 1e3:.1f}' for ms, _ in timings[1:4]]}")
    return timings[0]


def sweep(p: Problem, layers: int) -> fm.MoeConfig:
    """Each GEMM timed alone over tile configs on the real alignment plan; the best pair over block_m."""
    best = (float("inf"), None)
    for block_m in block_m_candidates(p.x.shape[0]):
        plan = fm.moe_align_block_size(p.topk_ids.reshape(-1), EXPERTS, block_m)
        base = fm.MoeConfig(block_m, fm.GemmTile(64, 64, 4, 3), fm.GemmTile(128, 64, 4, 3))
        acts = [fm._gate_up(p.x, w13, plan, TOP_K, p.inter, base) for w13, _ in p.weights]
        gate_up = best_tile(p, "gate_up", plan, acts, block_m, layers)
        down = best_tile(p, "down", plan, acts, block_m, layers)
        if gate_up[0] + down[0] < best[0]:
            best = (gate_up[0] + down[0], fm.MoeConfig(block_m, gate_up[1], down[1]))
    default = fm.moe_config(p.x.shape[0], TOP_K, EXPERTS)
    print(f"T={p.x.shape[0]}: best GEMMs {best[0] * 1e3:.1f} us with {best[1]} (default: {default})")
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inter", type=int, default=768, help="moe_intermediate_size of this rank (768, 384)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--layers", type=int, default=4, help="distinct weight sets per timed graph")
    parser.add_argument("--sweep", action="store_true", help="time tile configs per GEMM and print the best")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = make_weights(args.layers, args.inter)
    problems = [Problem(t, args.inter, weights) for t in args.tokens]
    if args.sweep:
        best = {p.x.shape[0]: sweep(p, args.layers) for p in problems}
        print("\nbest configs:")
        for t, cfg in best.items():
            print(f"T={t}: {cfg}")
    rows = [bench_row(p, args.layers) for p in problems]
    print_table(rows, args.inter)


if __name__ == "__main__":
    main()

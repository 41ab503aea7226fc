"""Microbenchmark of the Triton attention kernels (not a test). Needs a CUDA GPU.

Decode: bandwidth = bytes that must move (K/V of every context token once, plus q and out; with an fp8
cache the K/V bytes are the fp8 codes plus their float32 scales) / median time, also as a fraction of the
measured device-to-device copy bandwidth and of the nominal 3.00 TB/s. Prefill: causal TFLOP/s.
Shapes: Qwen3-0.6B (16 q heads, 8 kv heads, head_dim 128, bf16 queries), block size 256.

    python3 -m benchmarks.attention_bench                   # bf16 KV cache, markdown table last
    python3 -m benchmarks.attention_bench --kv-dtype fp8    # fp8 (e4m3) KV cache with per-(token, head) scales
    python3 -m benchmarks.attention_bench --sweep           # also try several tile/warp/stage/split configs
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from nanovllm.kernels import triton_attention as ta
from nanovllm.kernels.torch_attention import new_kv_cache

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 16, 8, 128, 256, torch.bfloat16
BATCHES, CONTEXTS = (1, 16, 64, 256), (512, 1024, 4096)
L2_BYTES = 50 << 20
NOMINAL_BW = 3.00e12
FP8 = False  # set by --kv-dtype fp8
V_BLOCK = None  # set by --v-block (fp8 V runs; None = the engine's default)


def kv_bytes_per_token() -> int:
    """K + V bytes of one token (all KV heads), scales included for fp8."""
    return 2 * KV_HEADS * (HEAD_DIM + 4) if FP8 else 2 * KV_HEADS * HEAD_DIM * 2


def random_kv(shape: tuple) -> tuple[tuple, tuple]:
    """((k, k_scale), (v, v_scale)): random caches [blocks, block_size, heads, head_dim] in the engine's layouts
    (torch_attention.new_kv_cache) and the benchmark's KV dtype; random float32 scales for fp8, else None."""
    caches = new_kv_cache(*shape, torch.float8_e4m3fn if FP8 else DTYPE, "cuda", v_block_size=V_BLOCK)
    if not FP8:
        return tuple((c.normal_(), None) for c in caches)
    out = []
    for cache in caches:
        codes = cache.view(torch.uint8)
        codes.copy_(torch.randint(0, 127, cache.shape, dtype=torch.uint8, device="cuda")  # no NaN code (127)
                    | torch.randint(0, 2, cache.shape, dtype=torch.uint8, device="cuda") << 7)
        out.append((cache, torch.rand(ta.kv_scale_shape(caches[0]), device="cuda") / 448 + 1e-3))
    return tuple(out)


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB bf16 device-to-device copy."""
    x = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


class DecodeInputs:
    """One big random cache; each input set is a random table of distinct blocks (rotated past L2)."""

    def __init__(self, max_blocks: int):
        shape = (max_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        (self.k, k_scale), (self.v, v_scale) = random_kv(shape)
        self.scales = {"k_scale": k_scale, "v_scale": v_scale} if FP8 else {}
        self.num_blocks = max_blocks

    def sets(self, batch: int, ctx: int) -> list[tuple]:
        width = triton.cdiv(ctx, BLOCK_SIZE)
        set_bytes = batch * ctx * kv_bytes_per_token()
        n_sets = max(2, min(64, triton.cdiv(4 * L2_BYTES, set_bytes)))
        ctx_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        out = []
        for _ in range(n_sets):
            table = torch.randperm(self.num_blocks, device="cuda")[:batch * width].view(batch, width)
            q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            out.append((q, ctx_lens, table.to(torch.int32).contiguous()))
        return out


def decode_bytes(batch: int, ctx: int) -> int:
    return batch * ctx * kv_bytes_per_token() + 2 * batch * HEADS * HEAD_DIM * 2


def _decode_call(inputs: DecodeInputs, config: dict | None):
    scale = HEAD_DIM ** -0.5
    return lambda q, ctx_lens, table: ta.decode_attention_triton(q, inputs.k, inputs.v, ctx_lens, table, scale,
                                                                 config=config, **inputs.scales)


def time_decode(inputs: DecodeInputs, batch: int, ctx: int, config: dict | None) -> float:
    """Median ms of one eager decode_attention_triton call (Python launch cost included), rotating sets."""
    sets, call = itertools.cycle(inputs.sets(batch, ctx)), _decode_call(inputs, config)
    return do_bench(lambda: call(*next(sets)), warmup=25, rep=150, return_mode="median")


def time_decode_graph(inputs: DecodeInputs, batch: int, ctx: int, config: dict | None) -> float:
    """Median ms per call inside a CUDA graph that runs one call per input set (as the engine replays)."""
    sets, call = inputs.sets(batch, ctx), _decode_call(inputs, config)
    for s in sets[:1]:
        call(*s)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            call(*s)
    ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    del graph
    return ms / len(sets)


def decode_error(inputs: DecodeInputs, batch: int, ctx: int, config: dict) -> float:
    """Max abs difference of a config's output vs the default config (which the tests verify)."""
    s = inputs.sets(batch, ctx)[0]
    return (_decode_call(inputs, config)(*s).float() - _decode_call(inputs, None)(*s).float()).abs().max().item()


def default_decode_config(batch: int) -> dict:
    q = torch.empty(batch, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return ta._decode_config(q, KV_HEADS, HEAD_DIM, FP8)


def split_cap(batch: int, waves: int) -> int:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return min(32, triton.next_power_of_2(triton.cdiv(waves * sms, batch * KV_HEADS)))


def sweep_decode(inputs: DecodeInputs, copy_bw: float) -> None:
    points = [(256, 1024), (64, 1024), (64, 4096), (16, 4096), (64, 512), (1, 4096)]
    tiles = [(64, 4, 2), (64, 4, 3), (32, 4, 2), (32, 2, 3), (128, 4, 2), (128, 8, 2), (64, 2, 2)]
    waves = [(1, 4), (4, 4), (8, 4), (2, 2), (2, 8), (8, 2)]
    if FP8:  # the fp8 kernel's own neighbourhood (128-token tiles, deeper pipelines)
        tiles = [(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3), (256, 8, 2)]
        waves = [(1, 4), (4, 4), (2, 2), (16, 4), (16, 2)]  # 16 waves: long sequences split at batch 256
    variants = [{"tile_n": t, "num_warps": w, "num_stages": st, "waves": 2, "min_split_tiles": 4}
                for t, w, st in tiles]
    if FP8:  # register caps: more resident programs per SM
        variants += [{"tile_n": 128, "num_warps": 4, "num_stages": st, "waves": 2, "min_split_tiles": 4,
                      "maxnreg": r} for st, r in [(3, 128), (4, 128), (3, 168)]]
    variants += [{"tile_n": 128 if FP8 else 64, "num_warps": 4, "num_stages": 2, "waves": w,  # default tiling
                  "min_split_tiles": m} for w, m in waves]
    print(f"\n## decode sweep, {'fp8' if FP8 else 'bf16'} KV (CUDA graph; fraction of copy bandwidth; "
          "max |diff| vs default config)")
    print("| tile_n | warps | stages | waves | min_split_tiles | maxnreg | "
          + " | ".join(f"{b}x{c}" for b, c in points) + " | max diff |")
    print("|" + "---|" * (7 + len(points)))
    for v in variants:
        cells, err = [], 0.0
        for batch, ctx in points:
            cfg = {"tile_n": v["tile_n"], "num_warps": v["num_warps"], "num_stages": v["num_stages"],
                   "max_splits": split_cap(batch, v["waves"]), "min_split_tiles": v["min_split_tiles"],
                   "maxnreg": v.get("maxnreg")}
            try:
                ms = time_decode_graph(inputs, batch, ctx, cfg)
                cells.append(f"{decode_bytes(batch, ctx) / (ms * 1e-3) / copy_bw:.1%}")
                err = max(err, decode_error(inputs, batch, ctx, cfg))
            except Exception as exc:  # e.g. out of shared memory for one config
                cells.append(f"err {type(exc).__name__}")
        print(f"| {v['tile_n']} | {v['num_warps']} | {v['num_stages']} | {v['waves']} | {v['min_split_tiles']} | "
              f"{v.get('maxnreg') or '-'} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)


def prefill_inputs(num_seqs: int, seqlen: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    width = triton.cdiv(seqlen, BLOCK_SIZE)
    shape = (num_seqs * width, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    (k, k_scale), (v, v_scale) = random_kv(shape)
    q = torch.randn(num_seqs * seqlen, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    table = torch.randperm(num_seqs * width, device="cuda").view(num_seqs, width).to(torch.int32)
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * seqlen
    scales = {"k_scale": k_scale, "v_scale": v_scale} if FP8 else {}
    return q, k, v, cu, table, scales


def time_prefill(num_seqs: int, seqlen: int, config: dict | None) -> tuple[float, float, float]:
    """(ms, TFLOP/s, max |diff| vs default config) of causal prefill; FLOPs of the unmasked half only."""
    q, k, v, cu, table, scales = prefill_inputs(num_seqs, seqlen)
    fn = lambda cfg: ta.varlen_attention_triton(q, k, v, cu, cu, seqlen, seqlen, table,  # noqa: E731
                                                HEAD_DIM ** -0.5, config=cfg, **scales)
    ms = do_bench(lambda: fn(config), warmup=25, rep=150, return_mode="median")
    err = (fn(config).float() - fn(None).float()).abs().max().item()
    flops = 4 * num_seqs * HEADS * HEAD_DIM * seqlen * (seqlen + 1) / 2
    return ms, flops / (ms * 1e-3) / 1e12, err


def sweep_prefill() -> None:
    shapes = [(8, 1024), (4, 4096), (64, 256)]
    print("\n## prefill sweep (TFLOP/s; max |diff| vs default config)")
    print("| rows | tile_n | warps | stages | " + " | ".join(f"{n}x{s}" for n, s in shapes) + " | max diff |")
    print("|" + "---|" * (5 + len(shapes)))
    for rows, tile_n, warps, stages in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3),
                                        (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 4),
                                        (128, 64, 4, 2), (64, 128, 8, 2)]:
        cfg = {"rows": rows, "tile_n": tile_n, "num_warps": warps, "num_stages": stages}
        cells, err = [], 0.0
        for n, s in shapes:
            try:
                _, tflops, e = time_prefill(n, s, cfg)
                cells.append(f"{tflops:.0f}")
                err = max(err, e)
            except Exception as exc:
                cells.append(f"err {type(exc).__name__}")
        print(f"| {rows} | {tile_n} | {warps} | {stages} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)


def main() -> None:
    global FP8, V_BLOCK
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also try several kernel configs")
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="KV cache format")
    parser.add_argument("--no-prefill-sweep", action="store_true", help="with --sweep: decode configs only")
    parser.add_argument("--v-block", type=int, default=None, help="fp8: tokens per V run (default: the engine's)")
    parser.add_argument("--decode-only", action="store_true", help="skip prefill timings")
    args = parser.parse_args()
    FP8, V_BLOCK = args.kv_dtype == "fp8", args.v_block
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; copy bandwidth {copy_bw / 1e12:.2f} TB/s; "
          f"KV cache {args.kv_dtype}" + (f", V runs of {V_BLOCK} tokens" if FP8 and V_BLOCK else ""))
    max_blocks = max(b * triton.cdiv(c, BLOCK_SIZE) for b in BATCHES for c in CONTEXTS) * 2
    inputs = DecodeInputs(max_blocks)
    if args.sweep:
        sweep_decode(inputs, copy_bw)
        if not args.no_prefill_sweep:
            sweep_prefill()

    rows = []
    for batch, ctx in itertools.product(BATCHES, CONTEXTS):
        graph_ms = time_decode_graph(inputs, batch, ctx, None)
        eager_ms = time_decode(inputs, batch, ctx, None)
        bw = decode_bytes(batch, ctx) / (graph_ms * 1e-3)
        rows.append((batch, ctx, default_decode_config(batch)["max_splits"], graph_ms * 1e3, eager_ms * 1e3,
                     bw / 1e12, bw / copy_bw, bw / NOMINAL_BW))
    prefill = [] if args.decode_only else [(n, s, *time_prefill(n, s, None)[:2])
                                           for n, s in [(8, 1024), (4, 4096), (64, 256)]]

    kv = "fp8 e4m3 KV (+ fp32 per-(token, head) scales)" if FP8 else "bf16 KV"
    print(f"\n## Prefill (causal, bf16 queries, {kv}, Qwen3-0.6B heads)\n| seqs x tokens | time (us) | TFLOP/s |"
          "\n|---|---|---|")
    for n, s, ms, tflops in prefill:
        print(f"| {n} x {s} | {ms * 1e3:.0f} | {tflops:.0f} |")
    print(f"\n## Decode ({kv}, 16/8 heads, head_dim 128, block 256; copy bw {copy_bw / 1e12:.2f} TB/s)")
    print("time per call inside a CUDA graph (bandwidth from it) and eager (one call, Python launch included); "
          f"bytes per context token {kv_bytes_per_token()}")
    print("| batch | context | split cap | graph (us) | eager (us) | TB/s | % of copy bw | % of 3.00 TB/s |\n"
          "|---|---|---|---|---|---|---|---|")
    for batch, ctx, cap, g_us, e_us, tbs, frac, nominal in rows:
        print(f"| {batch} | {ctx} | {cap} | {g_us:.1f} | {e_us:.1f} | {tbs:.2f} | {frac:.1%} | {nominal:.1%} |")


if __name__ == "__main__":
    main()

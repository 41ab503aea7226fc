"""Where bench.py's time goes: host time per phase (schedule / run / postprocess) for prefill and decode
steps, then a torch.profiler breakdown of GPU kernel time over some decode steps at full batch.

    python3 benchmarks/profile_steps.py [--model DIR] [--num-seqs 256] [--profile-steps 20]
"""
import argparse
import os
import sys
import time
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import make_workload  # noqa: E402
from benchmarks.random_checkpoint import build_qwen3_0_6b  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402

KERNEL_GROUPS = [("attention", ("attention", "attn", "decode", "varlen")), ("store_kvcache", ("store",)),
                 ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "cublas")), ("sampling", ("sort", "argmax",
                 "softmax", "exponential", "distribution")), ("elementwise/compiled", ("triton_", "elementwise",
                 "vectorized", "reduce"))]


def timed(stats: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        stats[key] += time.perf_counter() - t
        return out
    return wrapper


def instrument(llm) -> dict:
    """Accumulate host seconds per phase, split by the kind of the step being run."""
    stats, kind = defaultdict(float), {"k": "?"}
    schedule = llm.scheduler.schedule

    def schedule_and_tag():
        t = time.perf_counter()
        seqs, is_prefill = schedule()
        kind["k"] = "prefill" if is_prefill else "decode"
        stats[kind["k"] + ".schedule"] += time.perf_counter() - t
        stats[kind["k"] + ".steps"] += 1
        return seqs, is_prefill
    llm.scheduler.schedule = schedule_and_tag
    runner = llm.model_runner
    for name, obj in (("run", runner), ("postprocess", llm.scheduler), ("prepare_prefill", runner),
                      ("prepare_decode", runner), ("prepare_sample", runner), ("run_model", runner)):
        fn = getattr(obj, name)
        setattr(obj, name, lambda *a, _fn=fn, _n=name, **k: timed(stats, kind["k"] + "." + _n, _fn)(*a, **k))
    return stats


def kernel_breakdown(llm, num_steps: int) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            llm.step()
        torch.cuda.synchronize()
    groups = defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA" and getattr(evt, "self_device_time_total", 0) == 0:
            continue
        name = evt.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] += evt.self_device_time_total / 1e3 / num_steps  # ms per step
    top = sorted(((e.key[:70], e.self_device_time_total / 1e3 / num_steps) for e in prof.key_averages()),
                 key=lambda x: -x[1])[:12]
    print("\nTop kernels (ms per step):")
    for name, ms in top:
        print(f"  {ms:8.3f}  {name}")
    return sorted(groups.items(), key=lambda x: -x[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/nanovllm-random-qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--profile-steps", type=int, default=20)
    args = p.parse_args()
    if not os.path.isdir(args.model):
        build_qwen3_0_6b(args.model)
    llm = LLM(args.model)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    prompts, params = make_workload(args.num_seqs, 1024, 1024)
    stats = instrument(llm)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outs)
    print(f"workload: {tokens} tokens in {total:.2f}s = {tokens / total:.0f} tok/s")
    print("host ms per step; run = prepare + forward launch (run_model) + sampling + wait for the GPU")
    print("| phase | steps | schedule | prepare | prepare_sample | run_model | run | postprocess | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in ("prefill", "decode"):
        n = max(stats[k + ".steps"], 1)
        row = [stats[f"{k}.{x}"] * 1e3 / n for x in ("schedule", "prepare_" + k, "prepare_sample", "run_model",
                                                      "run", "postprocess")]
        total = row[0] + row[4] + row[5]
        print(f"| {k} | {n:.0f} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {total:.2f} |")
    # full-batch decode kernel breakdown: fresh requests, past their prefill
    llm.generate(prompts[:1], params[:1], use_tqdm=False)
    for prompt, sp in zip(prompts, params):
        llm.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1024))
    while any(s.num_cached_tokens < s.num_prompt_tokens for s in list(llm.scheduler.running)) or llm.scheduler.waiting:
        llm.step()
    for _ in range(5):
        llm.step()
    t = time.perf_counter()
    for _ in range(args.profile_steps):
        llm.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.profile_steps * 1e3
    groups = kernel_breakdown(llm, args.profile_steps)
    print(f"\nDecode at batch {len(llm.scheduler.running)}: {wall:.2f} ms/step wall")
    print("| kernel group | ms/step |")
    print("|---|---|")
    for g, ms in groups:
        print(f"| {g} | {ms:.3f} |")
    llm.exit()


if __name__ == "__main__":
    main()

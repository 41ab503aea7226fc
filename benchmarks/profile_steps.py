"""Where a step's time goes (GPU): host milliseconds per phase over bench.py's workload, then, for decode at full
batch (256) and at batch 1, the step's wall time against the GPU's kernel time (the host gap is the difference),
kernel launches per step, and GPU time by kernel group.

    python3 -m benchmarks.profile_steps [--model DIR] [--num-seqs 256] [--profile-steps 20] [--no-async-scheduling]
"""
import argparse
import os
import time
from collections import defaultdict

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine import llm_engine
from nanovllm.testing.random_checkpoint import build_qwen3_0_6b
from nanovllm.testing.workload import make_workload
from nanovllm.worker.model_runner import SampledIds

KERNEL_GROUPS = [("attention", ("attention", "attn", "_decode", "varlen", "_prefill")),
                 ("store/rope", ("store", "rope")), ("sampling", ("sample", "gumbel", "argmax", "softmax",
                                                                   "exponential", "sort")),
                 ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "cublas", "matmul")),
                 ("norm/elementwise", ("norm", "silu", "triton_", "elementwise", "vectorized", "reduce"))]


def instrument(llm: LLM) -> dict:
    """Accumulate host seconds per phase of LLMEngine._step, by the kind of step launched."""
    stats, kind = defaultdict(float), {"k": "idle"}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            stats[f"{kind['k']}.{name}"] += time.perf_counter() - t
            return out
        return wrapper

    schedule = llm.scheduler.schedule

    def schedule_and_tag():
        batch = schedule()
        kind["k"] = "idle" if batch is None else "prefill" if batch.is_prefill else "decode"
        stats[kind["k"] + ".steps"] += 1
        return batch
    llm.scheduler.schedule = timed("schedule", schedule_and_tag)
    llm_engine.build_step_input = timed("build_input", llm_engine.build_step_input)
    llm.model_runner.run = timed("launch", llm.model_runner.run)
    SampledIds.tolist = timed("wait", SampledIds.tolist)  # restored by main()
    llm._process = timed("process (incl. wait)", llm._process)
    llm._step = timed("step", llm._step)
    return stats


def print_phases(stats: dict) -> None:
    phases = ("schedule", "build_input", "launch", "wait", "process (incl. wait)", "step")
    print("\nhost ms per step (step = all of LLMEngine._step; wait = blocked on the GPU for sampled ids)")
    print("| kind | steps | " + " | ".join(phases) + " |\n|---|---|" + "---|" * len(phases))
    for k in ("prefill", "decode"):
        n = max(stats[k + ".steps"], 1)
        print(f"| {k} | {n:.0f} | " + " | ".join(f"{stats[f'{k}.{p}'] * 1e3 / n:.3f}" for p in phases) + " |")


def decode_profile(llm: LLM, batch: int, steps: int) -> dict:
    """Fill the engine with `batch` decoding requests, then time `steps` steps and profile them."""
    from torch.profiler import ProfilerActivity, profile
    prompts, _ = make_workload(batch, 1024, 1024, rng_seed=1)
    for prompt in prompts:
        llm.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2048))
    while llm.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens - 1 for s in llm.scheduler.running):
        llm.step()
    for _ in range(5):
        llm.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    groups, launches, busy = defaultdict(float), 0, 0.0
    for evt in prof.key_averages():
        ms = evt.self_device_time_total / 1e3 / steps
        if ms <= 0:
            continue
        name = evt.key.lower()
        if "memcpy" not in name and "memset" not in name:
            launches += evt.count
        busy += ms
        groups[next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")] += ms
    sampling = sampling_span(prof, steps)
    top = sorted(((e.key[:80], e.self_device_time_total / 1e3 / steps, e.count / steps)
                  for e in prof.key_averages()), key=lambda x: -x[1])[:12]
    for request_id in list(llm.requests):
        llm.abort_request(request_id)
    while not llm.is_finished():
        llm.step()
    return dict(batch=batch, wall=wall, busy=busy, launches=launches / steps, groups=groups, top=top, **sampling)


def is_sampling(name: str) -> bool:
    return next((g for g, keys in KERNEL_GROUPS if any(k in name.lower() for k in keys)), "") == "sampling"


def sampling_span(prof, steps: int) -> dict:
    """Sampling's GPU time per step: `span` sums the sampling kernels' durations; `exposed` is what they add to the
    step's critical path, from the end of the kernel before them (the LM head) to the end of the last of them. A
    kernel that starts early and waits (programmatic dependent launch) overstates its cost in `span`, not in
    `exposed`."""
    from torch.autograd import DeviceType
    kernels = sorted(((e.time_range.start, e.time_range.end, is_sampling(e.name)) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[0])
    span = exposed = 0.0
    prev_end, group = 0.0, None  # group: [start, end] of the current run of sampling kernels
    for start, end, sampling in kernels + [(float("inf"), float("inf"), False)]:
        if sampling:
            group = [max(start, prev_end), end] if group is None else [group[0], max(group[1], end)]
            span += end - start
            continue
        if group is not None:
            exposed += max(group[1] - group[0], 0.0)
            group = None
        prev_end = max(prev_end, end) if start < float("inf") else prev_end
    return dict(sampling_span=span / 1e3 / steps, sampling_exposed=exposed / 1e3 / steps)


def print_decode(result: dict) -> None:
    gap = result["wall"] - result["busy"]
    print(f"\n## decode at batch {result['batch']}: {result['wall']:.3f} ms/step wall, {result['busy']:.3f} ms GPU "
          f"busy ({result['busy'] / result['wall']:.1%}), host gap {gap:.3f} ms, {result['launches']:.0f} kernel "
          "launches/step")
    print("| kernel group | ms/step |\n|---|---|")
    for group, ms in sorted(result["groups"].items(), key=lambda x: -x[1]):
        print(f"| {group} | {ms:.3f} |")
    print(f"sampling on the timeline: {result['sampling_span']:.4f} ms/step summed, "
          f"{result['sampling_exposed']:.4f} ms/step exposed (LM head end -> last sampling kernel end)")
    print("top kernels (ms/step, calls/step):")
    for name, ms, calls in result["top"]:
        print(f"  {ms:8.3f} {calls:6.1f}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/nanovllm-random-qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--skip-workload", action="store_true", help="only the decode profiles")
    args = p.parse_args()
    if not os.path.isdir(args.model):
        build_qwen3_0_6b(args.model)
    engine_args = dict(async_scheduling=not args.no_async_scheduling, kv_cache_dtype=args.kv_cache_dtype)
    llm = LLM(args.model, **engine_args)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    if not args.skip_workload:
        prompts, params = make_workload(args.num_seqs, 1024, 1024)
        tolist = SampledIds.tolist
        stats = instrument(llm)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        total = time.perf_counter() - t
        SampledIds.tolist = tolist
        tokens = sum(len(o["token_ids"]) for o in outs)
        print(f"workload: {tokens} tokens in {total:.2f}s = {tokens / total:.0f} tok/s")
        print_phases(stats)
        llm.exit()
        llm = LLM(args.model, **engine_args)  # uninstrumented
        llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    results = [decode_profile(llm, b, args.profile_steps) for b in (args.num_seqs, 1)]
    for result in results:
        print_decode(result)
    print("\n| decode batch | wall ms/step | GPU busy ms | busy % | host gap ms | launches/step | "
          "sampling exposed ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['wall']:.3f} | {r['busy']:.3f} | {r['busy'] / r['wall']:.1%} | "
              f"{r['wall'] - r['busy']:.3f} | {r['launches']:.0f} | {r['sampling_exposed']:.4f} |")
    llm.exit()


if __name__ == "__main__":
    main()

"""Our engine vs Hugging Face transformers' continuous batching on bench.py's workload, in one run.

Both sides get the same prompts (token ids), per-request max_tokens, temperature 0.6 and no early stop; both are
timed from submitting the workload to its last token, after a warm-up (our LLM(...) init and one short generate;
HF's manager warm-up, which captures its CUDA graphs, and one short request).

    python -m benchmarks.hf_compare            # the full workload (HF takes ~4 minutes on an H100)
    python -m benchmarks.hf_compare --quick    # 64 sequences, lengths <= 512
"""
import argparse
import gc
import inspect
import os
import sys
import time
from dataclasses import dataclass, fields

import torch

from nanovllm.testing.random_checkpoint import resolve_model
from nanovllm.testing.workload import make_workload

DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
HF_ATTN = "paged|sdpa"
WARMUP_IDS = list(range(100, 116))


@dataclass
class Result:
    engine: str
    tokens: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model directory; when the default is missing, a cached random-weight Qwen3-0.6B")
    parser.add_argument("--num-seqs", type=int, default=None, help="default 256 (64 with --quick)")
    parser.add_argument("--max-input-len", type=int, default=None, help="default 1024 (512 with --quick)")
    parser.add_argument("--max-output-len", type=int, default=None, help="default 1024 (512 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a reduced workload: 64 sequences, lengths <= 512")
    parser.add_argument("--enforce-eager", action="store_true", help="our engine without CUDA graphs")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    args = parser.parse_args(argv)
    defaults = (64, 512, 512) if args.quick else (256, 1024, 1024)
    for name, value in zip(("num_seqs", "max_input_len", "max_output_len"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run_ours(path: str, prompts: list[list[int]], max_tokens: list[int], enforce_eager: bool) -> Result:
    from nanovllm import LLM, SamplingParams
    llm = LLM(path, enforce_eager=enforce_eager, max_model_len=4096)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate([WARMUP_IDS], SamplingParams(max_tokens=8), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.exit()
    del llm
    free_accelerator_memory()
    return Result("nano-vllm (ours)", sum(len(o["token_ids"]) for o in outputs), seconds)


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def supported_kwargs(fn, **kwargs) -> dict:
    """The kwargs fn accepts (the continuous batching API changes between transformers releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def workload_hints(prompts: list[list[int]], max_tokens: list[int]):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    hints = {"max_prompt_length": max(map(len, prompts)), "max_generated_length": max(max_tokens),
             "num_requests": len(prompts)}
    names = {f.name for f in fields(WorkloadHints)}
    return WorkloadHints(**{k: v for k, v in hints.items() if k in names})


def cb_config():
    """Keep the attention implementation we asked for (no automatic switch to flash attention)."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    names = {f.name for f in fields(ContinuousBatchingConfig)}
    return ContinuousBatchingConfig(auto_switch_to_flash=False) if "auto_switch_to_flash" in names else None


def collect(manager, request_ids: set[str]) -> dict[str, object]:
    """Wait until every request in request_ids finished; returns their GenerationOutputs."""
    done = {}
    while len(done) < len(request_ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"HF generation thread stopped with {len(request_ids) - len(done)} requests left")
            continue
        if result.request_id in request_ids and result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"HF request {result.request_id} failed: {result.error}")
            done[result.request_id] = result
    return done


def run_hf(path: str, prompts: list[list[int]], max_tokens: list[int]) -> Result:
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # HF sizes its KV cache from the free memory: ours must be gone by now
        free, total = torch.cuda.mem_get_info()
        print(f"HF starts with {free / 2**30:.1f} of {total / 2**30:.1f} GiB GPU memory free")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=HF_ATTN).to(device)
    # Pure temperature sampling (top_k/top_p off), like ours; eos_token_id=-1: no request stops early.
    gen = GenerationConfig(do_sample=True, temperature=0.6, top_k=None, top_p=None, eos_token_id=-1,
                           pad_token_id=0, max_new_tokens=max(max_tokens))
    cm_kwargs = supported_kwargs(model.continuous_batching_context_manager, generation_config=gen, block=True,
                                 timeout=30, warmup=True, workload_hints=workload_hints(prompts, max_tokens),
                                 continuous_batching_config=cb_config())
    with model.continuous_batching_context_manager(**cm_kwargs) as manager:
        add = manager.add_request
        add(**supported_kwargs(add, input_ids=WARMUP_IDS, request_id="warmup", max_new_tokens=8, eos_token_id=-1))
        collect(manager, {"warmup"})
        start = time.perf_counter()
        for i, (ids, n) in enumerate(zip(prompts, max_tokens, strict=True)):
            add(**supported_kwargs(add, input_ids=ids, request_id=f"req{i}", max_new_tokens=n, eos_token_id=-1))
        results = collect(manager, {f"req{i}" for i in range(len(prompts))})
        seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    del model, manager
    free_accelerator_memory()
    return Result(f"HF transformers {transformers.__version__} CB ({HF_ATTN})", tokens, seconds)


def print_table(results: list[Result]) -> None:
    hf = next((r for r in results if r.engine.startswith("HF")), None)
    print("\n| engine | output tokens | seconds | tok/s | ratio to HF |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r.throughput / hf.throughput:.2f}x" if hf else "n/a"
        print(f"| {r.engine} | {r.tokens:,} | {r.seconds:.2f} | {r.throughput:,.2f} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model != DEFAULT_MODEL and not os.path.isdir(os.path.expanduser(args.model)):
        sys.exit(f"error: model directory {args.model!r} does not exist")
    path, random_weights = resolve_model(args.model)
    prompts, params = make_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    max_tokens = [sp.max_tokens for sp in params]
    print(f"workload: {len(prompts)} sequences, {sum(map(len, prompts)):,} prompt tokens, "
          f"{sum(max_tokens):,} output tokens; model {path}"
          f"{' (RANDOM WEIGHTS, Qwen3-0.6B configuration)' if random_weights else ''}")
    results = []
    if not args.skip_ours:
        results.append(run_ours(path, prompts, max_tokens, args.enforce_eager))
        print(f"ours: {results[-1].tokens}tok, {results[-1].seconds:.2f}s, {results[-1].throughput:.2f}tok/s")
    if not args.skip_hf:
        results.append(run_hf(path, prompts, max_tokens))
        print(f"HF: {results[-1].tokens}tok, {results[-1].seconds:.2f}s, {results[-1].throughput:.2f}tok/s")
    expected = sum(max_tokens)
    for r in results:
        if r.tokens != expected:
            print(f"warning: {r.engine} produced {r.tokens} tokens, the workload asks for {expected}",
                  file=sys.stderr)
    print_table(results)


if __name__ == "__main__":
    main()

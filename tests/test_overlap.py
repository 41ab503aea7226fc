"""Overlap scheduling (async_scheduling=True, the default) must not change a single token: the same requests give the
same outputs as the serial loop (async_scheduling=False), through every path that touches a step's bookkeeping:
greedy and seeded sampling, filters and min_tokens bans, logprobs, stop strings spanning tokens and stop ids (so a
finished sequence's extra token from the step in flight is discarded), max_tokens=1, mixed finish times, n > 1,
chunked prefill, prefix hits, and preemption under KV pressure; on CPU (plain torch), with tensor parallelism over
gloo, and on CUDA (graphs with the in-graph sampler, and eager)."""
import pytest
import torch
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams

PRESSURE = dict(kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=9, max_num_batched_tokens=48,
                max_num_seqs=8)


def workload(tokenizer) -> tuple[list, list[SamplingParams]]:
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in ("What does `os.path.join(a, *p)` do?", "What does `json.dumps(obj)` do?",
                      "What does `re.compile(pattern, flags=0)` do?")]
    code = ["import os\n\n\ndef read_lines(path):\n    \"\"\"", "class Stack:\n    def push(self, item):\n",
            "def fibonacci(n):\n" * 3]
    prompts = chat + code + [chat[0], code[2] + "    return", tokenizer.encode(code[1])[:9], [3, 4, 5]]
    params = [
        SamplingParams(temperature=0, max_tokens=40),                          # stops at <|im_end|> (EOS)
        SamplingParams(temperature=0.8, seed=1, max_tokens=30),
        SamplingParams(temperature=0.7, seed=2, top_k=20, top_p=0.9, min_p=0.02, max_tokens=25),
        SamplingParams(temperature=0, max_tokens=50, stop=['"""', "\n\n"]),   # stop strings spanning tokens
        SamplingParams(temperature=1.0, seed=3, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=[10]),
        SamplingParams(temperature=0, max_tokens=20, logprobs=2),               # a prefix hit on prompt 0
        SamplingParams(temperature=0.9, seed=4, max_tokens=35, n=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.6, seed=5, max_tokens=60, ignore_eos=True),
    ]
    return prompts, params


def run(model: str, async_scheduling: bool, **kwargs) -> tuple[list[dict], int]:
    with LLM(model, async_scheduling=async_scheduling, **kwargs) as llm:
        prompts, params = workload(llm.tokenizer)
        outs = llm.generate(prompts, params, use_tqdm=False)
        again = llm.generate(prompts[:4], params[:4], use_tqdm=False)  # prefix hits across calls
        return outs + again, llm.scheduler.num_preemptions


def assert_same(a: list[dict], b: list[dict]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in ("token_ids", "text", "finish_reason", "num_cached_tokens"):
            assert x[key] == y[key], (i, key, x[key], y[key])
        assert [s["token_ids"] for s in x.get("outputs", [])] == [s["token_ids"] for s in y.get("outputs", [])]
        if "logprobs" in x:
            assert [e.keys() for e in x["logprobs"]] == [e.keys() for e in y["logprobs"]]
            assert all(abs(lp - y["logprobs"][j][t]) < 1e-4 for j, e in enumerate(x["logprobs"])
                       for t, lp in e.items())


@pytest.mark.parametrize("tp", [1, 2])
def test_overlap_equals_serial_on_cpu(trained_model, tp):
    kwargs = dict(PRESSURE, dtype="float32", device="cpu", tensor_parallel_size=tp)
    serial, _ = run(trained_model, False, **kwargs)
    overlap, preemptions = run(trained_model, True, **kwargs)
    assert_same(overlap, serial)
    assert preemptions > 0, "the small pool was meant to force preemption"
    reasons = {o["finish_reason"] for o in serial}
    assert reasons == {"stop", "length"} and any(o["num_cached_tokens"] for o in serial)


def test_overlap_overlaps_on_cpu_too(trained_model):
    """The overlapped loop is the same code path on CPU: a step returns the previous step's samples."""
    with LLM(trained_model, dtype="float32", device="cpu", kvcache_block_size=16) as llm:
        llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert llm.step() == ([], 0)  # the prefill was launched; nothing read back yet
        assert llm.in_flight is not None
        finished, num_tokens = llm.step()  # reads the prefill's sample, launches the first decode
        assert finished == [] and num_tokens == 3
        while not llm.is_finished():
            finished, _ = llm.step()
        assert len(finished) == 1 and len(finished[0][1]) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_overlap_equals_serial_on_cuda(trained_model, enforce_eager):
    kwargs = dict(PRESSURE, dtype="float32", enforce_eager=enforce_eager, attention_backend="triton")
    serial, _ = run(trained_model, False, **kwargs)
    overlap, preemptions = run(trained_model, True, **kwargs)
    assert_same(overlap, serial)
    assert preemptions > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_overlap_equals_serial_with_nccl_tensor_parallelism(trained_model):
    """TP=2 over NCCL: the workers read the sampled ids broadcast on their devices; outputs equal the serial loop."""
    kwargs = dict(PRESSURE, dtype="float32", tensor_parallel_size=2, attention_backend="triton")
    serial, _ = run(trained_model, False, **kwargs)
    overlap, preemptions = run(trained_model, True, **kwargs)
    assert_same(overlap, serial)
    assert preemptions > 0


@pytest.mark.gpu
def test_cuda_graph_sampler_equals_eager_sampler(trained_model):
    """The in-graph fused sampler (greedy and seeded rows) gives what the eager path gives."""
    tok = AutoTokenizer.from_pretrained(trained_model)
    prompts, params = workload(tok)
    fast = [p for p in params if p.top_k == 0 and p.min_p == 0 and p.min_tokens == 0]
    outs = {}
    for eager in (False, True):
        with LLM(trained_model, dtype="float32", enforce_eager=eager, attention_backend="triton",
                 kvcache_block_size=16) as llm:
            outs[eager] = llm.generate(prompts[:len(fast)], fast, use_tqdm=False)
    assert_same(outs[False], outs[True])
    assert torch.cuda.is_available()

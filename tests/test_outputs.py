"""What requests return beyond plain text: n samples per prompt, logprobs, and the incremental outputs of
step_stream (the engine side of streaming), on the shipped trained model (real, peaked distributions) in float32."""
from functools import lru_cache

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm import LLM, SamplingParams

CHAT = ["What does `os.path.join(a, *p)` do?", "What does `json.dumps(obj)` do?"]


@pytest.fixture(scope="module")
def llm(trained_model):
    with LLM(trained_model, dtype="float32", device="cpu", kvcache_block_size=16, max_model_len=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts(trained_model) -> list[str]:
    tok = AutoTokenizer.from_pretrained(trained_model)
    chats = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in CHAT]
    return chats + ["import os\n\n\ndef read_lines(path):\n    \"\"\"", "class Stack:\n    def push(self, item):\n"]


@lru_cache(maxsize=None)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path: str, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """HF's next-token logits at every completion position, teacher-forced: [len(completion), vocab]."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        return hf_model(path)(ids).logits[0, len(prompt_ids) - 1:-1].float()


def test_logprobs_equal_log_softmax_of_hf_logits(llm, trained_model, prompts):
    """Greedy: each token's logprob and the top-k are HF's log_softmax; sampled at temperature T: log_softmax of
    HF's logits / T (the distribution the token was drawn from). The sampled token is always in the entry."""
    tok = AutoTokenizer.from_pretrained(trained_model)
    for temperature in (0.0, 0.7):
        sp = SamplingParams(temperature=temperature, max_tokens=12, logprobs=3, seed=5, ignore_eos=True)
        for prompt, out in zip(prompts, llm.generate(prompts, sp, use_tqdm=False), strict=True):
            ref = hf_logits(trained_model, tok.encode(prompt), out["token_ids"])
            ref = torch.log_softmax(ref / (temperature or 1.0), dim=-1)
            assert len(out["logprobs"]) == len(out["token_ids"])
            for pos, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"], strict=True)):
                top = ref[pos].topk(3)
                assert token in entry and set(top.indices.tolist()) <= set(entry)
                assert len(entry) in (3, 4)  # the top 3, and the sampled token when it is not among them
                for t, lp in entry.items():
                    assert lp == pytest.approx(ref[pos, t].item(), abs=2e-4), (temperature, pos, t)
                if temperature == 0:
                    assert token == int(top.indices[0])


def test_logprobs_zero_gives_only_the_sampled_token(llm, prompts):
    out = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=5, logprobs=0), use_tqdm=False)[0]
    assert [list(e) for e in out["logprobs"]] == [[t] for t in out["token_ids"]]
    assert all(lp <= 0 for e in out["logprobs"] for lp in e.values())
    assert "logprobs" not in llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0]


def test_n_samples_share_the_prompt_and_follow_seed_plus_index(llm, prompts):
    """n=3 with seed s: three samples under "outputs" (the top level is sample 0); sample i equals a lone request
    seeded s + i; samples after the first are served the prompt's full blocks from the prefix cache."""
    prompt = prompts[2] * 3  # a few blocks long
    sp = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=11, ignore_eos=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    samples = out["outputs"]
    assert len(samples) == 3 and out["token_ids"] == samples[0]["token_ids"]
    alone = [llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=10, seed=11 + i, ignore_eos=True),
                          use_tqdm=False)[0]["token_ids"] for i in range(3)]
    assert [s["token_ids"] for s in samples] == alone
    assert len({tuple(a) for a in alone}) > 1
    assert all(s["num_cached_tokens"] > 0 for s in samples[1:])
    assert "outputs" not in llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]


def test_step_stream_deltas_add_up_to_the_generate_output(llm, prompts):
    """Requests added with stream=True: the deltas of step_stream, concatenated, equal generate's text, token ids
    and logprobs; only the last delta of each sample is finished and carries the finish reason."""
    params = [SamplingParams(temperature=0, max_tokens=40, logprobs=1),
              SamplingParams(temperature=0, max_tokens=30, stop=["\n"]),
              SamplingParams(temperature=0.8, max_tokens=25, seed=3, n=2)]
    want = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params, strict=False)]
    ids = [llm.add_request(p, sp, stream=True) for p, sp in zip(prompts, params, strict=False)]
    got = {(i, k): dict(text="", token_ids=[], logprobs=[], finished=[]) for i in ids for k in range(2)}
    while not llm.is_finished():
        for out in llm.step_stream():
            g = got[out.request_id, out.index]
            g["text"] += out.text
            g["token_ids"] += out.token_ids
            g["logprobs"] += out.logprobs or []
            g["finished"].append(out.finished)
            if out.finished:
                g["finish_reason"] = out.finish_reason
    for rid, w in zip(ids, want, strict=True):
        samples = w.get("outputs", [w])
        for k, sample in enumerate(samples):
            g = got[rid, k]
            assert g["text"] == sample["text"] and g["token_ids"] == sample["token_ids"]
            assert g["finish_reason"] == sample["finish_reason"]
            assert g["finished"][-1] and not any(g["finished"][:-1])
            if "logprobs" in sample:  # (another batch: float sums in another order)
                assert [e.keys() for e in g["logprobs"]] == [e.keys() for e in sample["logprobs"]]
                assert all(lp == pytest.approx(sample["logprobs"][i][t], abs=1e-4)
                           for i, e in enumerate(g["logprobs"]) for t, lp in e.items())
    assert want[1]["finish_reason"] == "stop" or "\n" not in want[1]["text"]


def test_abort_request_frees_its_blocks(llm, prompts):
    bm = llm.scheduler.block_manager
    free = bm.num_free_blocks
    rid = llm.add_request(prompts[2] * 4, SamplingParams(max_tokens=100, n=2), stream=True)
    llm.step_stream()
    llm.step_stream()
    assert bm.num_free_blocks < free
    assert llm.abort_request(rid) and not llm.abort_request(rid)
    while not llm.is_finished():
        llm.step_stream()
    assert bm.num_free_blocks == free and not llm.requests

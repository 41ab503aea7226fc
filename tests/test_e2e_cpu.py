"""Qwen3 end to end on CPU: LLM.generate greedy output equals HF transformers token for token.

Every case runs tiny random float32 checkpoints (nanovllm/testing/checkpoints.py) with kvcache_block_size=16 and
compares each sequence's completion with `Qwen3ForCausalLM.generate(do_sample=False)` run on the same
prompt ids alone. Spies on the scheduler / block manager check that the intended path (chunking,
prefix hits, preemption) was really taken, so a passing comparison means the path is correct.
"""
import json
import os
import shutil
from functools import lru_cache

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.testing import make_checkpoint
from nanovllm.testing.teacher_forced import hf_greedy as hf_greedy_ids

BLOCK = 16
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Lengths from 1 token up to several blocks, mostly not multiples of the block size.
MIXED_LENGTHS = [1, 2, 15, 16, 17, 31, 33, 50, 70]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 320) -> list[list[int]]:
    """Token-id prompts avoiding the special tokens 0..2 (so eos never appears in a prompt)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@lru_cache(maxsize=None)
def hf_model(path: str) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@lru_cache(maxsize=None)
def _hf_generate(path: str, prompt: tuple, max_new_tokens: int, eos: int | None) -> tuple:
    return tuple(hf_greedy_ids(hf_model(path), prompt, max_new_tokens, eos))


def hf_greedy(path: str, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """HF greedy completion of one prompt; with eos it stops after (and includes) the eos token."""
    return list(_hf_generate(path, tuple(prompt), max_new_tokens, eos))


def assert_matches_hf(path: str, prompts: list[list[int]], outputs: list[dict], max_new_tokens: int,
                      eos: int | None = None) -> None:
    assert len(outputs) == len(prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        want = hf_greedy(path, prompt, max_new_tokens, eos)
        assert out["token_ids"] == want, f"prompt {i} (length {len(prompt)}) diverges from HF"


class Spy:
    """Wrap obj.name so every call's arguments (and a probe of them after the call) are recorded."""

    def __init__(self, obj, name: str, probe=lambda *args: args) -> None:
        self.calls = []
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.append(probe(*args))
            return result
        setattr(obj, name, wrapper)


def spy_allocations(llm: LLM) -> Spy:
    """Records (prompt length, completion tokens so far, tokens served from the cache) per admission."""
    return Spy(llm.scheduler.block_manager, "allocate",
               lambda seq, *_: (seq.num_prompt_tokens, seq.num_completion_tokens, seq.num_computed_tokens))


def spy_preemptions(llm: LLM) -> Spy:
    return Spy(llm.scheduler, "preempt", lambda seq: seq.seq_id)


def spy_prefill_chunks(llm: LLM) -> Spy:
    """Records the number of tokens scheduled per prefill step."""
    def probe(step):
        return len(step.input_ids) if step.is_prefill else 0
    return Spy(llm.model_runner, "run", probe)


def make_llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("kvcache_block_size", BLOCK)
    return LLM(path, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model):
    """One shared engine on the default tiny model (its prefix cache carries over between tests,
    which must never change outputs)."""
    engine = make_llm(tiny_model)
    yield engine
    engine.exit()


# ----------------------------------------------------------------------------------------------
# Basic batches
# ----------------------------------------------------------------------------------------------

def test_mixed_length_id_prompts_match_hf(llm, tiny_model):
    """A batch of id prompts from 1 token to several blocks (lengths off block multiples) equals HF."""
    prompts = random_prompts(MIXED_LENGTHS, seed=1)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_matches_hf(tiny_model, prompts, outputs, GREEDY.max_tokens)


def test_string_prompts_are_tokenised_and_match_hf(llm, tiny_model):
    """String prompts go through the checkpoint's tokenizer; completions equal HF on the same ids, and
    the text is the decoded completion."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["hello", "the quick brown fox jumps over the lazy dog.",
             "introduce yourself and list all prime numbers within 100: 2 3 5 7 11 13 17 19 23 29 31 37 "
             "41 43 47 53 59 61 67 71 73 79 83 89 97",
             tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                     add_generation_prompt=True)]
    outputs = llm.generate(texts, GREEDY, use_tqdm=False)
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    assert_matches_hf(tiny_model, prompts, outputs, GREEDY.max_tokens)
    for out in outputs:
        assert out["text"] == tok.decode(out["token_ids"])


def test_outputs_come_back_in_prompt_order(llm, tiny_model):
    """Outputs are returned in prompt order even when short sequences finish first."""
    prompts = random_prompts([40, 3, 25], seed=2)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 2, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [9, 2, 5]
    for prompt, out, sp in zip(prompts, outputs, params, strict=True):
        assert out["token_ids"] == hf_greedy(tiny_model, prompt, sp.max_tokens)


def test_max_tokens_one(llm, tiny_model):
    """max_tokens=1 yields exactly HF's first greedy token (the prefill's sample ends the sequence)."""
    prompts = random_prompts([1, 16, 23], seed=3)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert_matches_hf(tiny_model, prompts, outputs, 1)


# ----------------------------------------------------------------------------------------------
# Chunked prefill
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [7, 40])
def test_chunked_prefill_matches_hf(tiny_model, budget):
    """With a small max_num_batched_tokens, long prompts are prefilled over several steps (a chunk's keys
    run to its end, upstream #212) and the output still equals HF."""
    engine = make_llm(tiny_model, max_num_batched_tokens=budget, max_model_len=128)
    chunks = spy_prefill_chunks(engine)
    prompts = random_prompts(MIXED_LENGTHS, seed=4)
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    engine.exit()
    assert max(chunks.calls) <= budget
    assert sum(1 for c in chunks.calls if c) > sum(MIXED_LENGTHS) // budget  # prompts were split
    assert_matches_hf(tiny_model, prompts, outputs, GREEDY.max_tokens)


# ----------------------------------------------------------------------------------------------
# Prefix cache
# ----------------------------------------------------------------------------------------------

def test_shared_prefixes_in_one_batch_match_hf(tiny_model):
    """Prompts sharing 2-3 full blocks of prefix in one batch reuse the cached blocks and equal HF."""
    engine = make_llm(tiny_model)
    allocs = spy_allocations(engine)
    (base,) = random_prompts([45], seed=5)
    tails = random_prompts([1, 7, 20, 3], seed=6)
    prompts = [base + tails[0], base[:32] + tails[1], base + tails[2], base[:40] + tails[3], base]
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    engine.exit()
    assert_matches_hf(tiny_model, prompts, outputs, GREEDY.max_tokens)
    assert sum(cached for _, _, cached in allocs.calls) >= 4 * 32  # every later prompt hit the prefix


def test_second_generate_call_reuses_cache_and_matches_hf(tiny_model):
    """Calling generate again with the same prompts hits the prefix cache and gives the same output."""
    engine = make_llm(tiny_model)
    allocs = spy_allocations(engine)
    prompts = random_prompts([5, 20, 37, 64], seed=7)
    first = engine.generate(prompts, GREEDY, use_tqdm=False)
    allocs.calls.clear()
    second = engine.generate(prompts, GREEDY, use_tqdm=False)
    engine.exit()
    assert_matches_hf(tiny_model, prompts, first, GREEDY.max_tokens)
    assert [o["token_ids"] for o in second] == [o["token_ids"] for o in first]
    assert [cached for _, _, cached in allocs.calls] == [0, 16, 32, 48]


def test_block_multiple_prompt_submitted_twice(tiny_model):
    """A prompt that is an exact multiple of the block size, submitted twice (same batch and a later
    call), never matches its last block, so at least one token is computed (upstream #114)."""
    engine = make_llm(tiny_model)
    allocs = spy_allocations(engine)
    prompts = random_prompts([32, 16], seed=8)
    once = engine.generate(prompts + prompts, GREEDY, use_tqdm=False)
    again = engine.generate(prompts, GREEDY, use_tqdm=False)
    engine.exit()
    assert_matches_hf(tiny_model, prompts + prompts, once, GREEDY.max_tokens)
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in once[:2]]
    assert all(cached < length for length, _, cached in allocs.calls)
    assert [cached for _, _, cached in allocs.calls[-2:]] == [16, 0]


def test_reused_blocks_do_not_serve_stale_prefix(tiny_model):
    """Upstream #163: after other prompts fill the whole pool (so the blocks that held an old prefix are
    handed out and overwritten), resubmitting the old prefix must not hit stale blocks."""
    engine = make_llm(tiny_model, num_kvcache_blocks=8, max_model_len=128)
    allocs = spy_allocations(engine)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (old,) = random_prompts([40], seed=9)
    fillers = random_prompts([60, 60], seed=10)  # 2 x 5 blocks > the pool: every block gets reused
    first = engine.generate([old], sp, use_tqdm=False)
    engine.generate(fillers, sp, use_tqdm=False)
    allocs.calls.clear()
    again = engine.generate([old, old[:33] + [5, 6]], sp, use_tqdm=False)
    engine.exit()
    assert_matches_hf(tiny_model, [old], first, sp.max_tokens)
    assert_matches_hf(tiny_model, [old, old[:33] + [5, 6]], again, sp.max_tokens)
    assert allocs.calls == [(40, 0, 0), (35, 0, 32)]  # no stale hit; the sibling shares the fresh blocks


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------

def test_preemption_recomputes_and_matches_hf(tiny_model):
    """With few KV blocks, decode runs out of blocks, sequences are preempted and recomputed later; the
    output is still identical to HF."""
    engine = make_llm(tiny_model, num_kvcache_blocks=8, max_model_len=128)
    preempted = spy_preemptions(engine)
    prompts = random_prompts([14, 20, 9, 30, 15, 5], seed=11)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = engine.generate(prompts, sp, use_tqdm=False)
    engine.exit()
    assert preempted.calls, "the pool was meant to force preemption"
    assert_matches_hf(tiny_model, prompts, outputs, sp.max_tokens)


def test_preemption_with_prefix_hit_matches_hf(tiny_model):
    """Upstream #211: a preempted sequence re-admitted with a prefix-cache hit (its own or a sibling's
    cached blocks, prompt plus generated tokens) resumes correctly."""
    engine = make_llm(tiny_model, num_kvcache_blocks=9, max_model_len=128)
    preempted = spy_preemptions(engine)
    allocs = spy_allocations(engine)
    (base,) = random_prompts([32], seed=12)
    tails = random_prompts([3, 5, 7, 9], seed=13)
    prompts = [base + t for t in tails]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = engine.generate(prompts, sp, use_tqdm=False)
    engine.exit()
    assert preempted.calls, "the pool was meant to force preemption"
    assert any(done > 0 and cached > 0 for _, done, cached in allocs.calls), \
        "a preempted sequence was meant to be re-admitted with a prefix hit"
    assert_matches_hf(tiny_model, prompts, outputs, sp.max_tokens)


def test_preemption_with_chunked_prefill_matches_hf(tiny_model):
    """Preemption and chunked prefill together: recomputation of a preempted sequence is chunked too."""
    engine = make_llm(tiny_model, num_kvcache_blocks=8, max_num_batched_tokens=24, max_model_len=128)
    preempted = spy_preemptions(engine)
    prompts = random_prompts([30, 18, 25, 11], seed=14)
    sp = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    outputs = engine.generate(prompts, sp, use_tqdm=False)
    engine.exit()
    assert preempted.calls
    assert_matches_hf(tiny_model, prompts, outputs, sp.max_tokens)


# ----------------------------------------------------------------------------------------------
# Model variants
# ----------------------------------------------------------------------------------------------

VARIANTS = {
    "tied_embeddings": dict(tie=True),
    "attention_bias": dict(attention_bias=True),
    "gqa_ratio_1": dict(num_heads=4, num_kv_heads=4),
    "gqa_ratio_4": dict(num_heads=8, num_kv_heads=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_variants_match_hf(tiny_model_factory, variant):
    """Tied embeddings, attention_bias=True (q/k norms kept, as in HF), and GQA ratios 1 and 4 all give
    HF's greedy tokens, with chunked prefill and a prefix hit in the batch."""
    path = tiny_model_factory(**VARIANTS[variant])
    engine = make_llm(path, max_num_batched_tokens=20, max_model_len=128)
    (base,) = random_prompts([33], seed=15)
    prompts = random_prompts([1, 17, 40], seed=16) + [base, base + [7, 8, 9]]
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    engine.exit()
    assert_matches_hf(path, prompts, outputs, GREEDY.max_tokens)


# ----------------------------------------------------------------------------------------------
# EOS, no tokenizer, sampling reproducibility, smoke
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """A tokenizer-less checkpoint whose config eos is a token that greedy decoding of EOS_PROMPT emits
    at its 4th step (found by running HF once), so eos is read from the model config."""
    src = tmp_path_factory.mktemp("eos_src")
    make_checkpoint(str(src), tokenizer=False, seed=3)
    (prompt,) = random_prompts([21], seed=17)
    completion = hf_greedy(str(src), prompt, 12)
    eos = completion[3]
    dst = tmp_path_factory.mktemp("eos")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst)
    for name in ("config.json", "generation_config.json"):  # every place a checkpoint names its eos ids
        with open(os.path.join(dst, name)) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = eos
        with open(os.path.join(dst, name), "w") as f:
            json.dump(cfg, f)
    return str(dst), prompt, eos


def test_eos_stops_generation_like_hf(eos_model):
    """Without ignore_eos a sequence stops right after emitting eos (included in token_ids), exactly
    where HF generate with eos_token_id stops; ignore_eos=True in the same batch runs to max_tokens."""
    path, prompt, eos = eos_model
    engine = make_llm(path)
    assert engine.tokenizer is None and engine.outputs.eos_token_ids == {eos}
    others = random_prompts([5, 30], seed=18)
    prompts = [prompt] + others + [prompt]
    params = [SamplingParams(temperature=0, max_tokens=12)] * 3 + [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    outputs = engine.generate(prompts, params, use_tqdm=False)
    engine.exit()
    stopped = outputs[0]["token_ids"]
    assert stopped[-1] == eos and eos not in stopped[:-1] and len(stopped) < 12
    assert_matches_hf(path, prompts[:3], outputs[:3], 12, eos=eos)
    assert outputs[3]["token_ids"] == hf_greedy(path, prompt, 12)
    assert all(o["text"] == "" for o in outputs)


def test_no_tokenizer_needs_id_prompts(tiny_model_factory):
    """A checkpoint without a tokenizer generates from token ids (eos from the model config) and rejects
    string prompts with a clear error."""
    path = tiny_model_factory(tokenizer=False)
    engine = make_llm(path)
    assert engine.tokenizer is None and engine.outputs.eos_token_ids == {1}
    prompts = random_prompts([4, 19], seed=19)
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="token-id lists"):
        engine.generate(["hello"], GREEDY, use_tqdm=False)
    engine.exit()
    assert_matches_hf(path, prompts, outputs, GREEDY.max_tokens)
    assert [o["text"] for o in outputs] == ["", ""]


def test_sampling_is_reproducible_under_fixed_seed(llm):
    """temperature > 0 through the whole engine: the same torch seed gives the same tokens; greedy rows
    in the same batch are unaffected by the seed."""
    prompts = random_prompts([3, 18, 40], seed=20)
    params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True)]
    runs = []
    for seed in (1234, 1234, 99):
        torch.manual_seed(seed)
        runs.append([o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
    assert runs[2][1] == runs[0][1]
    assert runs[2] != runs[0]


def test_smoke_hello_default_config(tiny_model):
    """`LLM(path).generate(["hello"], SamplingParams(temperature=0))` runs on CPU with the default config
    and returns [{"text", "token_ids"}]."""
    engine = LLM(tiny_model)
    outputs = engine.generate(["hello"], SamplingParams(temperature=0), use_tqdm=False)
    engine.exit()
    assert engine.config.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(outputs, list) and len(outputs) == 1
    out = outputs[0]
    assert {"text", "token_ids"} <= set(out)
    assert isinstance(out["text"], str) and 1 <= len(out["token_ids"]) <= 64
    assert all(isinstance(t, int) for t in out["token_ids"])

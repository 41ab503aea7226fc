"""Sampling and outputs (issue 7): greedy / top-k / top-p / min-p / seeds, stops, min_tokens, finish reasons,
vLLM-style prompt dicts and validation.

Filter checks compare against a plain float64 reference (vLLM's order: temperature, min_p, top_k, top_p, the
token crossing top_p kept) exactly, and statistically over many rows (one draw per row) of a 10-token
vocabulary under fixed seeds, so they cannot flake; the bound is 6 sigma per token plus 2e-3. Engine tests use
the tiny float32 checkpoint on CPU and HF transformers as the greedy reference."""
import math
import random
from functools import lru_cache

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_builder import build_sampling
from nanovllm.layers.sampler import Sampler, apply_top_k_top_p, filtered_probs
from nanovllm.layers.sampling_rng import seed_to_int64, seeded_uniform
from nanovllm.testing.teacher_forced import hf_greedy as hf_greedy_ids
from nanovllm.worker.model_runner import sampling_tensors

EOS = 2  # the tiny tokenizer's <|im_end|>
VOCAB = 10
CONFIGS = [  # one per filter, combinations, and everything off
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.8, min_p=0.1),
    dict(temperature=1.3, top_k=6, top_p=0.8),
    dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0),
]


# -- helpers ------------------------------------------------------------------------------------------------
def reference_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, **_) -> torch.Tensor:
    """Straightforward float64 reference: temperature, min_p, top_k, top_p (crossing token kept)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    if min_p > 0:
        p = torch.where(p < min_p * p.max(), 0.0, p)
        p = p / p.sum()
    order = torch.argsort(p, descending=True).tolist()
    if top_k > 0:
        p[order[top_k:]] = 0.0
        p = p / p.sum()
    if top_p < 1:
        total, keep = 0.0, []
        for i in order:
            if total < top_p:
                keep.append(i)
            total += float(p[i])
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[keep] = True
        p = torch.where(mask, p, 0.0)
        p = p / p.sum()
    return p


def make_seqs(params: list[SamplingParams], prompt_len: int = 4) -> list[Sequence]:
    """Sequences as the engine queues them (a seeded request keys the RNG with its seed; others with a drawn one)."""
    return [Sequence(list(range(3, 3 + prompt_len)), sp, block_size=16,
                     sampling_seed=seed_to_int64(sp.seed) if sp.seed is not None else int(torch.randint(2**62, ())))
            for sp in params]


def sampling_for(seqs: list[Sequence], device: str = "cpu"):
    """The sampling tensors of a step in which every sequence samples its next token."""
    for seq in seqs:
        seq.num_computed_tokens, seq.num_scheduled_tokens = 0, len(seq)
    return sampling_tensors(build_sampling(seqs, OutputProcessor(None, frozenset([EOS])).banned_tokens),
                            torch.device(device))


def sample(logits: torch.Tensor, params: list[SamplingParams], device: str = "cpu", prompt_len: int = 4,
           seqs: list[Sequence] | None = None) -> torch.Tensor:
    """Sample one token per row through the engine's step builder and the Sampler."""
    seqs = seqs or make_seqs(params, prompt_len)
    return Sampler()(logits.to(device), sampling_for(seqs, device)).cpu()


def assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Kept set exact (no draw outside it, every token with p >= 1% drawn); frequencies within 6 sigma."""
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / n
    assert (freq[probs == 0] == 0).all(), f"{what}: drew a filtered token"
    assert (freq[probs >= 0.01] > 0).all(), f"{what}: a kept token was never drawn"
    bound = 6 * (probs * (1 - probs) / n).sqrt() + 2e-3
    assert ((freq - probs).abs() <= bound).all(), f"{what}: {freq.tolist()} vs {probs.tolist()}"


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# -- SamplingParams -----------------------------------------------------------------------------------------
def test_defaults_keep_upstream_behaviour():
    sp = SamplingParams()
    assert (sp.temperature, sp.max_tokens, sp.ignore_eos) == (1.0, 64, False)
    assert (sp.top_k, sp.top_p, sp.min_p, sp.seed, sp.min_tokens) == (0, 1.0, 0.0, None, 0)
    assert sp.stop == [] and sp.stop_token_ids == []
    assert SamplingParams(stop="ab").stop == ["ab"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.01), "min_p"), (dict(seed=1.5), "seed"), (dict(seed="1"), "seed"),
    (dict(min_tokens=-1), "min_tokens"), (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(stop=""), "stop"), (dict(stop=["a", ""]), "stop"), (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(temperature=-1), "temperature"), (dict(max_tokens=0), "max_tokens"),
])
def test_validation_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**kwargs)
    assert repr(kwargs[field]) in str(err.value)


# -- sampler: filters ---------------------------------------------------------------------------------------
def test_filters_equal_reference_exactly():
    """filtered_probs on one row per config equals the reference (kept set and renormalised probs)."""
    logits = random_logits(len(CONFIGS), VOCAB, seed=1)
    tensors = sampling_for(make_seqs([SamplingParams(**c) for c in CONFIGS]))
    probs = filtered_probs(logits, tensors).double()
    for row, config in enumerate(CONFIGS):
        want = reference_probs(logits[row], **config)
        assert torch.equal(probs[row] == 0, want == 0), config
        torch.testing.assert_close(probs[row], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_p, kept", [(0.45, [0]), (0.6, [0, 1]), (0.8, [0, 1]), (0.85, [0, 1, 2]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_crossing_token(top_p, kept):
    """probs 0.5, 0.3, 0.15, 0.05: top_p=0.6 keeps {0, 1} (token 1 crosses 0.6), as vLLM and HF do."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([top_p]))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept


@pytest.mark.parametrize("seeded", [False, True])
def test_filters_statistically_in_one_mixed_batch(seeded):
    """Rows of all configs interleaved in one batch: each config's draws follow its reference distribution.
    Unseeded rows use the global torch RNG; seeded rows (one seed per row) the counter hash."""
    per_config, logits_row = 8000, random_logits(1, VOCAB, seed=2)[0]
    configs = CONFIGS * per_config
    params = [SamplingParams(**c, seed=1000 + i if seeded else None) for i, c in enumerate(configs)]
    torch.manual_seed(0)
    tokens = sample(logits_row.expand(len(configs), -1).clone(), params)
    for j, config in enumerate(CONFIGS):
        assert_frequencies_match(tokens[j::len(CONFIGS)], reference_probs(logits_row, **config), str(config))


def test_greedy_rows_and_top_k_1_are_argmax():
    logits = random_logits(64, 50, seed=3)
    params = [SamplingParams(temperature=0) if i % 3 == 0 else SamplingParams(temperature=1.5, top_k=1)
              if i % 3 == 1 else SamplingParams(temperature=0.9) for i in range(64)]
    tokens = sample(logits, params)
    argmax = logits.argmax(-1)
    assert torch.equal(tokens[0::3], argmax[0::3]) and torch.equal(tokens[1::3], argmax[1::3])
    assert sample(logits, [SamplingParams(temperature=0)] * 64).equal(argmax)  # the all-greedy fast path


def test_min_tokens_bans_eos_and_stop_ids_in_logits():
    """Before min_tokens, EOS and stop_token_ids are never sampled (greedy or not), even when dominant."""
    logits = random_logits(200, 20, seed=4)
    logits[:, EOS] = logits[:, 7] = 30.0
    kw = dict(stop_token_ids=[7], min_tokens=2)
    params = [SamplingParams(temperature=0, **kw), SamplingParams(temperature=1.0, **kw)] * 100
    tokens = sample(logits, params)
    assert not ((tokens == EOS) | (tokens == 7)).any()
    # once min_tokens are generated, or with ignore_eos for EOS, the ban lifts
    seqs = make_seqs(params)
    for seq in seqs:
        for t in (5, 6):
            seq.resolve(seq.add_pending(), t)
    assert set(sample(logits, params, seqs=seqs).tolist()) <= {EOS, 7}
    tokens = sample(logits, [SamplingParams(temperature=0, ignore_eos=True, min_tokens=3)] * 200)
    assert (tokens == EOS).all()  # ignore_eos: EOS is not a stop, so it is not banned either


# -- sampler: seeds -----------------------------------------------------------------------------------------
def test_seed_is_independent_of_batch_composition():
    """A seeded row draws the same token alone and inside a batch of greedy, unseeded, other-seed and
    filtered rows, at any index; another seed draws differently."""
    logits = random_logits(40, 50, seed=5, scale=1.0)
    mine = [SamplingParams(temperature=1.0, seed=42, top_p=0.95)]
    alone = torch.cat([sample(logits[i:i + 1], mine) for i in range(40)])
    others = [SamplingParams(temperature=0), SamplingParams(temperature=0.7),
              SamplingParams(seed=7, top_k=3), SamplingParams(min_p=0.2)]
    for index in (0, 2, 4):
        params = others[:index] + mine + others[index:]
        batch = torch.stack([sample(logits[i:i + 1].expand(5, -1).clone(), params)[index] for i in range(40)])
        assert torch.equal(batch, alone)
    other_seed = torch.cat([sample(logits[i:i + 1], [SamplingParams(temperature=1.0, seed=43, top_p=0.95)])
                            for i in range(40)])
    assert not torch.equal(other_seed, alone)


def test_seed_depends_on_position_and_accepts_any_int():
    logits = torch.zeros(1, 1000)
    draws = {int(sample(logits, [SamplingParams(seed=9)], prompt_len=n)) for n in range(1, 21)}
    assert len(draws) > 15  # a fresh draw at each position
    big = [SamplingParams(seed=s) for s in (-1, 2**64 - 1, 2**70 + 5, 5)]
    tokens = sample(logits.expand(4, -1).clone(), big).tolist()
    assert tokens[0] == tokens[1] and tokens[2] == tokens[3]  # taken modulo 2**64
    assert seed_to_int64(2**63) == -2**63 and seed_to_int64(-1) == -1


def test_seeded_uniforms_are_uniform_and_uncorrelated():
    u = seeded_uniform(torch.arange(400), torch.zeros(400, dtype=torch.int64), 2000)
    assert abs(u.mean().item() - 0.5) < 0.002 and 0 < u.min() and u.max() < 1
    corr = torch.corrcoef(u)
    assert (corr - torch.eye(400)).abs().max() < 6 / math.sqrt(2000)  # rows (seeds) independent


# -- stop strings: incremental detokenisation -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def feed(tokenizer, text: str, sp: SamplingParams) -> tuple[str, int]:
    """Feed text's tokens one by one through the output processor; returns the output text and the number of tokens
    consumed when a stop string ended it (-1 if none did)."""
    seq = Sequence(tokenizer.encode("hi"), sp, block_size=16)
    outputs = OutputProcessor(tokenizer, frozenset())
    outputs.add(seq)
    for n, t in enumerate(tokenizer.encode(text), 1):
        seq.resolve(seq.add_pending(), t)
        if outputs.add_token(seq, None) == "stop":
            seq.finish_reason = "stop"
            return outputs.make_output(seq)["text"], n
    return "", -1


def test_stop_string_spanning_multibyte_tokens(tokenizer):
    """'本語' spans several byte-level tokens (each character is 3 bytes, split over tokens): found at the
    token that completes it; the text stops before it."""
    text = "naïve 日本語 stop here"
    ids = tokenizer.encode(text)
    out, n = feed(tokenizer, text, SamplingParams(stop=["zzz", "本語"]))
    end = next(i for i in range(1, len(ids) + 1) if "本語" in tokenizer.decode(ids[:i]))
    assert n == end and out == "naïve 日"


def test_stop_string_respects_min_tokens(tokenizer):
    text = "ab cab dab"
    ids = tokenizer.encode(text)
    _, first = feed(tokenizer, text, SamplingParams(stop="ab"))
    out, n = feed(tokenizer, text, SamplingParams(stop="ab", min_tokens=first + 1, max_tokens=64))
    assert n > first and out == tokenizer.decode(ids[:n])[:text.index("ab", 3)]


# -- engine -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, kvcache_block_size=16, max_model_len=256, device="cpu") as engine:
        yield engine


@lru_cache(maxsize=None)
def hf_model(path: str) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt: list[int], n: int, eos: list[int] | None = None, min_new: int = 0) -> list[int]:
    return hf_greedy_ids(hf_model(path), prompt, n, eos, min_new or None)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def generate(llm, ps, sp) -> list[dict]:
    return llm.generate(ps, sp, use_tqdm=False)


def test_greedy_and_top_k_1_equal_hf_greedy(llm, tiny_model):
    ps = prompts(4)
    greedy = generate(llm, ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o["token_ids"] for o in greedy] == [hf_greedy(tiny_model, p, 12) for p in ps]
    top1 = generate(llm, ps, SamplingParams(temperature=1.3, top_k=1, top_p=0.9, max_tokens=12, ignore_eos=True))
    assert [o["token_ids"] for o in top1] == [o["token_ids"] for o in greedy]
    assert all(o["finish_reason"] == "length" for o in greedy + top1)


def test_stop_token_ids_and_min_tokens_equal_hf(llm, tiny_model):
    """stop_token_ids end the completion (the id is kept, reason "stop"); with min_tokens they are banned
    until then: equal to HF greedy with eos_token_id=[id] and min_new_tokens."""
    p = prompts(1, seed=1)[0]
    base = hf_greedy(tiny_model, p, 24)
    stop_id = base[5]
    first = base.index(stop_id)
    for min_tokens in (0, first + 1, first + 3):
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id],
                            min_tokens=min_tokens)
        out = generate(llm, [p], sp)[0]
        want = hf_greedy(tiny_model, p, 24, eos=[stop_id], min_new=min_tokens)
        assert out["token_ids"] == want
        assert stop_id not in out["token_ids"][:min_tokens]
        assert out["finish_reason"] == ("stop" if want[-1] == stop_id and len(want) > min_tokens else "length")
    assert generate(llm, [p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                             stop_token_ids=[stop_id]))[0]["token_ids"] == base[:first + 1]


def test_eos_finishes_with_stop_unless_ignored(llm, tiny_model, monkeypatch):
    """EOS (here a token greedy produces, set as the engine's eos) ends with "stop" and is kept; ignore_eos
    runs to "length"; min_tokens bans it until reached (HF min_new_tokens)."""
    p = prompts(1, seed=2)[0]
    base = hf_greedy(tiny_model, p, 20)
    eos = base[3]
    monkeypatch.setattr(llm.outputs, "eos_token_ids", frozenset([eos]))
    out = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out["token_ids"] == base[:base.index(eos) + 1] and out["finish_reason"] == "stop"
    out = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out["token_ids"] == base and out["finish_reason"] == "length"
    out = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20, min_tokens=base.index(eos) + 2))[0]
    assert out["token_ids"] == hf_greedy(tiny_model, p, 20, eos=[eos], min_new=base.index(eos) + 2)


def clean_boundary(tokenizer, ids: list[int]) -> tuple[int, str] | None:
    """A token index i and a 2-4 character string across the boundary between tokens i and i + 1, both
    printable ASCII, that first occurs in the text there."""
    for i in range(len(ids) - 1):
        left, right = tokenizer.decode(ids[:i + 1]), tokenizer.decode(ids[:i + 2])
        a, b = tokenizer.decode(ids[i:i + 1]), tokenizer.decode(ids[i + 1:i + 2])
        if not (a.isascii() and b.isascii() and a.strip() and b.strip() and right == left + b):
            continue
        stop = a[-2:] + b[:2]
        if right.find(stop) == len(left) - len(a[-2:]):
            return i, stop
    return None


def test_stop_string_spanning_tokens_in_generate(llm, tokenizer):
    """The text stops before the stop string; token_ids run through the token that completed it; blocks
    are freed like any other finish."""
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ps = prompts(6, seed=3)
    bases = [o["token_ids"] for o in generate(llm, ps, sp)]
    p, base, found = next(((p, b, clean_boundary(tokenizer, b)) for p, b in zip(ps, bases, strict=True)
                           if clean_boundary(tokenizer, b)), (None, None, None))
    assert found, "no clean token boundary in the greedy completions"
    i, stop = found
    free = llm.scheduler.block_manager.num_free_blocks
    out = generate(llm, [p, p], [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                stop=["\x00never", stop]), sp])
    full = tokenizer.decode(base)
    assert out[0]["token_ids"] == base[:i + 2] and out[0]["finish_reason"] == "stop"
    assert out[0]["text"] == full[:full.index(stop)] and stop not in out[0]["text"]
    assert out[1]["token_ids"] == base and out[1]["text"] == full and out[1]["finish_reason"] == "length"
    assert llm.scheduler.block_manager.num_free_blocks == free and llm.is_finished()


def test_seed_reproduces_alone_and_in_another_batch(llm):
    p = prompts(1, seed=4)[0]
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    torch.manual_seed(1)
    alone = generate(llm, [p], mine)[0]["token_ids"]
    torch.manual_seed(2)
    others = prompts(3, seed=5)
    outs = generate(llm, [others[0], others[1], p, others[2]],
                    [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0.8, max_tokens=12),
                     mine, SamplingParams(seed=1, top_k=4, max_tokens=9)])
    assert outs[2]["token_ids"] == alone
    other = SamplingParams(temperature=1.0, top_p=0.95, seed=1235, max_tokens=10, ignore_eos=True)
    assert generate(llm, [p], other)[0]["token_ids"] != alone


def test_prompt_dicts_mixed_with_plain(llm, tokenizer):
    ids = prompts(2, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = generate(llm, ["hello world", ids[0], ids[1]], sp)
    mixed = generate(llm, [{"prompt": "hello world"}, {"prompt_token_ids": ids[0]}, ids[1]], sp)
    assert [o["token_ids"] for o in mixed] == [o["token_ids"] for o in plain]
    assert all(set(o) == {"text", "token_ids", "finish_reason", "num_cached_tokens"} for o in mixed)
    assert mixed[0]["text"] == tokenizer.decode(mixed[0]["token_ids"])


def test_num_cached_tokens_counts_prefix_hits(llm):
    p = prompts(1, seed=7)[0] * 3 + [5] * 10  # > 2 blocks of 16
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first, second = generate(llm, [p], sp)[0], generate(llm, [p], sp)[0]
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == (len(p) // 16) * 16 and second["token_ids"] == first["token_ids"]


@pytest.mark.parametrize("bad, match", [
    (["a", 1.5], r"prompt 1 has type float"),
    ([None], r"prompt 0 has type NoneType"),
    (["a", {"text": "x"}], r"prompt 1 is a dict with keys \['text'\]"),
    ([{"prompt": [1, 2]}], r"prompt 0 is a dict"),
    ([[5, 6], []], r"prompt 1 is empty"),
    ([[5, 100000]], r"prompt 0 token ids must be integers in \[0, 320\)"),
    ([[5, "a"]], r"prompt 0 token ids"),
])
def test_bad_prompts_raise_and_queue_nothing(llm, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(llm, bad, SamplingParams(max_tokens=2))
    assert llm.is_finished()


def test_bad_sampling_params_for_engine(llm):
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        generate(llm, [[5], [6]], [SamplingParams()])
    with pytest.raises(ValueError, match=r"sampling_params\[0\].stop_token_ids must be < vocab_size=320"):
        generate(llm, [[5]], SamplingParams(stop_token_ids=[320]))
    assert llm.is_finished()


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_sampler_on_cuda_filters_and_seeds():
    """On CUDA: the hash RNG equals CPU bit for bit; filters match the reference statistically; seeded rows
    are independent of the batch."""
    seeds, positions = torch.tensor([0, -1, 2**40, 77]), torch.tensor([0, 5, 9, 100])
    assert torch.equal(seeded_uniform(seeds, positions, 5000),
                       seeded_uniform(seeds.cuda(), positions.cuda(), 5000).cpu())
    per_config, logits_row = 8000, random_logits(1, VOCAB, seed=2)[0]
    configs = CONFIGS * per_config
    for seeded in (False, True):
        params = [SamplingParams(**c, seed=1000 + i if seeded else None) for i, c in enumerate(configs)]
        torch.manual_seed(0)
        tokens = sample(logits_row.expand(len(configs), -1).clone(), params, device="cuda")
        for j, config in enumerate(CONFIGS):
            assert_frequencies_match(tokens[j::len(CONFIGS)], reference_probs(logits_row, **config), str(config))
    logits = random_logits(8, 50, seed=5, scale=1.0)
    mine = SamplingParams(seed=42, top_p=0.9, min_p=0.01)
    alone = torch.cat([sample(logits[i:i + 1], [mine], device="cuda") for i in range(8)])
    batch = sample(logits, [mine] * 8, device="cuda")
    assert torch.equal(alone, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_end_to_end_greedy_and_seeded(tiny_model, enforce_eager):
    """Float32 tiny checkpoint on CUDA (graphs or eager): greedy and top_k=1 equal HF greedy; a seed reproduces
    alone and in a batch; stop ids / strings finish with "stop"."""
    hf = Qwen3ForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()
    ps = prompts(5, seed=8)
    want = [hf_greedy_ids(hf, p, 12) for p in ps]
    with LLM(tiny_model, kvcache_block_size=16, max_model_len=256, device="cuda", attention_backend="triton",
             enforce_eager=enforce_eager) as engine:
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert [o["token_ids"] for o in generate(engine, ps, greedy)] == want
        top1 = SamplingParams(temperature=0.9, top_k=1, max_tokens=12, ignore_eos=True)
        assert [o["token_ids"] for o in generate(engine, ps, top1)] == want
        mine = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
        alone = generate(engine, [ps[0]], mine)[0]["token_ids"]
        mixed = generate(engine, ps, [SamplingParams(max_tokens=10), mine, greedy, mine, SamplingParams(seed=3)])
        for i in (1, 3):
            assert mixed[i]["token_ids"] == generate(engine, [ps[i]], mine)[0]["token_ids"]
        assert generate(engine, [ps[0], ps[2]], mine)[0]["token_ids"] == alone
        out = generate(engine, [ps[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                       stop_token_ids=[want[0][4]]))[0]
        assert out["finish_reason"] == "stop" and out["token_ids"] == want[0][:want[0].index(want[0][4]) + 1]

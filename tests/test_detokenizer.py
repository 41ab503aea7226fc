"""Streaming detokenisation: the byte-level fast path (a token-id -> bytes table and an incremental UTF-8 decoder)
gives exactly the text the tokenizer's own decode gives, token by token, for the tokenizers we ship and build; other
tokenizers keep the decode-window path."""
import random

import pytest
from transformers import AutoTokenizer

from nanovllm.engine.detokenizer import IncrementalDetokenizer, byte_level_table
from nanovllm.testing import build_tokenizer
from nanovllm.testing.random_checkpoint import build_tokenizer as build_byte_tokenizer

TEXT = "naïve 日本語 café — emoji 🎉 done\n\tdef f(x):\n    return x  # ok <|im_end|>"


@pytest.fixture(scope="module", params=["trained", "tiny", "byte"])
def tokenizer(request, trained_model):
    if request.param == "trained":
        return AutoTokenizer.from_pretrained(trained_model)
    return build_tokenizer(320) if request.param == "tiny" else build_byte_tokenizer()


def streamed(tokenizer, ids: list[int], skip: bool, table) -> str:
    detok = IncrementalDetokenizer(tokenizer, [], skip, table)
    text = "".join(detok.update(ids[:i], search_stop=False) for i in range(1, len(ids) + 1))
    return text + detok.utf8.decode(b"", final=True) if table is not None else text


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_equals_the_tokenizers_decode(tokenizer, skip):
    table = byte_level_table(tokenizer, skip)
    assert table is not None  # all three are byte-level BPE
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    sequences = [tokenizer.encode(TEXT)]
    for _ in range(30):  # random ids: split characters, invalid UTF-8, specials, ids past the vocabulary
        seq = [rng.randrange(len(tokenizer) + 5) for _ in range(rng.randint(1, 40))]
        seq[rng.randrange(len(seq))] = rng.choice(specials)
        sequences.append(seq)
    for ids in sequences:
        assert streamed(tokenizer, ids, skip, table) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_fast_path_never_calls_decode(trained_model, monkeypatch):
    """With a table, streaming reads bytes from it and never calls the tokenizer's decode (the per-token cost the
    fast path removes; BENCHMARKS.md has the serving numbers); without one, decode does the work."""
    tok = AutoTokenizer.from_pretrained(trained_model)
    ids = tok.encode(TEXT * 3)
    calls = []
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    slow, fast = (IncrementalDetokenizer(tok, [], True, t) for t in (None, byte_level_table(tok, True)))
    for i in range(1, len(ids) + 1):
        fast.update(ids[:i], search_stop=False)
    assert calls == []
    for i in range(1, len(ids) + 1):
        slow.update(ids[:i], search_stop=False)
    assert len(calls) >= len(ids)
    assert fast.text + fast.utf8.decode(b"", final=True) == slow.text == real_decode(ids, skip_special_tokens=True)

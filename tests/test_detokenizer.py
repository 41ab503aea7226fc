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


def test_fast_path_is_used_and_cheap(trained_model):
    tok = AutoTokenizer.from_pretrained(trained_model)
    ids = tok.encode(TEXT * 20)
    import time
    slow, fast = (IncrementalDetokenizer(tok, [], True, t) for t in (None, byte_level_table(tok, True)))
    timings = []
    for detok in (slow, fast):
        start = time.perf_counter()
        for i in range(1, len(ids) + 1):
            detok.update(ids[:i], search_stop=False)
        timings.append(time.perf_counter() - start)
    assert fast.text == slow.text + fast.utf8.decode(b"", final=True) or fast.text == slow.text
    assert timings[1] < timings[0] / 3, timings  # measured here: ~20x cheaper per token

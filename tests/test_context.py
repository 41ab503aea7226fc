"""The per-step attention metadata: scoped to one forward, cleared even on errors, and private to each thread (two
engines driven from two threads never see each other's step)."""
import threading

import pytest
import torch

from nanovllm.utils.context import Context, forward_context, get_context


def test_forward_context_sets_then_clears():
    slots = torch.tensor([3, 4], dtype=torch.int32)
    with forward_context(Context(is_prefill=True, slot_mapping=slots, max_seqlen_q=2)) as ctx:
        assert get_context() is ctx
        assert ctx.is_prefill and ctx.max_seqlen_q == 2 and ctx.slot_mapping is slots
    assert get_context() == Context()


def test_forward_context_clears_even_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with forward_context(Context(is_prefill=True, context_lens=torch.tensor([1], dtype=torch.int32))):
            raise RuntimeError("boom")
    ctx = get_context()
    assert not ctx.is_prefill and ctx.context_lens is None and ctx.slot_mapping is None


def test_each_thread_sees_its_own_step():
    """Bug 4 of issue 13: the metadata was one module-level global, so two engines stepping in two threads read
    each other's slot mappings. Now a thread sees only the context it set."""
    barrier = threading.Barrier(2)
    seen, errors = {}, []

    def step(name: str, max_seqlen_q: int) -> None:
        try:
            with forward_context(Context(is_prefill=True, max_seqlen_q=max_seqlen_q)):
                barrier.wait(timeout=10)  # both threads are inside their forward now
                seen[name] = get_context().max_seqlen_q
                barrier.wait(timeout=10)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=step, args=(n, q)) for n, q in (("a", 3), ("b", 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and seen == {"a": 3, "b": 7}
    assert get_context() == Context()

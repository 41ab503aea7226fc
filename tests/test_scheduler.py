"""Scheduler: prefill-first batching, limits, chunked prefill, preemption, prefix sharing (GeeeekExplorer/nano-vllm
#211, #212, #219), finishing; plus hypothesis property tests over random workloads checking pool invariants every
step, in the serial loop and in the overlapped one (step N+1 launched before step N's samples are known)."""
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.sequence import PENDING, Sequence, SequenceStatus
from nanovllm.engine.step_builder import build_step_input
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.block_manager import compute_block_hash
from nanovllm.scheduler.scheduler import Scheduler

EOS = 7


class SerialLoop:
    """The engine's serial step loop without a model: schedule() -> (seqs, is_prefill); postprocess(seqs, tokens)
    marks the batch launched, resolves each sampled token (None for rows that do not sample), and finishes
    sequences through the output processor, as LLMEngine does. Other attributes are the scheduler's."""

    def __init__(self, scheduler: Scheduler, eos: int = EOS) -> None:
        self.scheduler = scheduler
        self.outputs = OutputProcessor(None, frozenset([eos]))
        self.batch = None

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def add(self, seq: Sequence) -> None:
        self.outputs.add(seq)
        self.scheduler.add(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        self.batch = self.scheduler.schedule()
        return (self.batch.seqs, self.batch.is_prefill) if self.batch is not None else ([], False)

    def postprocess(self, seqs: list[Sequence], tokens: list) -> list[Sequence]:
        if self.batch is None:  # nothing was scheduled
            return []
        assert seqs == self.batch.seqs
        self.scheduler.launched(self.batch)
        finished = []
        for seq, index, token in zip(seqs, self.batch.sampled_index, tokens, strict=True):
            if index < 0:
                continue
            seq.resolve(index, token)
            self.scheduler.resolved(seq)
            reason = self.outputs.add_token(seq, None)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        self.batch = None
        return finished


def make_scheduler(num_blocks: int, *, block_size: int = 16, max_num_seqs: int = 512,
                   max_num_batched_tokens: int = 16384, eos: int = EOS) -> SerialLoop:
    return SerialLoop(Scheduler(max_num_seqs, max_num_batched_tokens, num_blocks, block_size), eos)


def make_seq(tokens, block_size: int = 16, **sp) -> Sequence:
    sp.setdefault("ignore_eos", True)
    return Sequence(list(tokens), SamplingParams(**sp), block_size)


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def step(scheduler: SerialLoop, token: int = 1):
    """One engine step with a fixed sampled token for every sequence; returns (seqs, is_prefill, finished)."""
    seqs, is_prefill = scheduler.schedule()
    finished = scheduler.postprocess(seqs, [token] * len(seqs))
    return seqs, is_prefill, finished


# -- batching and limits ----------------------------------------------------------------------------------
def test_engine_builds_scheduler_from_config(tiny_model):
    """LLMEngine gives the scheduler the Config's limits and block size, and the runner's pool size."""
    from nanovllm import LLM
    with LLM(tiny_model, kvcache_block_size=32, max_num_seqs=3, max_num_batched_tokens=100, num_kvcache_blocks=10,
             device="cpu") as llm:
        scheduler = llm.scheduler
        assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (3, 100)
        assert scheduler.block_manager.block_size == 32 and len(scheduler.block_manager.blocks) == 10


def test_first_step_prefills_whole_prompt_then_decodes():
    """A new sequence is prefilled whole, samples one token, then decodes one token per step."""
    scheduler = make_scheduler(8)
    seq = make_seq(prompt(20), max_tokens=10)
    scheduler.add(seq)
    seqs, is_prefill = scheduler.schedule()
    assert (seqs, is_prefill) == ([seq], True)
    assert seq.status == SequenceStatus.RUNNING
    assert (seq.num_computed_tokens, seq.num_scheduled_tokens) == (0, 20)
    assert seq.block_table == [0, 1]
    scheduler.postprocess(seqs, [5])
    assert seq.completion_token_ids == [5] and seq.num_computed_tokens == 20
    seqs, is_prefill = scheduler.schedule()
    assert (seqs, is_prefill) == ([seq], False)
    assert (seq.num_computed_tokens, seq.num_scheduled_tokens) == (20, 1)


def test_an_admission_hashes_the_prompt_once(monkeypatch):
    """Admitting a sequence looks its prefix up once (can_allocate and allocate share the match), and the shared
    prefix blocks are found."""
    import nanovllm.scheduler.block_manager as bm
    scheduler = make_scheduler(16)
    first = make_seq(prompt(50), max_tokens=2)
    scheduler.add(first)
    step(scheduler)
    hashed = []
    original = bm.compute_block_hash
    monkeypatch.setattr(bm, "compute_block_hash", lambda *a: hashed.append(a) or original(*a))
    second = make_seq(prompt(50) + [7], max_tokens=2)
    scheduler.add(second)
    scheduler.schedule()
    assert len(hashed) == 3  # the 3 full blocks of 51 tokens' first 50, once each
    assert second.num_computed_tokens == 48 and second.block_table[:3] == first.block_table[:3]


def test_prefill_is_scheduled_before_decode():
    """A newly arrived request is prefilled before running sequences decode again."""
    scheduler = make_scheduler(16)
    a, b = make_seq(prompt(20), max_tokens=10), make_seq(prompt(5, 3000), max_tokens=10)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    seqs, is_prefill, _ = step(scheduler)
    assert (seqs, is_prefill) == ([b], True)
    seqs, is_prefill, _ = step(scheduler)
    assert (seqs, is_prefill) == ([a, b], False)


def test_max_num_seqs_limits_admission_and_decode_batch():
    """No more than max_num_seqs sequences run; the rest wait until one finishes."""
    scheduler = make_scheduler(32, max_num_seqs=2)
    seqs = [make_seq(prompt(5, 100 * i), max_tokens=2) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    scheduled, is_prefill, _ = step(scheduler)
    assert scheduled == seqs[:2] and is_prefill
    assert list(scheduler.waiting) == [seqs[2]] and seqs[2].block_table == []
    scheduled, is_prefill, finished = step(scheduler)
    assert scheduled == seqs[:2] and not is_prefill and finished == seqs[:2]
    scheduled, is_prefill, _ = step(scheduler)
    assert scheduled == [seqs[2]] and is_prefill


def test_max_num_batched_tokens_limits_prefill_and_chunks_last_admitted():
    """Prefill admits while the token budget lasts; the last admitted sequence is chunked to fit."""
    scheduler = make_scheduler(32, max_num_batched_tokens=64)
    seqs = [make_seq(prompt(40, 100 * i), max_tokens=2) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    scheduled, is_prefill = scheduler.schedule()
    assert scheduled == seqs[:2] and is_prefill
    assert [s.num_scheduled_tokens for s in scheduled] == [40, 24]
    assert sum(s.num_scheduled_tokens for s in scheduled) <= 64
    assert list(scheduler.waiting) == [seqs[2]]
    assert seqs[1].block_table == [3, 4, 5]  # all blocks allocated at admission, not per chunk
    scheduler.postprocess(scheduled, [1, None])
    assert seqs[0].num_completion_tokens == 1 and seqs[1].num_completion_tokens == 0
    assert seqs[1].num_computed_tokens == 24
    scheduled, is_prefill = scheduler.schedule()
    assert scheduled == [seqs[1], seqs[2]] and is_prefill
    assert [s.num_scheduled_tokens for s in scheduled] == [16, 40]
    assert seqs[1].samples_this_step


# -- chunked prefill (upstream #212) ----------------------------------------------------------------------
def test_chunked_prefill_token_accounting():
    """A 100-token prompt with a 32-token budget runs in chunks 32, 32, 32, 4: each step starts at the cached
    count, its key length is the chunk end, and only the last chunk samples a token (upstream #212)."""
    scheduler = make_scheduler(16, max_num_batched_tokens=32)
    seq = make_seq(prompt(100), max_tokens=5)
    scheduler.add(seq)
    chunks = []
    for _ in range(4):
        seqs, is_prefill = scheduler.schedule()
        assert seqs == [seq] and is_prefill
        assert len(seq.block_table) == 7
        key_len = seq.num_computed_tokens + seq.num_scheduled_tokens
        chunks.append((seq.num_computed_tokens, seq.num_scheduled_tokens, key_len, seq.samples_this_step))
        assert seq.scheduled_token_ids() == seq.token_ids[seq.num_computed_tokens:key_len]
        scheduler.postprocess(seqs, [9])
    assert chunks == [(0, 32, 32, False), (32, 32, 64, False), (64, 32, 96, False), (96, 4, 100, True)]
    assert seq.completion_token_ids == [9] and seq.num_computed_tokens == 100 and len(seq) == 101


def test_chunked_prefill_registers_hashes_of_each_chunk_only():
    """A chunk registers the hashes of the blocks it fills, not blocks later chunks will compute."""
    scheduler = make_scheduler(16, max_num_batched_tokens=40)
    seq = make_seq(prompt(100), max_tokens=5)
    scheduler.add(seq)
    scheduler.schedule()
    bm = scheduler.block_manager
    assert [bm.blocks[b].hash != -1 for b in seq.block_table] == [True, True] + [False] * 5
    scheduler.postprocess([seq], [None])
    scheduler.schedule()
    assert [bm.blocks[b].hash != -1 for b in seq.block_table] == [True] * 5 + [False] * 2


def test_chunk_remainder_of_one_token_is_computed_by_a_decode_step():
    """When one prompt token is left after a chunk it is computed as a one-token decode that samples."""
    scheduler = make_scheduler(16, max_num_batched_tokens=32)
    seq = make_seq(prompt(33), max_tokens=5)
    scheduler.add(seq)
    seqs, _ = scheduler.schedule()
    scheduler.postprocess(seqs, [None])
    assert seq.num_computed_tokens == 32 and seq.num_completion_tokens == 0
    seqs, is_prefill = scheduler.schedule()
    assert seqs == [seq] and not is_prefill
    assert (seq.num_computed_tokens, seq.num_scheduled_tokens) == (32, 1) and seq.samples_this_step
    scheduler.postprocess(seqs, [4])
    assert seq.completion_token_ids == [4]


def test_partial_prefill_continues_before_new_admissions():
    """A partly prefilled sequence gets budget before waiting sequences are admitted."""
    scheduler = make_scheduler(32, max_num_batched_tokens=32)
    a, b = make_seq(prompt(50), max_tokens=3), make_seq(prompt(20, 5000), max_tokens=3)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    seqs, _ = scheduler.schedule()
    assert seqs == [a, b]
    assert [s.num_scheduled_tokens for s in seqs] == [18, 14]


# -- preemption -------------------------------------------------------------------------------------------
def test_decode_preempts_most_recently_admitted():
    """Out of blocks at decode, the most recently admitted running sequence is preempted (recompute): it
    goes back to the head of waiting holding no blocks; earlier sequences keep decoding."""
    scheduler = make_scheduler(6)
    a, b, c = (make_seq(prompt(32, 1000 * (i + 1)), max_tokens=2) for i in range(3))
    for seq in (a, b, c):
        scheduler.add(seq)
    seqs, is_prefill, _ = step(scheduler)
    assert seqs == [a, b, c] and is_prefill and scheduler.block_manager.num_free_blocks == 0
    assert [s.block_table for s in (a, b, c)] == [[0, 1], [2, 3], [4, 5]]
    seqs, is_prefill = scheduler.schedule()      # each now needs a third block
    assert seqs == [a, b] and not is_prefill
    assert c.status == SequenceStatus.WAITING and list(scheduler.waiting) == [c]
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.completion_token_ids == [1]
    assert a.block_table == [0, 1, 5] and b.block_table == [2, 3, 4]
    assert list(scheduler.running) == [a, b]


def test_preempted_sequence_readmitted_as_prefill_of_prompt_and_completion():
    """A preempted sequence comes back as a prefill of prompt + completion (upstream #144): all of it is
    scheduled, it samples at the end, and generation continues where it stopped."""
    scheduler = make_scheduler(6)
    a, b, c = (make_seq(prompt(32, 1000 * (i + 1)), max_tokens=2) for i in range(3))
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)
    seqs, _, finished = step(scheduler)           # c preempted; a and b finish (max_tokens=2)
    assert finished == [a, b]
    seqs, is_prefill = scheduler.schedule()
    assert seqs == [c] and is_prefill
    assert len(c) == 33 and c.num_completion_tokens == 1
    assert (c.num_computed_tokens, c.num_scheduled_tokens) == (0, 33)   # its old blocks were reused
    assert c.scheduled_token_ids() == prompt(32, 3000) + [1] and c.samples_this_step
    finished = scheduler.postprocess(seqs, [2])
    assert finished == [c] and c.completion_token_ids == [1, 2]
    assert scheduler.is_finished() and scheduler.block_manager.num_free_blocks == 6


def test_preempted_sequence_hits_prefix_cache_on_readmission():
    """Upstream #211: a preempted sequence whose freed blocks are still cached is re-admitted through the
    prefix cache: it gets its old blocks back, reports them cached and computes only the rest."""
    scheduler = make_scheduler(5)
    a = make_seq(prompt(32, 1000), max_tokens=2)
    b = make_seq(prompt(32, 2000), max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)                                # a: [0, 1], b: [2, 3], one block free
    seqs, _, finished = step(scheduler)            # a takes block 4; b cannot append, preempted; a finishes
    assert seqs == [a] and finished == [a]
    assert list(scheduler.waiting) == [b] and b.block_table == []
    seqs, is_prefill = scheduler.schedule()
    assert seqs == [b] and is_prefill
    assert b.block_table[:2] == [2, 3]
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (32, 1)
    assert b.samples_this_step
    assert b.num_cached_prompt_tokens == 0       # set only at the first admission
    scheduler.postprocess(seqs, [3])
    assert b.completion_token_ids == [1, 3]


def test_last_sequence_preempts_itself_when_earlier_ones_took_the_blocks():
    """When the sequences scheduled before it took the last free blocks and no unscheduled sequence is left
    to preempt, a sequence preempts itself; the scheduled ones keep their blocks."""
    scheduler = make_scheduler(5)
    a = make_seq(prompt(32, 1000), max_tokens=5)
    b = make_seq(prompt(32, 2000), max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    seqs, is_prefill = scheduler.schedule()
    assert seqs == [a] and not is_prefill
    assert list(scheduler.running) == [a] and list(scheduler.waiting) == [b]
    assert a.block_table == [0, 1, 4] and b.block_table == []
    assert b.status == SequenceStatus.WAITING


# -- prefix sharing in one step (upstream #219) -----------------------------------------------------------
def test_identical_prompts_in_one_step_share_blocks():
    """Upstream #219: two identical prompts admitted in the same step share the first one's full blocks;
    the second reports them as cached tokens and computes only the last block."""
    scheduler = make_scheduler(16)
    a, b = make_seq(prompt(40), max_tokens=3), make_seq(prompt(40), max_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    seqs, is_prefill = scheduler.schedule()
    assert seqs == [a, b] and is_prefill
    assert a.block_table == [0, 1, 2] and b.block_table == [0, 1, 3]
    assert (a.num_computed_tokens, a.num_scheduled_tokens) == (0, 40)
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (32, 8)
    assert (a.num_cached_prompt_tokens, b.num_cached_prompt_tokens) == (0, 32)
    assert [scheduler.block_manager.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]


def test_identical_block_multiple_prompts_compute_at_least_one_token():
    """Upstream #114 through the scheduler: a prompt of exactly 2 blocks submitted twice computes its
    last block again (>= 1 token) and still samples."""
    scheduler = make_scheduler(16)
    a = make_seq(prompt(32), max_tokens=1)
    scheduler.add(a)
    step(scheduler)
    b = make_seq(prompt(32), max_tokens=1)
    scheduler.add(b)
    seqs, _ = scheduler.schedule()
    assert seqs == [b]
    assert b.num_computed_tokens == 16 and b.num_scheduled_tokens == 16 and b.samples_this_step
    assert b.num_cached_prompt_tokens == 16


def test_prefix_cached_tokens_reported_per_sequence():
    """num_cached_prompt_tokens records each sequence's prompt hit at its first admission."""
    scheduler = make_scheduler(32)
    a = make_seq(prompt(50), max_tokens=1)
    scheduler.add(a)
    step(scheduler)
    b = make_seq(prompt(40) + [1, 2, 3], max_tokens=1)
    c = make_seq(prompt(10, 9000), max_tokens=1)
    scheduler.add(b)
    scheduler.add(c)
    step(scheduler)
    assert (a.num_cached_prompt_tokens, b.num_cached_prompt_tokens, c.num_cached_prompt_tokens) == (0, 32, 0)


# -- finishing --------------------------------------------------------------------------------------------
def test_eos_finishes_and_frees_blocks():
    """Sampling EOS finishes a sequence (EOS included in its completion) and frees its blocks."""
    scheduler = make_scheduler(8)
    seq = make_seq(prompt(20), max_tokens=10, ignore_eos=False)
    scheduler.add(seq)
    step(scheduler, token=3)
    seqs, _, finished = step(scheduler, token=EOS)
    assert finished == [seq] and seq.is_finished and seq.status == SequenceStatus.FINISHED
    assert seq.completion_token_ids == [3, EOS]
    assert seq.block_table == [] and scheduler.block_manager.num_free_blocks == 8
    assert scheduler.is_finished() and not scheduler.running


def test_ignore_eos_keeps_going_until_max_tokens():
    """With ignore_eos, EOS is an ordinary token and max_tokens decides."""
    scheduler = make_scheduler(8)
    seq = make_seq(prompt(20), max_tokens=3, ignore_eos=True)
    scheduler.add(seq)
    assert step(scheduler, token=EOS)[2] == []
    assert step(scheduler, token=EOS)[2] == []
    assert step(scheduler, token=EOS)[2] == [seq]
    assert seq.completion_token_ids == [EOS] * 3


def test_max_tokens_finishes_exactly():
    """A sequence finishes with exactly max_tokens completion tokens and frees every block."""
    scheduler = make_scheduler(8)
    seq = make_seq(prompt(15), max_tokens=4)
    scheduler.add(seq)
    finished_at = [i for i in range(10) if step(scheduler)[2]]
    assert finished_at == [3]
    assert seq.num_completion_tokens == 4 and len(seq) == 19
    assert scheduler.block_manager.num_free_blocks == 8 and scheduler.block_manager.used_block_ids == set()


def test_max_tokens_one_finishes_at_prefill():
    """max_tokens=1 finishes on the prefill step itself."""
    scheduler = make_scheduler(8)
    seq = make_seq(prompt(15), max_tokens=1)
    scheduler.add(seq)
    _, is_prefill, finished = step(scheduler)
    assert is_prefill and finished == [seq]


def test_finished_sequence_removed_while_others_keep_running():
    """Only the finished sequence leaves running; the others keep their blocks and order."""
    scheduler = make_scheduler(16)
    a, b, c = (make_seq(prompt(10, 100 * i), max_tokens=mt) for i, mt in enumerate((5, 2, 5)))
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)
    _, _, finished = step(scheduler)
    assert finished == [b] and list(scheduler.running) == [a, c]
    assert b.block_table == [] and a.block_table == [0] and c.block_table == [2]


def test_abort_frees_blocks_and_forgets_hashes():
    """abort drops sequences whose step failed: blocks freed, their hashes forgotten (no later hit)."""
    scheduler = make_scheduler(8)
    a = make_seq(prompt(40), max_tokens=3)
    scheduler.add(a)
    seqs, _ = scheduler.schedule()
    scheduler.abort(seqs)
    assert a.is_finished and not scheduler.running and not scheduler.waiting
    assert scheduler.block_manager.num_free_blocks == 8 and scheduler.block_manager.hash_to_block_id == {}
    b = make_seq(prompt(40), max_tokens=3)
    scheduler.add(b)
    scheduler.schedule()
    assert b.num_computed_tokens == 0


# -- property test ----------------------------------------------------------------------------------------
def check_pool(scheduler: Scheduler) -> None:
    """Invariants of the block pool and the sequences' block tables.

    Block tables: admission allocates blocks for all of a sequence's tokens, and a decode schedule appends the
    block for its last token. So a running sequence holds exactly the blocks its length needs, except while its
    last token has not been scheduled yet (sampled after the last step that scheduled the sequence, known or still
    pending): when that token starts a new block it holds one block less, until the decode that computes it.
    Hashes: exactly the blocks full within what is computed or being computed AND known (a pending token's block
    is hashed once its id is back), chained, holding the sequence's tokens."""
    bm = scheduler.block_manager
    bs = bm.block_size
    all_ids = set(range(len(bm.blocks)))
    free, used = set(bm.free_block_ids), bm.used_block_ids
    assert not free & used, "a block is both free and used"
    assert free | used == all_ids, "a block is neither free nor used"
    assert len(bm.free_block_ids) == len(free)

    holders = Counter()
    for seq in scheduler.waiting:
        assert seq.status == SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0, "a waiting sequence holds blocks"
    for seq in scheduler.running:
        assert seq.status == SequenceStatus.RUNNING
        holders.update(seq.block_table)
        assert len(set(seq.block_table)) == len(seq.block_table), "a block appears twice in one table"
        expected = {seq.num_blocks}
        if seq.num_computed_tokens + seq.num_scheduled_tokens < len(seq):
            expected.add(-(-(len(seq) - 1) // bs))
        assert len(seq.block_table) in expected, (seq.seq_id, len(seq), seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id], f"ref count of block {block.block_id}"
        assert (block.ref_count > 0) == (block.block_id in used)

    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h, "hash map points at a block with another hash"
    for block in bm.blocks:
        assert (block.hash == -1) == (block.token_ids == []), "hash and token ids out of step"

    for seq in scheduler.running:
        limit = min(seq.num_computed_tokens + seq.num_scheduled_tokens, seq.num_known_tokens)
        h = -1
        for i, block_id in enumerate(seq.block_table):
            block = bm.blocks[block_id]
            if i < limit // bs:
                h = compute_block_hash(seq.block(i), h)
                assert PENDING not in seq.block(i)
                assert block.hash == h and block.token_ids == seq.block(i), (seq.seq_id, i)
            else:
                assert block.hash == -1, (seq.seq_id, i, "block not yet full of known, computed tokens has a hash")


class ShadowCache:
    """What the KV cache would hold: the token written at every slot. Checks that what attention reads for
    a sequence is that sequence's own tokens (no false prefix hit, no clobbering of shared blocks)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.slots = [[None] * block_size for _ in range(num_blocks)]

    def write(self, seq: Sequence, start: int, end: int, garbage: bool = False) -> None:
        for p in range(start, end):
            self.slots[seq.block_table[p // self.bs]][p % self.bs] = None if garbage else seq.token_ids[p]

    def check(self, seq: Sequence, end: int) -> None:
        bs = self.bs
        for i in range((end + bs - 1) // bs):
            n = min(bs, end - i * bs)
            assert self.slots[seq.block_table[i]][:n] == seq.token_ids[i * bs:i * bs + n], \
                f"seq {seq.seq_id} reads wrong K/V in block {seq.block_table[i]} (index {i})"


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([16, 32]))
    max_prompt = draw(st.integers(1, 160))
    max_tokens_cap = draw(st.integers(1, 48))
    n = draw(st.integers(1, 10))
    bases = [draw(st.lists(st.integers(10, 40), min_size=max_prompt, max_size=max_prompt)) for _ in range(2)]
    requests = []
    for _ in range(n):
        length = draw(st.one_of(st.integers(1, max_prompt),
                                st.sampled_from([k * block_size for k in range(1, max_prompt // block_size + 1)]
                                                or [max_prompt])))
        kind = draw(st.sampled_from(["fresh", "shared", "same"]))
        base = bases[draw(st.integers(0, 1))]
        if kind == "same":
            tokens = base[:length]
        elif kind == "shared":
            cut = draw(st.integers(0, length))
            tokens = base[:cut] + draw(st.lists(st.integers(10, 40), min_size=length - cut,
                                                max_size=length - cut))
        else:
            tokens = draw(st.lists(st.integers(10, 1000), min_size=length, max_size=length))
        requests.append(dict(tokens=tokens, max_tokens=draw(st.integers(1, max_tokens_cap)),
                             ignore_eos=draw(st.booleans()), arrival=draw(st.integers(0, 30))))
    longest = max(len(r["tokens"]) + r["max_tokens"] for r in requests)
    min_blocks = (longest + block_size - 1) // block_size
    num_blocks = min_blocks + draw(st.sampled_from([0, 0, 1, 2, 3, 6, 12]))  # small pools force preemption
    max_num_seqs = draw(st.integers(1, 8))
    max_num_batched_tokens = draw(st.sampled_from([1, 7, 16, 33, 64, 100, 256, 1024]))
    p_eos = draw(st.sampled_from([0.0, 0.02, 0.1]))
    p_abort = draw(st.sampled_from([0.0, 0.0, 0.01]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return dict(block_size=block_size, requests=requests, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, p_eos=p_eos, p_abort=p_abort, seed=seed)


@pytest.fixture(scope="module")
def property_stats(request):
    """Coverage of the property test: it must really reach thousands of steps, preemption, prefix hits and
    chunking (checked only when it passed, so a failure is not reported twice)."""
    stats = Counter()
    failed_before = request.session.testsfailed
    yield stats
    if request.session.testsfailed == failed_before:
        assert stats["steps"] >= 2000, stats
        assert stats["preempted"] > 0 and stats["prefix_hit_tokens"] > 0 and stats["chunked"] > 0, stats


def assert_finished_by_its_rules(completion: list[int], request: dict) -> None:
    """A finished completion stopped at max_tokens, or (unless ignore_eos) at its first EOS."""
    assert 1 <= len(completion) <= request["max_tokens"]
    if request["ignore_eos"]:
        assert len(completion) == request["max_tokens"]
    else:
        assert EOS not in completion[:-1]
        assert len(completion) == request["max_tokens"] or completion[-1] == EOS


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads())
def test_random_workloads_keep_block_pool_consistent(property_stats, workload):
    """Drive the scheduler with random workloads (shared prefixes, identical prompts, block-multiple lengths,
    tiny pools that force preemption, tiny token budgets that force chunking, random EOS and aborts) and
    check after every schedule and every postprocess: free and used blocks partition the pool, ref counts
    equal the number of block tables holding each block, every running sequence holds exactly the blocks
    its length needs, hashes are consistent, what attention would read is the sequence's own tokens; at the
    end every block is free and every request finished with a length consistent with max_tokens/EOS."""
    rng = random.Random(workload["seed"])
    bs = workload["block_size"]
    scheduler = make_scheduler(workload["num_blocks"], block_size=bs,
                               max_num_seqs=workload["max_num_seqs"],
                               max_num_batched_tokens=workload["max_num_batched_tokens"])
    bm = scheduler.block_manager
    shadow = ShadowCache(workload["num_blocks"], bs)
    arrivals = sorted(((r["arrival"], i, r) for i, r in enumerate(workload["requests"])), key=lambda x: x[:2])
    seqs, fed, aborted = {}, {}, set()
    total_work = sum(len(r["tokens"]) + r["max_tokens"] for r in workload["requests"])
    max_steps = 20 * total_work + 100
    steps = 0
    while arrivals or not scheduler.is_finished():
        steps += 1
        assert steps <= max_steps, "scheduler made no progress (step cap hit)"
        while arrivals and (arrivals[0][0] <= steps or scheduler.is_finished()):
            _, i, r = arrivals.pop(0)
            seq = Sequence(r["tokens"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"]), bs)
            seqs[i], fed[seq.seq_id] = seq, []
            scheduler.add(seq)
        running_before = set(map(id, scheduler.running))
        scheduled, is_prefill = scheduler.schedule()
        assert scheduled, "schedule() returned nothing while requests remain"
        assert len(scheduled) == len(set(map(id, scheduled)))
        assert len(scheduled) <= workload["max_num_seqs"] and len(scheduler.running) <= workload["max_num_seqs"]
        assert all(s.status == SequenceStatus.RUNNING for s in scheduled)
        if is_prefill:
            assert sum(s.num_scheduled_tokens for s in scheduled) <= workload["max_num_batched_tokens"]
            property_stats["chunked"] += sum(not s.samples_this_step for s in scheduled)
            property_stats["prefix_hit_tokens"] += sum(s.num_computed_tokens for s in scheduled
                                                       if id(s) not in running_before)
        else:
            for s in scheduled:
                assert (s.num_computed_tokens, s.num_scheduled_tokens) == (len(s) - 1, 1)
        property_stats["preempted"] += len(running_before - set(map(id, scheduler.running)))
        for s in scheduled:
            assert s.num_scheduled_tokens >= 1
            assert s.num_computed_tokens + s.num_scheduled_tokens <= len(s)
        check_pool(scheduler)

        if rng.random() < workload["p_abort"]:
            for s in scheduled:
                shadow.write(s, s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens, garbage=True)
            scheduler.abort(scheduled)
            aborted.update(s.seq_id for s in scheduled)
            check_pool(scheduler)
            continue

        # the model step: write every scheduled token's K/V, then attention reads each sequence's prefix
        for s in scheduled:
            shadow.write(s, s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens)
        for s in scheduled:
            shadow.check(s, s.num_computed_tokens + s.num_scheduled_tokens)
        for s in scheduler.running:
            shadow.check(s, s.num_computed_tokens)

        tokens = []
        for s in scheduled:
            tok = EOS if rng.random() < workload["p_eos"] else rng.randrange(10, 1000)
            samples = s.num_computed_tokens + s.num_scheduled_tokens == len(s)
            tokens.append(tok if samples else None)
            if samples:
                fed[s.seq_id].append(tok)
        finished = scheduler.postprocess(scheduled, tokens)
        for s in finished:
            assert s.is_finished and s.block_table == []
        for s in scheduled:
            assert s.num_scheduled_tokens == 0
            assert s.completion_token_ids == fed[s.seq_id]
        check_pool(scheduler)
        property_stats["steps"] += 1

    assert bm.num_free_blocks == len(bm.blocks) and bm.used_block_ids == set()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert len(seqs) == len(workload["requests"])
    for i, r in enumerate(workload["requests"]):
        seq = seqs[i]
        assert seq.is_finished
        assert seq.prompt_token_ids == r["tokens"]
        if seq.seq_id in aborted:
            continue
        completion = seq.completion_token_ids
        assert completion == fed[seq.seq_id]
        assert_finished_by_its_rules(completion, r)


class SimulatedDevice:
    """Runs StepInputs as the GPU would, on token ids instead of K/V: a pending input id is taken from the previous
    launched step's samples (prev_rows), every new token's id is written at its slot, and what each row's attention
    reads through its block table must be that sequence's true tokens (every token sampled for it, even ones the
    host has not read back yet)."""

    def __init__(self, num_blocks: int, block_size: int, rng: random.Random, p_eos: float) -> None:
        self.bs = block_size
        self.cache = np.full(num_blocks * block_size, -2, dtype=np.int64)
        self.rng, self.p_eos = rng, p_eos
        self.samples: list[int] = []
        self.truth: dict[int, list[int]] = {}

    def run(self, step, seqs: list[Sequence], sampled_index: list[int]) -> list[int]:
        ids = step.input_ids.astype(np.int64)
        if step.prev_rows is not None:
            rows = step.prev_rows >= 0
            ids[rows] = np.asarray(self.samples)[step.prev_rows[rows]]
        assert (ids >= 0).all(), "a step computes a token whose id is nowhere"
        valid = step.slot_mapping >= 0
        self.cache[step.slot_mapping[valid]] = ids[valid]
        key_lens = np.diff(step.cu_seqlens_k) if step.is_prefill else step.context_lens
        for row, seq in enumerate(seqs):
            truth = self.truth.setdefault(seq.seq_id, list(seq.prompt_token_ids))
            n = int(key_lens[row])
            pos = np.arange(n)
            slots = step.block_tables[row, pos // self.bs].astype(np.int64) * self.bs + pos % self.bs
            assert self.cache[slots].tolist() == truth[:n], f"seq {seq.seq_id} reads wrong K/V"
        self.samples = [EOS if self.rng.random() < self.p_eos else self.rng.randrange(10, 1000) for _ in seqs]
        for seq, index, token in zip(seqs, sampled_index, self.samples, strict=True):
            if index >= 0:
                assert index == len(self.truth[seq.seq_id])
                self.truth[seq.seq_id].append(token)
        return list(self.samples)


@pytest.fixture(scope="module")
def overlap_stats(request):
    """Coverage of the overlapped property test: steps that read pending ids on the device, preemption, prefix hits."""
    stats = Counter()
    failed_before = request.session.testsfailed
    yield stats
    if request.session.testsfailed == failed_before:
        assert stats["pending_reads"] >= 1000 and stats["preempted"] > 0 and stats["prefix_hit_tokens"] > 0, stats


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads())
def test_random_workloads_overlapped_keep_pool_consistent_and_read_true_tokens(overlap_stats, workload):
    """LLMEngine's overlapped loop without a model: step N+1 is scheduled and launched before step N's samples are
    read back (they are pending; N+1 reads them on the 'device'), then N is processed (tokens resolved, stops,
    finishes, a sequence finished at N discards its extra sample from N+1). After every launch and every processing:
    the pool invariants hold, and every read of the simulated cache sees the sequence's true tokens, so blocks freed
    or preempted while a step is in flight are never read stale, and pending ids land where they belong."""
    rng = random.Random(workload["seed"])
    bs = workload["block_size"]
    scheduler = Scheduler(workload["max_num_seqs"], workload["max_num_batched_tokens"], workload["num_blocks"], bs)
    outputs = OutputProcessor(None, frozenset([EOS]))
    device = SimulatedDevice(workload["num_blocks"], bs, rng, workload["p_eos"])
    arrivals = sorted(((r["arrival"], i, r) for i, r in enumerate(workload["requests"])), key=lambda x: x[:2])
    seqs, previous, steps = {}, None, 0
    max_steps = 20 * sum(len(r["tokens"]) + r["max_tokens"] for r in workload["requests"]) + 100
    while arrivals or not scheduler.is_finished() or previous is not None:
        steps += 1
        assert steps <= max_steps, "no progress (step cap hit)"
        while arrivals and (arrivals[0][0] <= steps or scheduler.is_finished()):
            _, i, r = arrivals.pop(0)
            seqs[i] = Sequence(r["tokens"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"]), bs)
            outputs.add(seqs[i])
            scheduler.add(seqs[i])
        launched = None
        batch = scheduler.schedule()
        if batch is not None:
            step = build_step_input(batch.seqs, batch.is_prefill, bs, outputs.banned_tokens)
            scheduler.launched(batch)
            launched = (batch, device.run(step, batch.seqs, batch.sampled_index))
            overlap_stats["pending_reads"] += int(step.prev_rows is not None)
            overlap_stats["prefix_hit_tokens"] += sum(s.num_cached_prompt_tokens for s in batch.seqs)
        check_pool(scheduler)
        if previous is not None:
            done, samples = previous
            for seq, index, token in zip(done.seqs, done.sampled_index, samples, strict=True):
                if index < 0 or seq.is_finished:
                    continue
                seq.resolve(index, token)
                scheduler.resolved(seq)
                reason = outputs.add_token(seq, None)
                if reason is not None:
                    scheduler.finish(seq, reason)
                    assert seq.block_table == [] and seq.num_pending == 0
            check_pool(scheduler)
        assert batch is not None or previous is not None or arrivals, "nothing to run while requests remain"
        previous = launched
    overlap_stats["preempted"] += scheduler.num_preemptions
    bm = scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks) and all(b.ref_count == 0 for b in bm.blocks)
    for i, r in enumerate(workload["requests"]):
        seq = seqs[i]
        completion = seq.completion_token_ids
        assert seq.is_finished and seq.prompt_token_ids == r["tokens"] and PENDING not in seq.token_ids
        truth = device.truth[seq.seq_id]
        assert seq.token_ids == truth[:len(seq)] and len(truth) - len(seq) in (0, 1)  # at most one discarded
        assert_finished_by_its_rules(completion, r)

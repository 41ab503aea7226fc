"""Sequence: token bookkeeping, block accounting, and the compact pickle sent to tensor-parallel workers."""
import pickle

import pytest

from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 4


def make_seq(n: int, **sp) -> Sequence:
    return Sequence(list(range(100, 100 + n)), SamplingParams(**sp), block_size=BS)


def roundtrip(seq: Sequence) -> Sequence:
    return pickle.loads(pickle.dumps(seq))


# -- token bookkeeping ------------------------------------------------------------------------------------
def test_new_sequence_is_waiting_with_prompt_only():
    """A new sequence is WAITING, all tokens are prompt, nothing cached or scheduled."""
    seq = make_seq(5, temperature=0.5, max_tokens=7, ignore_eos=True)
    assert seq.status == SequenceStatus.WAITING and not seq.is_finished
    assert len(seq) == seq.num_prompt_tokens == 5
    assert seq.prompt_token_ids == [100, 101, 102, 103, 104]
    assert seq.completion_token_ids == [] and seq.num_completion_tokens == 0
    assert seq.last_token == 104
    assert (seq.num_cached_tokens, seq.num_scheduled_tokens, seq.block_table) == (0, 0, [])
    assert (seq.temperature, seq.max_tokens, seq.ignore_eos) == (0.5, 7, True)


def test_sequence_ids_are_unique_and_increasing():
    """Each request gets a fresh, increasing seq_id."""
    a, b = make_seq(1), make_seq(1)
    assert b.seq_id > a.seq_id


def test_sequence_copies_its_prompt():
    """Mutating the caller's list does not change the sequence."""
    prompt = [1, 2, 3]
    seq = Sequence(prompt, block_size=BS)
    prompt.append(4)
    assert seq.token_ids == [1, 2, 3] and len(seq) == 3


def test_append_token_splits_prompt_and_completion():
    """Appended tokens are completion tokens; last_token follows them."""
    seq = make_seq(3)
    seq.append_token(7)
    seq.append_token(8)
    assert len(seq) == 5 and seq.num_completion_tokens == 2
    assert seq.prompt_token_ids == [100, 101, 102]
    assert seq.completion_token_ids == [7, 8]
    assert seq.last_token == 8 and seq[-1] == 8 and seq[0] == 100


# -- block accounting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, num_blocks, last_block_tokens", [
    (1, 1, 1), (3, 1, 3), (4, 1, 4), (5, 2, 1), (8, 2, 4), (9, 3, 1), (12, 3, 4)])
def test_num_blocks_and_last_block_fill(n, num_blocks, last_block_tokens):
    """num_blocks is ceil(len/block_size); the last block holds 1..block_size tokens."""
    seq = make_seq(n)
    assert seq.num_blocks == num_blocks
    assert seq.last_block_num_tokens == last_block_tokens


def test_num_blocks_grows_exactly_when_a_token_starts_a_new_block():
    """Appending the (k*block_size+1)-th token is what needs a new block."""
    seq = make_seq(4)
    assert seq.num_blocks == 1
    seq.append_token(0)
    assert seq.num_blocks == 2 and seq.last_block_num_tokens == 1
    for _ in range(3):
        seq.append_token(0)
    assert seq.num_blocks == 2 and seq.last_block_num_tokens == 4


def test_block_returns_token_ids_of_block_i():
    """block(i) slices the i-th block of token ids; the last may be partial."""
    seq = make_seq(10)
    assert seq.block(0) == [100, 101, 102, 103]
    assert seq.block(1) == [104, 105, 106, 107]
    assert seq.block(2) == [108, 109]


def test_samples_this_step_only_when_step_reaches_the_end():
    """A chunk that stops before the end samples nothing; the chunk reaching the end samples."""
    seq = make_seq(10)
    seq.num_scheduled_tokens = 6
    assert not seq.samples_this_step and seq.is_prefill
    seq.num_cached_tokens, seq.num_scheduled_tokens = 6, 4
    assert seq.samples_this_step and seq.is_prefill


def test_is_prefill_false_for_a_one_token_decode():
    """With everything but the last token cached and one token scheduled, the step is a decode."""
    seq = make_seq(10)
    seq.num_cached_tokens, seq.num_scheduled_tokens = 9, 1
    assert not seq.is_prefill and seq.samples_this_step


def test_scheduled_token_ids_are_the_tokens_this_step_computes():
    """scheduled_token_ids is token_ids[num_cached : num_cached + num_scheduled]."""
    seq = make_seq(10)
    seq.num_cached_tokens, seq.num_scheduled_tokens = 4, 3
    assert seq.scheduled_token_ids() == [104, 105, 106]


# -- pickling for workers (upstream #144) -----------------------------------------------------------------
def test_pickle_first_prefill_sends_whole_prompt():
    """A first prefill sends every prompt token and the block table to workers."""
    seq = make_seq(10)
    seq.block_table = [3, 1, 4]
    seq.num_scheduled_tokens = 10
    copy = roundtrip(seq)
    assert copy.token_ids == seq.token_ids
    assert copy.scheduled_token_ids() == seq.token_ids
    assert copy.block_table == [3, 1, 4]
    assert len(copy) == 10 and copy.num_cached_tokens == 0 and copy.num_scheduled_tokens == 10
    assert copy.is_prefill and copy.samples_this_step
    assert copy.seq_id == seq.seq_id and copy.temperature == seq.temperature


def test_pickle_prefill_with_prefix_hit_sends_only_uncached_tokens():
    """With a prefix-cache hit only the tokens after the cached prefix travel."""
    seq = make_seq(10)
    seq.num_cached_tokens, seq.num_scheduled_tokens = 8, 2
    copy = roundtrip(seq)
    assert copy.token_ids == [108, 109]
    assert copy.scheduled_token_ids() == [108, 109]
    assert copy.token_offset == 8 and len(copy) == 10


def test_pickle_prefill_chunk_sends_only_the_chunk():
    """A middle chunk of a chunked prefill sends only that chunk."""
    seq = make_seq(12)
    seq.num_cached_tokens, seq.num_scheduled_tokens = 4, 4
    copy = roundtrip(seq)
    assert copy.scheduled_token_ids() == [104, 105, 106, 107]
    assert copy.is_prefill and not copy.samples_this_step


def test_pickle_decode_sends_only_last_token():
    """A decode sends one token: the last one, with the full length and block table."""
    seq = make_seq(10)
    seq.append_token(42)
    seq.block_table = [0, 1, 2]
    seq.num_cached_tokens, seq.num_scheduled_tokens = 10, 1
    copy = roundtrip(seq)
    assert copy.token_ids == [42]
    assert copy.last_token == 42 and copy.scheduled_token_ids() == [42]
    assert len(copy) == 11 and copy.num_completion_tokens == 1
    assert copy.block_table == [0, 1, 2]
    assert not copy.is_prefill


def test_pickle_after_preemption_resends_prompt_and_completion():
    """A preempted sequence (cache dropped) is re-sent whole as a prefill, not as a decode (upstream #144):
    prefill-vs-decode is judged by the cache state, not by 'has completion tokens'."""
    seq = make_seq(10)
    for t in (42, 43):
        seq.append_token(t)
    # preempted: nothing cached any more, the whole sequence is recomputed
    seq.num_cached_tokens, seq.num_scheduled_tokens = 0, len(seq)
    copy = roundtrip(seq)
    assert copy.token_ids == seq.token_ids
    assert copy.scheduled_token_ids() == list(range(100, 110)) + [42, 43]
    assert copy.is_prefill and copy.samples_this_step
    assert copy.num_completion_tokens == 2


def test_pickle_does_not_carry_sampling_params_object():
    """Workers need only the scalar sampling fields; the SamplingParams object stays behind."""
    seq = make_seq(3, temperature=0.3)
    seq.num_scheduled_tokens = 3
    copy = roundtrip(seq)
    assert not hasattr(copy, "sampling_params")
    assert copy.temperature == 0.3


def test_pickle_leaves_the_original_intact():
    """Pickling must not truncate the scheduler's own sequence."""
    seq = make_seq(10)
    seq.num_cached_tokens, seq.num_scheduled_tokens = 9, 1
    pickle.dumps(seq)
    assert seq.token_ids == list(range(100, 110)) and seq.sampling_params is not None


def test_pickle_of_long_decode_is_small():
    """A decode of a long sequence pickles to roughly the same size as a short one."""
    short, long = make_seq(10), make_seq(5000)
    for seq in (short, long):
        seq.num_cached_tokens, seq.num_scheduled_tokens = len(seq) - 1, 1
    assert len(pickle.dumps(long)) < len(pickle.dumps(short)) + 64

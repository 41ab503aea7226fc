"""Sequence: token bookkeeping, pending (sampled but not yet read back) tokens, block accounting."""
import pytest

from nanovllm.engine.sequence import PENDING, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 4


def append(seq: Sequence, token_id: int) -> None:
    """A sampled token read back: what the engine does with a step's sample."""
    seq.resolve(seq.add_pending(), token_id)


def make_seq(n: int, **sp) -> Sequence:
    return Sequence(list(range(100, 100 + n)), SamplingParams(**sp), block_size=BS)


def test_new_sequence_is_waiting_with_prompt_only():
    """A new sequence is WAITING, all tokens are prompt, nothing computed or scheduled."""
    seq = make_seq(5, temperature=0.5, max_tokens=7, ignore_eos=True)
    assert seq.status == SequenceStatus.WAITING and not seq.is_finished
    assert len(seq) == seq.num_prompt_tokens == 5
    assert seq.prompt_token_ids == [100, 101, 102, 103, 104]
    assert seq.completion_token_ids == [] and seq.num_completion_tokens == 0
    assert (seq.num_computed_tokens, seq.num_scheduled_tokens, seq.block_table) == (0, 0, [])
    assert seq.sampling_params.max_tokens == 7


def test_sequence_ids_are_unique_and_increasing():
    a, b = make_seq(1), make_seq(1)
    assert b.seq_id > a.seq_id


def test_sequence_copies_its_prompt():
    """Mutating the caller's list does not change the sequence."""
    prompt = [1, 2, 3]
    seq = Sequence(prompt, block_size=BS)
    prompt.append(4)
    assert seq.token_ids == [1, 2, 3] and len(seq) == 3


def test_appended_tokens_are_the_completion():
    seq = make_seq(3)
    append(seq, 7)
    append(seq, 8)
    assert len(seq) == 5 and seq.num_completion_tokens == 2
    assert seq.prompt_token_ids == [100, 101, 102]
    assert seq.completion_token_ids == [7, 8]


def test_pending_tokens_count_in_length_but_not_in_the_completion():
    """A sampled token still on the device holds its place (length, blocks) but is not part of the completion
    until resolved; two can be pending (steps N and N+1), resolved in order."""
    seq = make_seq(3)
    first = seq.add_pending()
    second = seq.add_pending()
    assert (first, second) == (3, 4) and len(seq) == 5 and seq.num_pending == 2
    assert seq.num_known_tokens == 3 and seq.completion_token_ids == [] and seq.num_completion_tokens == 2
    assert seq.token_ids[3:] == [PENDING, PENDING]
    seq.resolve(first, 9)
    assert seq.completion_token_ids == [9] and seq.num_known_tokens == 4
    seq.drop_pending()  # finished at the first: the second sample is discarded
    assert seq.token_ids == [100, 101, 102, 9] and seq.num_pending == 0


@pytest.mark.parametrize("n,num_blocks", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_num_blocks(n, num_blocks):
    assert make_seq(n).num_blocks == num_blocks


def test_num_blocks_grows_exactly_when_a_token_starts_a_new_block():
    seq = make_seq(3)
    counts = []
    for t in range(7):
        append(seq, t)
        counts.append(seq.num_blocks)
    assert counts == [1, 2, 2, 2, 2, 3, 3]  # lengths 4..10


def test_block_returns_token_ids_of_block_i():
    seq = make_seq(10)
    assert seq.block(0) == [100, 101, 102, 103]
    assert seq.block(1) == [104, 105, 106, 107]
    assert seq.block(2) == [108, 109]


def test_samples_this_step_only_when_step_reaches_the_end():
    """A chunk that stops before the end samples nothing; the chunk reaching the end samples."""
    seq = make_seq(10)
    seq.num_scheduled_tokens = 6
    assert not seq.samples_this_step
    seq.num_computed_tokens, seq.num_scheduled_tokens = 6, 4
    assert seq.samples_this_step


def test_scheduled_token_ids_are_the_tokens_this_step_computes():
    seq = make_seq(10)
    seq.num_computed_tokens, seq.num_scheduled_tokens = 4, 3
    assert seq.scheduled_token_ids() == [104, 105, 106]

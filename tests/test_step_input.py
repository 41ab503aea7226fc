"""The step message: StepInput built on rank 0 from scheduled sequences (workers never see a Sequence), turned into
device tensors by plain functions, and carried to workers over the shared-memory channel's explicit protocol."""
import pickle

import numpy as np
import pytest
import torch

from nanovllm.distributed.shm_channel import ShmChannel, unique_shm_name
from nanovllm.engine.sequence import PENDING, Sequence
from nanovllm.engine.step_builder import build_step_input, decode_order
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.inputs import prepare
from nanovllm.worker.messages import StepInput
from nanovllm.worker.model_runner import channel_capacity

BS = 4
CPU = torch.device("cpu")


def no_bans(seq: Sequence, completion_index: int) -> list[int]:
    return []


def make_seq(n: int, blocks: list[int], computed: int = 0, scheduled: int | None = None, **sp) -> Sequence:
    seq = Sequence(list(range(100, 100 + n)), SamplingParams(**sp), block_size=BS, sampling_seed=n)
    seq.block_table = list(blocks)
    seq.num_computed_tokens = computed
    seq.num_scheduled_tokens = n - computed if scheduled is None else scheduled
    return seq


def test_prefill_sends_the_scheduled_tokens_with_slots_and_key_lengths():
    """A first prefill sends its whole prompt; one with a prefix hit only the uncached tokens, its keys running over
    the whole prefix; a middle chunk only the chunk, keys to the chunk's end (GeeeekExplorer/nano-vllm#212)."""
    whole = make_seq(6, [3, 1])
    hit = make_seq(10, [5, 6, 7], computed=8)
    chunk = make_seq(12, [0, 2, 4], computed=4, scheduled=4)
    step = build_step_input([whole, hit, chunk], True, BS, no_bans)
    assert step.is_prefill and step.prev_rows is None
    assert step.input_ids.tolist() == list(range(100, 106)) + [108, 109] + list(range(104, 108))
    assert step.positions.tolist() == list(range(6)) + [8, 9] + [4, 5, 6, 7]
    assert step.slot_mapping.tolist() == [12, 13, 14, 15, 4, 5] + [28, 29] + [8, 9, 10, 11]
    assert step.cu_seqlens_q.tolist() == [0, 6, 8, 12]
    assert step.cu_seqlens_k.tolist() == [0, 6, 16, 24]
    assert step.block_tables.tolist() == [[3, 1, -1], [5, 6, 7], [0, 2, 4]]
    assert step.sampling.positions.tolist() == [6, 10, 12]  # index of the token each row would sample


def test_preempted_sequence_is_resent_whole_as_a_prefill():
    """GeeeekExplorer/nano-vllm#144: a preempted sequence (cache dropped) is recomputed as a prefill of prompt and
    completion, whatever it has generated."""
    seq = make_seq(5, [0, 1])
    for t in (42, 43):
        seq.resolve(seq.add_pending(), t)
    seq.num_scheduled_tokens = len(seq)
    step = build_step_input([seq], True, BS, no_bans)
    assert step.input_ids.tolist() == [100, 101, 102, 103, 104, 42, 43]
    assert step.cu_seqlens_q.tolist() == [0, 7]


def test_decode_sends_one_token_and_reads_a_pending_one_from_the_previous_step():
    """A decode computes each sequence's last token; when it is still pending (overlap scheduling) the step names
    the previous step's row that sampled it instead of an id."""
    known = make_seq(6, [0, 1], computed=5, scheduled=1)
    pending = make_seq(4, [2, 3], computed=4, scheduled=0)
    pending.add_pending()
    pending.last_sample_row = 7
    pending.num_scheduled_tokens = 1
    step = build_step_input([known, pending], False, BS, no_bans)
    assert not step.is_prefill
    assert step.input_ids.tolist() == [105, PENDING]
    assert step.prev_rows.tolist() == [-1, 7]
    assert step.positions.tolist() == [5, 4] and step.context_lens.tolist() == [6, 5]
    assert step.decode_order.tolist() == [0, 1] and step.decode_order.dtype == np.int32
    assert step.slot_mapping.tolist() == [1 * BS + 1, 3 * BS + 0]  # position 5 in block 1, position 4 in block 3
    only_known = build_step_input([known], False, BS, no_bans)
    assert only_known.prev_rows is None


def test_decode_order_is_longest_first_and_stable():
    lens = np.array([3, 9, 1, 9, 4], dtype=np.int32)
    order = decode_order(lens)
    assert order.tolist() == [1, 3, 4, 0, 2] and order.dtype == np.int32
    assert decode_order(np.zeros(0, dtype=np.int32)).tolist() == []


def test_decode_message_stays_small_for_long_sequences():
    """A decode step's message depends on the batch and block-table width, not on how long sequences are."""
    def decode_bytes(n: int) -> int:
        seq = make_seq(n, list(range(-(-n // BS))), computed=n - 1, scheduled=1)
        return len(pickle.dumps(build_step_input([seq], False, BS, no_bans), protocol=5))
    assert decode_bytes(4000) < decode_bytes(10) + 5 * 1000  # ~4 bytes per block-table entry, no token ids


def test_sampling_rows_follow_the_requests():
    """Greedy below 1e-5; filters only when a sampled row uses them; min_tokens bans only for rows that sample."""
    greedy = make_seq(3, [0], temperature=1e-6)
    topk = make_seq(3, [1], temperature=0.7, top_k=5, min_tokens=2)
    partial = make_seq(8, [2, 3], scheduled=4, min_tokens=2)

    def bans(seq: Sequence, completion_index: int) -> list[int]:
        return [1, 2] if completion_index < seq.sampling_params.min_tokens else []
    s = build_step_input([greedy, topk, partial], True, BS, bans).sampling
    assert s.temperatures.tolist() == pytest.approx([0.0, 0.7, 1.0])
    assert s.top_k.tolist() == [0, 5, 0] and s.top_p.tolist() == [1, 1, 1] and s.min_p is None
    assert s.banned.tolist() == [[1, 1], [1, 2]]  # (row, token): the partial chunk samples nothing
    assert s.seeds.tolist() == [3, 3, 8]
    plain = build_step_input([make_seq(3, [0], temperature=0.5)], True, BS, no_bans).sampling
    assert plain.top_k is None and plain.top_p is None and plain.banned is None


def test_prepare_builds_tensors_and_gathers_pending_ids_on_the_device():
    seq = make_seq(4, [2, 3], computed=4, scheduled=0)
    seq.add_pending()
    seq.last_sample_row = 1
    seq.num_scheduled_tokens = 1
    other = make_seq(6, [0, 1], computed=5, scheduled=1)
    step = build_step_input([other, seq], False, BS, no_bans)
    last_sampled = torch.tensor([11, 22, 33])
    input_ids, positions, ctx = prepare(step, CPU, last_sampled)
    assert input_ids.tolist() == [105, 22] and input_ids.dtype == torch.int64
    assert positions.tolist() == [5, 4] and ctx.context_lens.tolist() == [6, 5] and not ctx.is_prefill
    assert ctx.decode_order.tolist() == [0, 1]
    assert ctx.block_tables.tolist() == [[0, 1], [2, 3]] and ctx.slot_mapping.tolist() == step.slot_mapping.tolist()
    with pytest.raises(RuntimeError, match="no previous step"):
        prepare(step, CPU, None)
    prefill = build_step_input([make_seq(6, [3, 1]), make_seq(3, [0])], True, BS, no_bans)
    _, _, ctx = prepare(prefill, CPU, None)
    assert ctx.is_prefill and (ctx.max_seqlen_q, ctx.max_seqlen_k) == (6, 6)
    assert ctx.cu_seqlens_q.tolist() == [0, 6, 9] and ctx.cu_seqlens_k.tolist() == [0, 6, 9]


@pytest.mark.parametrize("num_seqs,budget,max_len,block", [(512, 16384, 1024, 16), (7, 100, 1, 16),
                                                           (1, 1024, 1024, 16), (256, 8192, 1024, 256)])
def test_channel_capacity_holds_the_largest_steps(tiny_model, num_seqs, budget, max_len, block):
    """The channel is sized from the largest step the scheduler can build: the biggest prefill (every token of the
    budget over as many sequences as may run, full-width block tables, the largest ids) and decode both fit."""
    from nanovllm.config import Config
    config = Config(tiny_model, max_num_seqs=num_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                    kvcache_block_size=block, device="cpu")
    capacity = channel_capacity(config)
    width, b = config.max_blocks_per_seq, min(num_seqs, budget)
    prefill = []
    for i in range(b):
        n = budget // b + (i < budget % b)
        seq = Sequence([2**31 - 1] * max(n, 1), block_size=block)
        seq.block_table, seq.num_scheduled_tokens = [2**31 - 1] * width, n
        prefill.append(seq)
    decode = []
    for seq in prefill[:num_seqs]:
        seq.num_computed_tokens, seq.num_scheduled_tokens = len(seq) - 1, 1
        seq.token_ids[-1], seq.last_sample_row = PENDING, 2**31 - 1
        decode.append(seq)
    for seqs, is_prefill in ((prefill, True), (decode, False)):
        if is_prefill:
            for seq in seqs:
                seq.num_computed_tokens, seq.num_scheduled_tokens = 0, len(seq)
        step = build_step_input(seqs, is_prefill, block, no_bans)
        step.sampling = None  # workers receive the step without it
        assert len(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)) <= capacity
    assert capacity < 64 * (budget + b * width) + (1 << 16)  # no wild over-allocation


def test_channel_protocol_round_trip_acks_and_size_errors():
    """A message is published with a sequence number; the writer waits for every reader's ack before overwriting;
    a message too large for the buffer raises and leaves the last one intact."""
    writer = ShmChannel(unique_shm_name(), num_readers=2, capacity=4096, create=True)
    readers = [ShmChannel(writer.name, num_readers=2) for _ in range(2)]
    waits = []

    def wait():
        waits.append(1)
        if len(waits) > 3:
            raise TimeoutError("reader 1 never acked")
    try:
        writer.write(StepInput(True, *(np.arange(3, dtype=np.int32),) * 1, None, np.zeros(3, np.int32),
                               np.zeros(3, np.int32), np.zeros((1, 1), np.int32)), wait)
        assert not waits
        first = readers[0].read(0)
        assert first.input_ids.tolist() == [0, 1, 2]
        with pytest.raises(TimeoutError):  # reader 1 has not read message 1 yet
            writer.write("second", wait)
        assert readers[1].read(1).input_ids.tolist() == [0, 1, 2]
        with pytest.raises(RuntimeError, match="needs .* bytes but the shared-memory channel holds 4096"):
            writer.write(list(range(10_000)), wait)
        writer.write("second", wait)
        assert [r.read(i) for i, r in enumerate(readers)] == ["second", "second"]
        with pytest.raises(RuntimeError, match="out of step"):
            readers[0].read(0)  # nothing new was published
    finally:
        for r in readers:
            r.close()
        writer.close()


def test_unique_shm_names():
    assert len({unique_shm_name() for _ in range(100)}) == 100

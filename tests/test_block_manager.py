"""BlockManager: exact block ids, ref counts, reuse order, and prefix caching (upstream #114, #163)."""
import pytest

from nanovllm.engine.sequence import Sequence
from nanovllm.scheduler import block_manager as bm_module
from nanovllm.scheduler.block_manager import BlockManager, compute_block_hash

BS = 4


def append(seq: Sequence, token_id: int) -> None:
    """A sampled token read back: what the engine does with a step's sample."""
    seq.resolve(seq.add_pending(), token_id)


def seq_of(tokens) -> Sequence:
    return Sequence(list(tokens), block_size=BS)


def admit(bm: BlockManager, tokens) -> Sequence:
    """Allocate a sequence and register its full blocks as computed (what a whole prefill step does)."""
    seq = seq_of(tokens)
    bm.allocate(seq)
    bm.cache_full_blocks(seq, len(seq))
    return seq


def free_order(bm: BlockManager) -> list[int]:
    return list(bm.free_block_ids)


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


# -- allocation, ref counts, reuse order ------------------------------------------------------------------
def test_allocate_takes_lowest_ids_in_order():
    """A fresh pool hands out block ids 0, 1, 2, ... with ref count 1."""
    bm = BlockManager(8, BS)
    seq = seq_of(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.used_block_ids == {0, 1, 2}
    assert free_order(bm) == [3, 4, 5, 6, 7]
    assert bm.num_free_blocks == 5
    assert seq.num_computed_tokens == 0


def test_second_sequence_gets_next_ids():
    """Independent sequences get disjoint consecutive blocks."""
    bm = BlockManager(8, BS)
    a, b = seq_of(range(8)), seq_of(range(50, 55))
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]


def test_allocate_twice_raises():
    """A sequence that already holds blocks cannot be allocated again."""
    bm = BlockManager(4, BS)
    seq = seq_of(range(3))
    bm.allocate(seq)
    with pytest.raises(RuntimeError):
        bm.allocate(seq)


def test_can_allocate_false_when_pool_too_small():
    """A sequence needing more blocks than are free cannot be allocated."""
    bm = BlockManager(2, BS)
    assert not bm.can_allocate(seq_of(range(9)))
    assert bm.can_allocate(seq_of(range(8)))


def test_deallocate_frees_last_block_first_and_resets_counts():
    """deallocate releases a sequence's blocks last-block-first and clears its cache state."""
    bm = BlockManager(4, BS)
    seq = admit(bm, range(10))
    seq.num_scheduled_tokens = 3
    bm.deallocate(seq)
    assert free_order(bm) == [3, 2, 1, 0]
    assert refs(bm) == [0, 0, 0, 0] and bm.used_block_ids == set()
    assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.num_scheduled_tokens == 0


def test_reuse_order_is_oldest_freed_first():
    """Freed blocks are reused oldest-freed first; each sequence's blocks were freed last-block-first."""
    bm = BlockManager(6, BS)
    a, b = seq_of(range(8)), seq_of(range(20, 28))
    bm.allocate(a)
    bm.allocate(b)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    bm.deallocate(a)
    bm.deallocate(b)
    assert free_order(bm) == [4, 5, 1, 0, 3, 2]
    c = seq_of(range(200, 224))
    bm.allocate(c)
    assert c.block_table == [4, 5, 1, 0, 3, 2]


def test_shared_block_stays_used_until_last_holder_releases():
    """A block shared by two sequences returns to the free list only when both released it."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(9))
    b = admit(bm, list(range(8)) + [77])
    assert b.block_table == [0, 1, 3]
    assert refs(bm)[:4] == [2, 2, 1, 1]
    bm.deallocate(a)
    assert refs(bm)[:4] == [1, 1, 0, 1]
    assert 0 in bm.used_block_ids and 1 in bm.used_block_ids and 2 in bm.free_block_ids
    bm.deallocate(b)
    assert refs(bm) == [0] * 8 and bm.used_block_ids == set()


# -- prefix caching ---------------------------------------------------------------------------------------
def test_cache_full_blocks_hashes_only_full_blocks_with_chain():
    """Only full blocks get a hash, chained on the previous block's hash; the partial block has none."""
    bm = BlockManager(8, BS)
    seq = admit(bm, range(10))
    h0 = compute_block_hash([0, 1, 2, 3])
    h1 = compute_block_hash([4, 5, 6, 7], h0)
    assert [bm.blocks[i].hash for i in seq.block_table] == [h0, h1, -1]
    assert bm.blocks[0].token_ids == [0, 1, 2, 3] and bm.blocks[1].token_ids == [4, 5, 6, 7]
    assert bm.hash_to_block_id == {h0: 0, h1: 1}


def test_cache_full_blocks_within_a_chunk_only():
    """Registering after a chunk hashes the blocks full within the chunk end, not the whole sequence."""
    bm = BlockManager(8, BS)
    seq = seq_of(range(13))
    bm.allocate(seq)
    bm.cache_full_blocks(seq, 6)
    assert [bm.blocks[i].hash != -1 for i in seq.block_table] == [True, False, False, False]
    seq.num_computed_tokens = 6
    bm.cache_full_blocks(seq, 12)
    assert [bm.blocks[i].hash != -1 for i in seq.block_table] == [True, True, True, False]
    h0 = compute_block_hash([0, 1, 2, 3])
    assert bm.blocks[seq.block_table[1]].hash == compute_block_hash([4, 5, 6, 7], h0)


def test_block_hash_depends_on_prefix():
    """The same block contents after a different prefix hash differently."""
    assert compute_block_hash([1, 2, 3, 4]) != compute_block_hash([1, 2, 3, 4], compute_block_hash([9, 9, 9, 9]))
    assert compute_block_hash([1, 2, 3, 4]) == compute_block_hash([1, 2, 3, 4])


def test_prefix_hit_shares_blocks_and_counts_cached_tokens():
    """A second sequence with the same leading full blocks shares them (ref count 2) and reports the hit
    as cached tokens; its differing tail gets new blocks."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(10))
    b = seq_of(list(range(8)) + [90, 91, 92])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert refs(bm)[:4] == [2, 2, 1, 1]
    assert a.block_table == [0, 1, 2]


def test_prefix_hit_stops_at_first_differing_block():
    """Matching stops at the first block that differs, even when later blocks are equal."""
    bm = BlockManager(8, BS)
    admit(bm, list(range(12)) + [50])
    b = seq_of([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 51])
    bm.allocate(b)
    assert b.block_table == [0, 4, 5, 6] and b.num_computed_tokens == 4


def test_same_block_after_different_prefix_does_not_hit():
    """Hash chaining: a sequence starting with a block equal to another's second block does not hit it."""
    bm = BlockManager(8, BS)
    admit(bm, [1, 1, 1, 1, 2, 2, 2, 2, 3])
    b = seq_of([2, 2, 2, 2, 5])
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and b.block_table == [3, 4]


def test_hit_compares_token_ids_not_only_hash(monkeypatch):
    """On a hash collision the token ids decide: a different block under the same hash is not a hit."""
    monkeypatch.setattr(bm_module, "compute_block_hash", lambda token_ids, prefix_hash=-1: 12345)
    bm = BlockManager(8, BS)
    admit(bm, [1, 2, 3, 4, 0])
    other = seq_of([5, 6, 7, 8, 0])
    bm.allocate(other)
    assert other.num_computed_tokens == 0 and other.block_table == [2, 3]
    same = seq_of([1, 2, 3, 4, 0])
    bm.allocate(same)
    assert same.num_computed_tokens == 4 and same.block_table == [0, 4]


def test_freed_block_keeps_hash_and_can_hit_again():
    """A freed block keeps its hash: resubmitting the prefix takes it back out of the free list."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(10))
    bm.deallocate(a)
    assert free_order(bm) == [3, 4, 5, 6, 7, 2, 1, 0]
    b = seq_of(range(10))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert refs(bm)[:4] == [1, 1, 0, 1]
    assert free_order(bm) == [4, 5, 6, 7, 2]


def test_can_allocate_counts_free_hits_as_taking_free_blocks():
    """Hits on free blocks still consume free blocks; hits on used blocks do not."""
    bm = BlockManager(3, BS)
    a = admit(bm, range(9))
    b = seq_of(list(range(8)) + [40])
    assert not bm.can_allocate(b)  # shares 2 used blocks but needs 1 new one, none free
    bm.deallocate(a)
    assert bm.can_allocate(b)      # the 2 hits are free now and 1 more is free
    bm.allocate(b)
    assert b.block_table == [0, 1, 2] and b.num_computed_tokens == 8
    bm2 = BlockManager(4, BS)
    admit(bm2, range(9))
    c = seq_of(list(range(8)) + [40])
    assert bm2.can_allocate(c)
    bm2.allocate(c)
    assert c.block_table == [0, 1, 3]


def test_can_allocate_false_when_free_hits_leave_too_few_blocks():
    """Free blocks hit by the prefix cache are not extra capacity: a sequence whose hits are all free
    still needs a free block for every block it holds."""
    bm = BlockManager(3, BS)
    a = admit(bm, range(8))                     # blocks 0, 1, both hashed
    other = admit(bm, range(50, 53))            # block 2
    bm.deallocate(a)                            # 0 and 1 free, still hashed
    b = seq_of(list(range(8)) + [40])           # hits 0 and 1, needs a third block: none left
    assert bm.num_free_blocks == 2 and other.block_table == [2]
    assert not bm.can_allocate(b)


def test_fully_cached_prompt_still_computes_last_block():
    """Upstream #114: a prompt that is an exact multiple of the block size, submitted twice, must not be
    fully cached — the block holding its last token is recomputed, so at least one token is computed."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(8))
    b = seq_of(range(8))
    bm.allocate(b)
    assert b.num_computed_tokens == 4
    assert len(b) - b.num_computed_tokens >= 1
    assert b.block_table == [0, 2]
    assert refs(bm)[:3] == [2, 1, 1]
    bm.deallocate(a)
    bm.deallocate(b)
    c = seq_of(range(8))
    bm.allocate(c)
    assert c.num_computed_tokens == 4 and len(c) - c.num_computed_tokens == 4


def test_one_block_prompt_is_never_a_hit():
    """Upstream #114: a single-block prompt seen before is recomputed (its only block holds the last token)."""
    bm = BlockManager(8, BS)
    admit(bm, range(4))
    b = seq_of(range(4))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and b.block_table == [1]


def test_reused_block_drops_its_old_hash():
    """Upstream #163: when a freed block is reused for other tokens its old hash entry is dropped,
    so resubmitting the old prefix gets no false hit."""
    bm = BlockManager(3, BS)
    a = admit(bm, range(9))
    old_hashes = {bm.blocks[0].hash, bm.blocks[1].hash}
    bm.deallocate(a)
    assert free_order(bm) == [2, 1, 0]
    b = admit(bm, range(100, 112))      # reuses 2, 1, 0 for other tokens
    assert b.block_table == [2, 1, 0]
    assert not old_hashes & set(bm.hash_to_block_id)
    for block_id, i in zip(b.block_table, range(3), strict=True):
        assert bm.blocks[block_id].token_ids == b.block(i)
    bm.deallocate(b)
    c = seq_of(range(9))
    bm.allocate(c)
    assert c.num_computed_tokens == 0


def test_reused_block_as_partial_block_drops_its_old_hash():
    """Upstream #163: a freed hashed block reused as a sequence's partial last block no longer hits."""
    bm = BlockManager(2, BS)
    a = admit(bm, range(5))              # block 0 hashed, block 1 partial
    bm.deallocate(a)
    assert free_order(bm) == [1, 0]
    b = seq_of([70, 71, 72, 73, 74, 75])
    bm.allocate(b)                       # takes 1, then 0 (as b's partial block, not yet computed)
    assert b.block_table == [1, 0]
    assert bm.hash_to_block_id == {}
    bm.deallocate(b)
    c = seq_of(range(5))
    bm.allocate(c)
    assert c.num_computed_tokens == 0


def test_deallocate_forget_drops_hashes_of_freed_blocks():
    """deallocate(forget=True) (used by abort) drops the hashes of blocks it frees: no later hit."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(10))
    bm.deallocate(a, forget=True)
    assert bm.hash_to_block_id == {}
    assert all(b.hash == -1 and b.token_ids == [] for b in bm.blocks)
    b = seq_of(range(10))
    bm.allocate(b)
    assert b.num_computed_tokens == 0


def test_deallocate_forget_keeps_hashes_of_blocks_still_shared():
    """forget only affects blocks that become free; a block another sequence still holds keeps its hash."""
    bm = BlockManager(8, BS)
    a = admit(bm, range(10))
    keeper = admit(bm, list(range(8)) + [60])
    bm.deallocate(a, forget=True)
    assert set(bm.hash_to_block_id.values()) == {0, 1}
    assert keeper.block_table[:2] == [0, 1]


# -- decode-time append -----------------------------------------------------------------------------------
def test_decode_append_adds_block_exactly_when_needed():
    """A new block is needed exactly when the appended token is the first of a block."""
    bm = BlockManager(8, BS)
    seq = admit(bm, range(8))
    assert not bm.needs_new_block(seq)
    append(seq, 1)                  # 9th token starts block 2
    assert bm.needs_new_block(seq) and bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0, 1, 2]
    for n in range(10, 13):              # tokens 10..12 fill block 2
        append(seq, 1)
        assert not bm.needs_new_block(seq)
        bm.may_append(seq)
        assert seq.block_table == [0, 1, 2], n
    append(seq, 1)                  # 13th token starts block 3
    bm.may_append(seq)
    assert seq.block_table == [0, 1, 2, 3]


def test_can_append_needs_a_free_block_only_at_block_boundary():
    """With no free block, appending is possible inside a block but not across a boundary."""
    bm = BlockManager(2, BS)
    seq = admit(bm, range(7))
    append(seq, 1)                  # 8 tokens: still fits block 1
    assert bm.num_free_blocks == 0 and bm.can_append(seq)
    bm.may_append(seq)
    assert seq.block_table == [0, 1]
    append(seq, 1)                  # 9 tokens: needs block 2
    assert not bm.can_append(seq)


def test_decode_append_takes_oldest_free_block_and_drops_its_hash():
    """The appended block comes from the head of the free list and loses any old hash (#163)."""
    bm = BlockManager(4, BS)
    old = admit(bm, range(9))
    bm.deallocate(old)                   # free order 3, 2, 1, 0 (0 and 1 hashed)
    seq = admit(bm, range(100, 104))     # takes 3
    bm.allocate(other := seq_of(range(200, 206)))  # takes 2, 1
    assert (seq.block_table, other.block_table) == ([3], [2, 1])
    append(seq, 5)
    bm.may_append(seq)
    assert seq.block_table == [3, 0]
    assert 0 not in bm.hash_to_block_id.values()
    assert bm.blocks[0].hash == -1

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


def compute_block_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    """Chained hash of a full block: depends on the previous block's hash and this block's tokens."""
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []

    def set_hash(self, h: int, token_ids: list[int]) -> None:
        self.hash = h
        self.token_ids = token_ids


class BlockManager:
    """A fixed pool of KV-cache blocks with reference counts and prefix caching.

    Full blocks are keyed by a chained hash; a freed block keeps its hash (and stays findable) until the
    free list hands it out again. Free blocks are reused oldest-freed first.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered set, oldest first
        self.used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    # -- block pool -------------------------------------------------------------------------------------
    def _take_block(self, block_id: int) -> Block:
        del self.free_block_ids[block_id]
        self.used_block_ids.add(block_id)
        block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def _take_free_block(self) -> Block:
        block = self._take_block(next(iter(self.free_block_ids)))
        self._forget_hash(block)  # reused for other tokens: its old hash must no longer hit (#163)
        return block

    def _forget_hash(self, block: Block) -> None:
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.set_hash(-1, [])

    def _release_block(self, block_id: int, forget: bool = False) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if forget:
                self._forget_hash(block)
            self.used_block_ids.remove(block_id)
            self.free_block_ids[block_id] = None

    # -- prefix cache -----------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids caching the longest run of seq's leading full blocks. The block holding the last
        token is never matched, so at least one token is always computed (#114)."""
        hits, h = [], -1
        for i in range((seq.num_tokens - 1) // self.block_size):
            token_ids = seq.block(i)
            h = compute_block_hash(token_ids, h)
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the hashes of seq's blocks that are full within its first num_tokens tokens (every one of them
        known, and computed or written by a step already launched: any later reader runs after it)."""
        start = seq.num_hashed_blocks
        h = self.blocks[seq.block_table[start - 1]].hash if start else -1
        for i in range(start, num_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                token_ids = seq.block(i)
                block.set_hash(compute_block_hash(token_ids, h), token_ids)
                self.hash_to_block_id[block.hash] = block.block_id
            h = block.hash
            seq.num_hashed_blocks = i + 1

    # -- sequences --------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        """Whether seq's blocks fit the free ones now, sharing its cached prefix blocks (`hits`: match_prefix's
        answer when the caller has it, so an admission hashes the prompt once)."""
        hits = self.match_prefix(seq) if hits is None else hits
        hits_in_use = sum(b in self.used_block_ids for b in hits)
        return self.num_free_blocks >= seq.num_blocks - hits_in_use

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give seq blocks for all its tokens, sharing cached prefix blocks (`hits`: match_prefix's answer, taken
        with nothing changed since); sets num_computed_tokens."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        hits = self.match_prefix(seq) if hits is None else hits
        for block_id in hits:
            if block_id in self.used_block_ids:
                self.blocks[block_id].ref_count += 1
            else:
                self._take_block(block_id)
            seq.block_table.append(block_id)
        for _ in range(len(hits), seq.num_blocks):
            seq.block_table.append(self._take_free_block().block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)

    def deallocate(self, seq: Sequence, forget: bool = False) -> None:
        """Release seq's blocks, last block first so shared prefixes stay cached longest.
        forget=True also drops the hashes of blocks that become free (their contents are not trusted)."""
        for block_id in reversed(seq.block_table):
            self._release_block(block_id, forget)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
        seq.num_scheduled_tokens = 0

    def needs_new_block(self, seq: Sequence) -> bool:
        return len(seq.block_table) < seq.num_blocks

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= int(self.needs_new_block(seq))

    def may_append(self, seq: Sequence) -> None:
        """Decode: make sure the block for seq's last token exists."""
        if self.needs_new_block(seq):
            seq.block_table.append(self._take_free_block().block_id)

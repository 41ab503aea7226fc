"""The pure-torch paged attention (kernels/torch_attention.py) against naive dense causal attention in
float64, plus the per-step context's lifetime (utils/context.py).

Caches are NaN-poisoned: every slot that a sequence has not written (unused blocks, the tail of its last
block, keys past a chunk's end) holds NaN, so any read outside the valid keys shows up in the output.
"""
import pytest
import torch

from nanovllm.kernels.torch_attention import decode_attention_torch, store_kvcache_torch, varlen_attention_torch

BLOCK = 16
D = 16
NAN = float("nan")


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive float64 attention of q [Lq, H, D] over k, v [Lk, Hkv, D]; query i sits at key position
    Lk - Lq + i (bottom-right aligned) and sees keys up to and including it. Query head h uses kv head
    h // (H // Hkv), as HF's repeat_kv."""
    lq, h, _ = q.shape
    lk, hkv, _ = k.shape
    k = k.double().repeat_interleave(h // hkv, dim=1)
    v = v.double().repeat_interleave(h // hkv, dim=1)
    out = torch.empty(lq, h, q.shape[-1], dtype=torch.float64)
    for i in range(lq):
        visible = lk - lq + i + 1
        s = torch.einsum("hd,khd->hk", q[i].double(), k[:visible]) * scale
        out[i] = torch.einsum("hk,khd->hd", torch.softmax(s, dim=-1), v[:visible])
    return out


class Paged:
    """Full K/V of several sequences, with a NaN-poisoned paged cache whose blocks are shuffled."""

    def __init__(self, lens: list[int], heads: int, kv_heads: int, seed: int, spare_blocks: int = 3,
                 dtype: torch.dtype = torch.float32) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.lens, self.heads, self.kv_heads, self.dtype = lens, heads, kv_heads, dtype
        need = [-(-n // BLOCK) for n in lens]
        num_blocks = sum(need) + spare_blocks
        perm = torch.randperm(num_blocks, generator=self.g).tolist()
        self.tables = [[perm.pop() for _ in range(b)] for b in need]
        width = max(max(need), 1)
        self.block_table = torch.tensor([t + [-1] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        shape = (num_blocks, BLOCK, kv_heads, D)
        self.k_cache = torch.full(shape, NAN, dtype=dtype)
        self.v_cache = torch.full(shape, NAN, dtype=dtype)
        self.k = [self.randn(n, kv_heads, D) for n in lens]
        self.v = [self.randn(n, kv_heads, D) for n in lens]

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g).to(self.dtype)

    def slots(self, i: int, start: int, end: int) -> list[int]:
        return [self.tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]

    def store(self, i: int, start: int, end: int) -> None:
        """Write positions [start, end) of sequence i through store_kvcache_torch."""
        slots = torch.tensor(self.slots(i, start, end), dtype=torch.int32)
        store_kvcache_torch(self.k[i][start:end], self.v[i][start:end], self.k_cache, self.v_cache, slots)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "NaN from an unused cache slot leaked into the output"
    atol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def run_prefill(paged: Paged, starts: list[int], ends: list[int], seed: int = 0) -> None:
    """Sequence i has its first starts[i] tokens cached; the step computes tokens [starts[i], ends[i])
    (keys run to ends[i]). Stores the step's K/V, attends, and compares with dense attention."""
    scale = D ** -0.5
    for i, s in enumerate(starts):
        paged.store(i, 0, s)  # the cached prefix, written by earlier steps
    qs = [paged.randn(e - s, paged.heads, D) for s, e in zip(starts, ends, strict=True)]
    new_k = torch.cat([paged.k[i][s:e] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])
    new_v = torch.cat([paged.v[i][s:e] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])
    slots = torch.tensor(sum((paged.slots(i, s, e) for i, (s, e) in enumerate(zip(starts, ends, strict=True))), []),
                         dtype=torch.int32)
    store_kvcache_torch(new_k, new_v, paged.k_cache, paged.v_cache, slots)
    cu_q = torch.tensor([0] + [e - s for s, e in zip(starts, ends, strict=True)]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + ends).cumsum(0).to(torch.int32)
    out = varlen_attention_torch(torch.cat(qs), paged.k_cache, paged.v_cache, cu_q, cu_k, paged.block_table, scale)
    ref = torch.cat([dense_causal(q, paged.k[i][:e], paged.v[i][:e], scale)
                     for i, (q, e) in enumerate(zip(qs, ends, strict=True))])
    check(out, ref, paged.dtype)


# ----------------------------------------------------------------------------------------------
# store_kvcache
# ----------------------------------------------------------------------------------------------

def test_store_writes_slots_and_skips_minus_one():
    """Each token's K/V lands at its slot (block slot // B, offset slot % B); slot -1 is skipped."""
    k_cache = torch.full((4, BLOCK, 2, D), NAN)
    v_cache = torch.full((4, BLOCK, 2, D), NAN)
    key, value = torch.randn(3, 2, D), torch.randn(3, 2, D)
    store_kvcache_torch(key, value, k_cache, v_cache, torch.tensor([37, -1, 5], dtype=torch.int32))
    assert torch.equal(k_cache[2, 5], key[0]) and torch.equal(v_cache[2, 5], value[0])
    assert torch.equal(k_cache[0, 5], key[2]) and torch.equal(v_cache[0, 5], value[2])
    assert torch.isnan(k_cache).flatten(0, 1).all(dim=(1, 2)).sum() == 4 * BLOCK - 2


# ----------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
def test_plain_prefill(heads, kv_heads):
    """Whole prompts in one step (q_len == k_len), mixed lengths incl. 1 token and block multiples."""
    lens = [1, 16, 17, 45, 32]
    run_prefill(Paged(lens, heads, kv_heads, seed=1), [0] * len(lens), lens)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_prefix_cached_prefill(heads, kv_heads):
    """Prefix-cache hits: k_len > q_len, the causal mask is bottom-right aligned."""
    lens = [33, 40, 17, 64]
    run_prefill(Paged(lens, heads, kv_heads, seed=2), [32, 16, 16, 48], lens)


def test_chunked_prefill_keys_end_at_the_chunk():
    """A chunk in the middle of a prompt: keys run to the chunk's end only (#212); the rest of the prompt
    is still NaN in the cache and must not be read."""
    lens = [50, 70, 20]
    run_prefill(Paged(lens, 8, 2, seed=3), [7, 32, 0], [30, 39, 13])


def test_prefill_with_one_token_queries():
    """Prefill rows of a single query over a long cached prefix (a recompute's last token)."""
    lens = [20, 49]
    run_prefill(Paged(lens, 4, 2, seed=4), [19, 48], lens)


def test_prefill_bf16_inputs():
    """bf16 cache and queries: fp32 math inside, output in bf16, close to the float64 reference."""
    lens = [9, 33]
    run_prefill(Paged(lens, 4, 2, seed=5, dtype=torch.bfloat16), [0, 16], lens)


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
def test_decode(heads, kv_heads):
    """One query per sequence over its context_lens cached keys (the new token included)."""
    lens = [1, 16, 17, 50, 33]
    paged = Paged(lens, heads, kv_heads, seed=6)
    for i, n in enumerate(lens):
        paged.store(i, 0, n)
    q = paged.randn(len(lens), heads, D)
    scale = D ** -0.5
    out = decode_attention_torch(q, paged.k_cache, paged.v_cache, torch.tensor(lens, dtype=torch.int32),
                                 paged.block_table, scale)
    ref = torch.cat([dense_causal(q[i:i + 1], paged.k[i], paged.v[i], scale) for i in range(len(lens))])
    check(out, ref)


def test_decode_padded_rows_are_zero():
    """Padding rows (context_len 0, block table all -1) produce zeros and leave real rows intact."""
    lens = [20, 5]
    paged = Paged(lens, 4, 2, seed=7)
    for i, n in enumerate(lens):
        paged.store(i, 0, n)
    table = torch.cat([paged.block_table, torch.full((2, paged.block_table.shape[1]), -1, dtype=torch.int32)])
    q = paged.randn(4, 4, D)
    q[2:] = NAN  # whatever a padded row holds must not matter
    context_lens = torch.tensor(lens + [0, 0], dtype=torch.int32)
    out = decode_attention_torch(q, paged.k_cache, paged.v_cache, context_lens, table, D ** -0.5)
    assert torch.equal(out[2:], torch.zeros(2, 4, D))
    ref = torch.cat([dense_causal(q[i:i + 1], paged.k[i], paged.v[i], D ** -0.5) for i in range(2)])
    check(out[:2], ref)

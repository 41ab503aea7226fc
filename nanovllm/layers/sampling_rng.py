"""Counter-based random numbers for seeded sampling: each draw is a pure hash of (seed, position, vocab
index), computed with batched integer tensor ops, so a seeded request samples the same tokens whatever else is
in the batch, with no torch.Generator per request and no host sync.

Arithmetic is on int64 tensors holding 32-bit values; multiplications split the constant into 16-bit halves so
no product leaves the signed 64-bit range (signed overflow is not something to rely on)."""
import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive counters apart


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons' hash-prospector): a bijection on 32-bit values with strong avalanche."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def value_hash(value: torch.Tensor) -> torch.Tensor:
    return mix32(mul32(value & MASK32, GOLDEN) ^ 0x5BD1E995)


def combine(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return mix32(key ^ value_hash(value))


def cell_bits(keys: torch.Tensor, column_hash: torch.Tensor) -> torch.Tensor:
    """32 random bits per (row, vocab index) from a row key and a column hash, both full-avalanche hashes already:
    a lighter mix (two multiplies, one xor-shift) than mix32, since this one runs once per logit."""
    x = mul32(keys ^ column_hash, 0x7FEB352D)
    return mul32(x ^ (x >> 15), 0x846CA68B)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from a 64-bit seed (int64, any sign) and the position being sampled."""
    key = mix32(seeds & MASK32)
    key = combine(key, (seeds >> 32) & MASK32)
    return combine(key, positions)


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] float32 uniforms in (0, 1): 23 hashed bits, centred so neither end is reached."""
    keys = row_keys(seeds, positions).unsqueeze(1)
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = cell_bits(keys, value_hash(cols))
    return ((bits >> 9).float() + 0.5) * (2.0 ** -23)


def seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] Exp(1) draws, a pure function of (seed, position, vocab index)."""
    return -torch.log(seeded_uniform(seeds, positions, vocab_size))


def seed_to_int64(seed: int) -> int:
    """Any Python int, taken modulo 2**64, as a signed 64-bit value (the int64 tensor's range)."""
    return (seed + 2**63) % 2**64 - 2**63

"""The Sampler layer: temperature 0 is argmax, temperature > 0 draws from softmax(logits / T), reproducibly for
the rows' RNG seeds. Statistical checks use many rows (one draw per row, each with its own seed) of a 5-token
vocabulary and fixed seeds, so they are deterministic; the bounds sit far (>= 6 sigma) from the expected deviation."""
import pytest
import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors

LOGITS = torch.tensor([2.0, 1.0, 0.5, -0.5, -3.0])
DRAWS = 100_000
CHI2_BOUND = 40.0  # chi-square with 4 degrees of freedom: P(X > 40) ~ 4e-8
MAX_ABS_DEV = 0.01  # std of a frequency is <= 0.0016 at 100k draws


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def params(temperatures: torch.Tensor, seed: int = 0) -> SamplingTensors:
    """One RNG seed per row, drawn from `seed` (as the engine draws one per unseeded request)."""
    n = temperatures.shape[0]
    seeds = torch.randint(-2**62, 2**62, (n,), generator=torch.Generator().manual_seed(seed))
    return SamplingTensors(temperatures=temperatures, seeds=seeds, positions=torch.zeros(n, dtype=torch.int64),
                           all_greedy=not temperatures.any())


def draw(logits: torch.Tensor, temperature: float, n: int = DRAWS, seed: int = 0) -> torch.Tensor:
    return Sampler()(logits.expand(n, -1).clone(), params(torch.full((n,), temperature), seed))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_scaled_logits(temperature):
    """Token frequencies over many draws match softmax(logits / T) (chi-square and max-abs bounds)."""
    tokens = draw(LOGITS, temperature)
    probs = torch.softmax(LOGITS.double() / temperature, dim=-1)
    assert chi_square(tokens, probs) < CHI2_BOUND
    assert (frequencies(tokens, 5) - probs).abs().max() < MAX_ABS_DEV


def test_frequencies_reject_wrong_temperature():
    """Sanity of the statistic: draws at T=1 are clearly distinguishable from softmax(logits / 2)."""
    tokens = draw(LOGITS, 1.0)
    assert chi_square(tokens, torch.softmax(LOGITS.double() / 2.0, dim=-1)) > 10 * CHI2_BOUND


def test_sampling_is_reproducible_for_the_same_seeds():
    """The same row seeds give the same draws; different seeds give different ones."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    temps = torch.full((64,), 0.8)
    a = Sampler()(logits, params(temps, 7))
    b = Sampler()(logits, params(temps, 7))
    c = Sampler()(logits, params(temps, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_temperature_zero_is_argmax():
    """temperature 0 returns the argmax of each row, whatever the seed."""
    logits = torch.randn(128, 40, generator=torch.Generator().manual_seed(1))
    for seed in (0, 1):
        assert torch.equal(Sampler()(logits, params(torch.zeros(128), seed)), logits.argmax(dim=-1))


def test_tiny_temperature_is_greedy_and_finite():
    """A very small positive temperature behaves like argmax (no NaN from the scaling)."""
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(2)) * 5
    temps = torch.full((64,), 1e-6)
    assert torch.equal(Sampler()(logits, params(temps)), logits.argmax(dim=-1))


def test_mixed_temperatures_in_one_batch():
    """One batch mixing T=0, 0.5 and 2.0 rows (interleaved, different logits per group): greedy rows
    are argmax, each sampled group follows its own softmax(logits / T)."""
    n = 60_000
    other = torch.tensor([-1.0, 0.0, 3.0, 0.5, 1.0])
    group = torch.arange(n) % 3                     # 0: greedy on LOGITS, 1: T=0.5 on LOGITS, 2: T=2 on other
    logits = torch.where((group == 2).unsqueeze(1), other, LOGITS)
    temps = torch.tensor([0.0, 0.5, 2.0])[group]
    tokens = Sampler()(logits, params(temps, 3))
    assert (tokens[group == 0] == LOGITS.argmax()).all()
    for g, base, t in ((1, LOGITS, 0.5), (2, other, 2.0)):
        probs = torch.softmax(base.double() / t, dim=-1)
        sampled = tokens[group == g]
        assert chi_square(sampled, probs) < CHI2_BOUND
        assert (frequencies(sampled, 5) - probs).abs().max() < MAX_ABS_DEV * 1.8  # 20k draws per group


def test_half_precision_logits_are_sampled_in_float32():
    """bf16 logits are accepted (upcast) and greedy still picks the argmax."""
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = Sampler()(logits, params(torch.zeros(16)))
    assert torch.equal(out, logits.float().argmax(dim=-1))

"""Upstream nano-vllm's bench.py workload, shared by bench.py and the benchmark scripts."""
from random import randint, seed

from nanovllm.sampling_params import SamplingParams

MAX_PROMPT_TOKEN_ID = 10000  # prompt ids are drawn from [0, 10000]: the model needs a vocabulary over 10,000 ids


def make_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
                  rng_seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Upstream's draws, in upstream's order: every prompt first, then every request's max_tokens."""
    seed(rng_seed)
    prompt_token_ids = [[randint(0, MAX_PROMPT_TOKEN_ID) for _ in range(randint(100, max_input_len))]
                        for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
                       for _ in range(num_seqs)]
    return prompt_token_ids, sampling_params

import numbers
from dataclasses import dataclass

GREEDY_EPS = 1e-5  # temperatures below this sample greedily (as vLLM)
MAX_LOGPROBS = 20  # the most top logprobs a request may ask for (as vLLM's default max_logprobs)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings, with vLLM's meanings.

    temperature: 0 (or anything below 1e-5) = greedy. top_k: keep the k most likely tokens (0 or -1 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p, including the token that
    crosses it (1 = off).
    min_p: drop tokens less likely than min_p times the most likely one (0 = off). Filters apply in vLLM's
    order: temperature, min_p, top_k, top_p. seed: per-request reproducible sampling, independent of the batch
    (any int, taken modulo 2**64); None draws from the global torch RNG. stop: strings that end the completion;
    the text stops before the first one and excludes it, while token_ids keep every generated token up to and
    including the one that completed it (as vLLM). stop_token_ids: token ids that end the completion (kept in
    token_ids, like EOS). min_tokens: EOS and stop_token_ids are masked out of sampling, and no stop applies,
    until this many tokens are generated. ignore_eos: EOS does not stop (stop_token_ids still do).
    skip_special_tokens: leave special tokens (e.g. <|im_end|>) out of the text; the text never includes the
    EOS / stop id token that ended the completion. n: independent samples of the prompt (they share its cached
    blocks; with a seed, sample i uses seed + i). logprobs: None, or k >= 0 for the sampled token's log-probability
    plus the k most likely tokens', from the distribution it was sampled from (after min_tokens bans and
    temperature; the raw logits for greedy rows). Integer fields accept numpy integers.
    """
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool) or not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"ignore_eos and skip_special_tokens must be True or False, got {self.ignore_eos!r} and "
                             f"{self.skip_special_tokens!r}")
        self.temperature = float(self.temperature)
        self.top_p, self.min_p = float(self.top_p), float(self.min_p)
        self.max_tokens, self.top_k, self.min_tokens = int(self.max_tokens), int(self.top_k), int(self.min_tokens)
        self.seed = None if self.seed is None else int(self.seed)
        self.n = int(self.n)
        self.logprobs = None if self.logprobs is None else int(self.logprobs)
        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @staticmethod
    def _check_stop(stop) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        return list(stops)

    @staticmethod
    def _check_stop_token_ids(ids) -> list[int]:
        ids = [] if ids is None else ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
        return [int(i) for i in ids]

"""One request's tokens and its place in the KV cache (rank 0 only: workers receive a StepInput, never this)."""
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams

PENDING = -1  # a sampled token whose id is still on the device (overlap scheduling)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """num_computed_tokens: leading tokens whose K/V are in the cache or are written by a step already launched.
    num_scheduled_tokens: tokens the step being built computes, from num_computed_tokens on (0 between steps).
    A step that reaches the end of the sequence samples its next token; until the host has read it back, that
    token is PENDING in token_ids (num_pending of them, always the last ones)."""
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams | None = None, block_size: int = 256,
                 sampling_seed: int = 0) -> None:
        self.seq_id = next(Sequence.counter)
        self.request_id = self.seq_id  # the request it samples for (n > 1: one request, n sequences)
        self.index = 0  # which of the request's samples
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_pending = 0
        self.last_sample_row = -1  # row of this sequence in the latest launched step that samples for it
        self.num_computed_tokens = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.num_scheduled_tokens = 0
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.sampling_seed = sampling_seed  # the counter RNG's key: the request's seed, or one drawn for it
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens, pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_known_tokens]

    @property
    def num_blocks(self) -> int:
        return -(-len(self.token_ids) // self.block_size)

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    @property
    def samples_this_step(self) -> bool:
        """True when the step being built reaches the end of the sequence, so its last position yields a token."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self.token_ids)

    def scheduled_token_ids(self) -> list[int]:
        start = self.num_computed_tokens
        return self.token_ids[start:start + self.num_scheduled_tokens]

    def add_pending(self) -> int:
        """Reserve the place of the token this step samples; returns its index."""
        self.token_ids.append(PENDING)
        self.num_pending += 1
        return len(self.token_ids) - 1

    def resolve(self, index: int, token_id: int) -> None:
        """The pending token at index was sampled as token_id."""
        self.token_ids[index] = token_id
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget tokens still pending (the sequence finished; later steps' samples are discarded)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0
        self.last_sample_row = -1  # no launched step samples for it any more

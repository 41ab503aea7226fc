from collections import deque
from collections.abc import Callable

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides what each step computes; a step is either all-prefill or all-decode."""

    def __init__(self, config: Config, num_kvcache_blocks: int,
                 stop_checker: Callable[[Sequence], bool] | None = None) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.stop_checker = stop_checker  # stop strings: True when seq's newest token completed one
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.eos = config.eos
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Prefill first: finish any partly prefilled sequence, then admit waiting sequences while the
        token budget, max_num_seqs and free blocks allow; the last one admitted may be chunked (its key
        length is then the chunk's end, #212). A prefill admission allocates blocks for all the sequence's
        tokens, so chunking never needs more blocks later. Only when no prefill work can be scheduled
        does the step decode: every running sequence gets one token, and when the pool runs out of blocks
        the most recently admitted sequence is preempted back to waiting (it is recomputed later)."""
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled = []
        for seq in self.running:  # a partly prefilled sequence continues first
            if seq.num_cached_tokens < seq.num_tokens - 1 and budget > 0:
                budget -= self._schedule_tokens(seq, budget)
                scheduled.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            if seq.num_completion_tokens == 0:
                seq.num_prefix_cached_tokens = seq.num_cached_tokens
            budget -= self._schedule_tokens(seq, budget)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _schedule_tokens(self, seq: Sequence, budget: int) -> int:
        """Schedule up to budget tokens of seq. The hashes of blocks this step fills are registered now,
        so a later admission in the same step shares them (#219): the forward pass writes every new K/V
        before any attention reads the cache."""
        seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
        self.block_manager.cache_full_blocks(seq, seq.num_cached_tokens + seq.num_scheduled_tokens)
        return seq.num_scheduled_tokens

    def _schedule_decode(self) -> list[Sequence]:
        scheduled = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:  # preemption takes only unscheduled sequences, so a scheduled one keeps its blocks
                self.block_manager.may_append(seq)
                self._schedule_tokens(seq, 1)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> list[Sequence]:
        """Account the step's computed tokens, append sampled ones, finish and free. Returns the
        sequences that finished."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            sampled = seq.samples_this_step
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if not sampled:
                continue
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """The reason seq finishes after token_id, or None: "stop" for EOS (unless ignore_eos), a stop token id
        or a stop string once min_tokens are generated (a stop wins over the length limit in the same step);
        "length" at max_tokens."""
        sp = seq.sampling_params
        if seq.num_completion_tokens >= sp.min_tokens and (
                token_id in sp.stop_token_ids or (not seq.ignore_eos and token_id == self.eos)):
            return "stop"
        if sp.stop and self.stop_checker is not None and self.stop_checker(seq):  # keeps its state current
            return "stop"
        return "length" if seq.num_completion_tokens >= seq.max_tokens else None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a running sequence finished and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        self.running.remove(seq)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop sequences whose step failed; their blocks' contents are not trusted, so forget hashes."""
        for seq in seqs:
            self.block_manager.deallocate(seq, forget=True)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)

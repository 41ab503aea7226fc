"""Batch selection and KV-block accounting. What a finished request returns is the output processor's concern."""
from collections import deque
from dataclasses import dataclass, field

from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.scheduler.block_manager import BlockManager


@dataclass
class ScheduledBatch:
    """One step's sequences; each seq.num_scheduled_tokens says how many of its tokens the step computes."""
    seqs: list[Sequence]
    is_prefill: bool
    num_tokens: int  # tokens the step computes
    sampled_index: list[int] = field(default_factory=list)  # per seq: index of the token it samples, or -1


class Scheduler:
    """Decides what each step computes; a step is either all-prefill or all-decode."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, num_blocks: int, block_size: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """Prefill first: finish any partly prefilled sequence, then admit waiting sequences while the token budget,
        max_num_seqs and free blocks allow; the last one admitted may be chunked (its key length is then the chunk's
        end, GeeeekExplorer/nano-vllm#212). An admission allocates blocks for all the sequence's tokens, so chunking
        never needs more blocks later. Only when no prefill work can be scheduled does the step decode: every
        running sequence that still needs a token gets one, and when the pool runs out of blocks the most recently
        admitted sequence is preempted back to waiting (recomputed later). None when there is nothing to run."""
        seqs = self._schedule_prefill()
        is_prefill = bool(seqs)
        if not is_prefill:
            seqs = self._schedule_decode()
        if not seqs:
            return None
        return ScheduledBatch(seqs, is_prefill, sum(seq.num_scheduled_tokens for seq in seqs))

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled = []
        for seq in self.running:  # a partly prefilled sequence continues first
            if seq.num_computed_tokens < seq.num_tokens - 1 and budget > 0:
                budget -= self._schedule_tokens(seq, budget)
                scheduled.append(seq)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # a preempted sequence's last sample is still on its way back
                break
            hits = self.block_manager.match_prefix(seq)
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.block_manager.allocate(seq, hits)
            if seq.num_completion_tokens == 0:
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            budget -= self._schedule_tokens(seq, budget)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _schedule_tokens(self, seq: Sequence, budget: int) -> int:
        """Schedule up to budget tokens of seq. The hashes of blocks this step fills are registered now, so a later
        admission in the same step shares them (GeeeekExplorer/nano-vllm#219): the forward pass writes every new K/V
        before any attention reads the cache."""
        seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
        end = seq.num_computed_tokens + seq.num_scheduled_tokens
        self.block_manager.cache_full_blocks(seq, min(end, seq.num_known_tokens))
        return seq.num_scheduled_tokens

    def _schedule_decode(self) -> list[Sequence]:
        scheduled, done = [], []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if seq.num_completion_tokens >= seq.sampling_params.max_tokens:
                done.append(seq)  # its last token is still pending: nothing more to compute
                continue
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
        self.running.extendleft(reversed(scheduled + done))
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def launched(self, batch: ScheduledBatch) -> None:
        """The batch's step was handed to the model: its tokens count as computed (a later step reads them after
        this one wrote them), and each sequence it samples from gets a pending slot for the new token."""
        batch.sampled_index = []
        for row, seq in enumerate(batch.seqs):
            samples = seq.samples_this_step
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            batch.sampled_index.append(seq.add_pending() if samples else -1)
            if samples:
                seq.last_sample_row = row

    def resolved(self, seq: Sequence) -> None:
        """A pending token of seq became known: blocks it completes can now be hashed."""
        self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_known_tokens))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and free its blocks (safe while a launched step still reads them: any step that
        reuses a block runs after it on the device)."""
        self._end(seq, reason, forget=False)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop sequences whose step failed or which were cancelled; their blocks' contents are not trusted, so
        their hashes are forgotten."""
        for seq in seqs:
            if not (seq.is_finished and not seq.block_table):
                self._end(seq, "abort", forget=True)

    def _end(self, seq: Sequence, reason: str, forget: bool) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.drop_pending()
        self.block_manager.deallocate(seq, forget)
        self._remove(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

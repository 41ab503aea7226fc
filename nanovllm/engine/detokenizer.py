"""Incremental detokenisation and stop strings, on rank 0.

Each update decodes only the tokens since the last emitted text plus a few tokens of context, and holds text back
while the newest token ends inside a UTF-8 character (a byte-level BPE token may carry part of one). Stop strings
are searched only in the new text plus the previous len(stop) - 1 characters, so a stop string spanning tokens is
found with O(1) work per token."""
from transformers import PreTrainedTokenizerBase

MAX_DECODE_WINDOW = 32  # tokens decoded per update at most (a UTF-8 character spans far fewer)


class IncrementalDetokenizer:
    """The text of one completion as its tokens arrive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = self.read_offset = 0  # into the completion's token ids
        self.pieces: list[str] = []  # emitted text
        self.length = 0
        self.tail = ""  # the last (longest stop - 1) emitted characters
        self.stop_at: int | None = None  # text length before a matched stop string

    @property
    def text(self) -> str:
        text = "".join(self.pieces)
        return text if self.stop_at is None else text[:self.stop_at]

    def update(self, completion: list[int], search_stop: bool) -> str:
        """Feed the completion's token ids so far; returns the new text (up to a matched stop string). When
        search_stop is True and the new text completes a stop string, stop_at is set."""
        delta = self.new_text(completion)
        if not delta:
            return ""
        window, window_start = self.tail + delta, self.length - len(self.tail)
        self.pieces.append(delta)
        self.length += len(delta)
        keep = max((len(s) for s in self.stop), default=1) - 1
        self.tail = window[-keep:] if keep else ""
        if search_stop and self.stop:
            # only occurrences that end in the new text: earlier ones were checked (or fell before min_tokens)
            starts = (window.find(s, max(len(window) - len(delta) - len(s) + 1, 0)) for s in self.stop)
            hits = [i for i in starts if i >= 0]
            if hits:
                self.stop_at = window_start + min(hits)
                return delta[:max(self.stop_at - (self.length - len(delta)), 0)]
        return delta

    def new_text(self, token_ids: list[int]) -> str:
        """Text the tokens since read_offset add, decoded after a few context tokens; empty while the newest token
        ends mid-character or adds no text, unless that has gone on for MAX_DECODE_WINDOW tokens (tokens without
        text: special tokens skipped, ids the tokenizer lacks, as a random-weight model samples): then the window
        moves on, so each update decodes a bounded number of tokens."""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=skip)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=skip)
        waiting = len(full) <= len(prefix) or full.endswith("\ufffd")
        if waiting and len(token_ids) - self.prefix_offset <= MAX_DECODE_WINDOW:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full[len(prefix):]

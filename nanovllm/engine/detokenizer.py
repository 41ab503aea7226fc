"""Incremental detokenisation and stop strings, on rank 0.

Byte-level BPE tokenizers (Qwen, Llama 3, GPT-2 style: a `ByteLevel` decoder) take a fast path: a table from token id
to its bytes, built once per tokenizer, and an incremental UTF-8 decoder, so a token costs a table lookup (equal to the
tokenizer's own decode, which tests check). Other tokenizers decode the tokens since the last emitted text plus a few
tokens of context, holding text back while the newest token ends inside a UTF-8 character. Stop strings are searched
only in the new text plus the previous len(stop) - 1 characters, so a stop string spanning tokens is found with O(1)
work per token."""
import codecs
import json

from transformers import PreTrainedTokenizerBase

MAX_DECODE_WINDOW = 32  # tokens decoded per update at most (a UTF-8 character spans far fewer)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte's stand-in character (printable bytes stand for themselves, the
    others are shifted past 255 so no token holds whitespace or control characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}


def byte_level_table(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> list[bytes] | None:
    """Token id -> the bytes it decodes to, for a tokenizer whose decode is exactly "concatenate the tokens' bytes,
    then UTF-8 with replacement" (a fast tokenizer with a ByteLevel decoder and no clean-up); None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if (json.loads(backend.to_str()).get("decoder") or {}).get("type") != "ByteLevel":
        return None
    char_bytes = {c: bytes([b]) for b, c in byte_level_alphabet().items()}
    added = backend.get_added_tokens_decoder()
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)  # ids need not be dense (special tokens at their model ids)
    for token, token_id in vocab.items():
        if token_id in added and added[token_id].special and skip_special_tokens:
            continue
        table[token_id] = b"".join(char_bytes.get(c) or c.encode() for c in token)
    return table


class IncrementalDetokenizer:
    """The text of one completion as its tokens arrive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], skip_special_tokens: bool,
                 table: list[bytes] | None = None) -> None:
        """table: byte_level_table(tokenizer, skip_special_tokens), for the fast path."""
        self.tokenizer = tokenizer
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
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

    def update(self, completion: list[int], search_stop: bool, start: int = 0, end: int | None = None) -> str:
        """Feed the completion's token ids so far, completion[start:end] (so a sequence's whole token list can be
        passed, bounded by its prompt and its known tokens, without copying); returns the new text (up to a matched
        stop string). When search_stop is True and the new text completes a stop string, stop_at is set."""
        delta = self.new_text(completion, start, len(completion) if end is None else end)
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

    def new_text(self, token_ids: list[int], start: int, end: int) -> str:
        if self.table is None:
            return self.decode_window(token_ids[start:end])
        table, size = self.table, len(self.table)
        new = b"".join(table[t] if 0 <= t < size else b"" for t in token_ids[start + self.read_offset:end])
        self.read_offset = end - start
        return self.utf8.decode(new)

    def decode_window(self, token_ids: list[int]) -> str:
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

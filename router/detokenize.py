"""Incremental detokenization that never splits a character.

Byte-level tokenizers split one multi-byte character (emoji, CJK) over several tokens, and decoding a
prefix of them gives U+FFFD. Decoding each token on its own would stream replacement characters, and
decoding the whole output every step costs O(n) per token. We keep a small window instead (the scheme
of TGI and vLLM): decode the tokens since the last emitted chunk together with the chunk before them
(for context such as a leading space), emit the difference, and hold it back while it ends in U+FFFD.

The concatenation of every chunk plus ``flush()`` equals ``decode(all ids)``: a character still
incomplete when generation ends comes out as U+FFFD, exactly as the tokenizer decodes it.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, one request's worth."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window (first id of the previous emitted chunk)
        self._read = 0  # ids before this have had their text emitted

    def add(self, ids: Sequence[int]) -> str:
        """Appends ids and returns the newly complete text ('' while a character is incomplete)."""
        self._ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever text is still held back (the end of generation)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""  # nothing new yet, or a character is still being spelled out
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


def tokenizer_decoder(tokenizer) -> Decode:
    """A decode function for a Hugging Face tokenizer. Special tokens (the end-of-sequence token) have
    no text; no space clean-up, because it can rewrite text across chunk boundaries."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode

"""Incremental detokenization that never splits a character.

Byte-level tokenizers split one multi-byte character (emoji, CJK) over several tokens, and decoding a
prefix of them gives U+FFFD. Decoding each token on its own would stream replacement characters, and
decoding the whole output every step costs O(n) per token.

A tokenizer with a Rust backend (every "fast" Hugging Face tokenizer) streams with the library's own
``tokenizers.decoders.DecodeStream``: one O(1) step per token, holding bytes back until they complete a
character (StreamDetokenizer). Any other decode function gets a small window instead (the scheme of
TGI and vLLM, IncrementalDetokenizer): decode the tokens since the last emitted chunk together with the
chunk before them (for context such as a leading space), emit the difference, and hold it back while
it ends in U+FFFD: two decodes per token.

Either way the concatenation of every chunk plus ``flush()`` equals ``decode(all ids)``: a character
still incomplete when generation ends comes out as U+FFFD, exactly as the tokenizer decodes it.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class Detokenizer(Protocol):
    """One request's text deltas."""

    def add(self, ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


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


class StreamDetokenizer:
    """Text deltas from the tokenizer library's streaming decoder: O(1) per token."""

    def __init__(self, backend, decode: Decode) -> None:
        self._backend = backend  # a tokenizers.Tokenizer
        self._decode = decode
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters streamed so far

    def add(self, ids: Sequence[int]) -> str:
        """Appends ids and returns the newly complete text ('' while a character is incomplete)."""
        pieces = []
        for token in ids:
            self._ids.append(token)
            piece = self._stream.step(self._backend, token)
            if piece:
                pieces.append(piece)
        text = "".join(pieces)
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """The text still held back (bytes of an incomplete character: U+FFFD, as decode gives them),
        from one decode of the whole output, at its end."""
        if not self._ids:
            return ""
        rest = self._decode(self._ids)[self._emitted :]
        self._emitted += len(rest)
        return rest


class TokenizerDecode:
    """A Hugging Face tokenizer's decode function, and the detokenizer that streams its text. Special
    tokens (the end-of-sequence token) have no text; no space clean-up, because it can rewrite text
    across chunk boundaries."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow tokenizer has none

    def __call__(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def detokenizer(self) -> Detokenizer:
        return StreamDetokenizer(self._backend, self) if self._backend is not None else IncrementalDetokenizer(self)


def tokenizer_decoder(tokenizer) -> TokenizerDecode:
    """The decode function (and streaming detokenizer) for a Hugging Face tokenizer."""
    return TokenizerDecode(tokenizer)


def detokenizer_for(decode: Decode) -> Detokenizer:
    """A request's detokenizer: the tokenizer's streaming one, else the two-decode window over `decode`."""
    return decode.detokenizer() if isinstance(decode, TokenizerDecode) else IncrementalDetokenizer(decode)

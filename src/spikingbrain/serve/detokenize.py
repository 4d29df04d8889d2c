"""Turning generated ids into text deltas as they arrive, and cutting the output at stop strings.

Why not decode each token on its own: byte-level BPE splits one UTF-8 character over several
tokens, and SentencePiece-style decoders drop or add spaces depending on the neighbours. So
we decode a short window of ids *with its left context* and emit only the new suffix, holding
back text that ends in an incomplete character (U+FFFD) until the next token completes it
(the incremental scheme used by vLLM and TGI).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    """Feed ids one by one; ``push(id)`` returns the text that became final.

    ``prefix_offset..read_offset`` is the context window already emitted; the window slides
    forward each time text is emitted, so the cost per token is O(window), not O(length).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if not full.startswith(prefix):
            return self._resync()
        if len(full) == len(prefix):  # nothing visible yet (e.g. a skipped special token)
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _resync(self) -> str:
        """Rare: the decoder rewrote the context (no stable prefix); fall back to decoding all
        ids, which is exact, and restart the window after them."""
        everything = self._decode(self.ids)
        emitted = self._decode(self.ids[:self.read_offset])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return everything[len(emitted):] if everything.startswith(emitted) else ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character is emitted as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else ""


class StopMatcher:
    """Accumulates output text and finds the first stop string.

    ``feed(delta)`` returns ``(safe_text, stopped)``: ``safe_text`` is what may be shown now. Text
    that could be the beginning of a stop string is held back until it is decided, so a stream
    never shows characters that the final (trimmed) answer does not contain.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything received, untrimmed
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) - self._holdback()
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, self.stopped

    def flush(self) -> str:
        """At the end of generation nothing is pending any more: release the held-back tail."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

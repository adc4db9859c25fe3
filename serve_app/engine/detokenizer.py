"""Incremental detokenisation with stop strings, shared by every engine.

Decoding token by token breaks multi-byte UTF-8 (a Chinese character or emoji can span several
byte-level BPE tokens). As vLLM does, we decode a small window of previous tokens plus the new
ones and emit only the text that is complete (no trailing U+FFFD). Text that could be the start of
a stop string is held back until it is clear, so a stop string is never streamed and output is cut
exactly before it.
"""

from __future__ import annotations

from typing import Any, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated token ids; get back the new, final text for each step."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start for decoding context
        self._read_offset = 0  # ids before this are already turned into text
        self._text = ""  # all decoded text so far (not yet cut at stop)
        self._emitted = 0  # characters of _text already returned
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip,
                                clean_up_tokenization_spaces=False)

    def add(self, token_ids: Sequence[int]) -> str:
        """Add tokens and return the text that can be emitted now ('' while incomplete)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: release everything still held back."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):  # an incomplete character at the very end
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            self._text += full[len(prefix):]
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            # search only where a new match could start
            start = max(0, self._emitted - self._hold)
            cut = -1
            for s in self._stop:
                i = self._text.find(s, start)
                if i != -1 and (cut == -1 or i < cut):
                    cut = i
            if cut != -1:
                out = self._text[self._emitted:cut]
                self._emitted = cut
                self.stopped = True
                return out
        end = len(self._text)
        if self._stop and not final:
            # hold back only a suffix that really is a prefix of some stop string
            for k in range(min(self._hold, len(self._text) - self._emitted), 0, -1):
                tail = self._text[-k:]
                if any(s.startswith(tail) for s in self._stop):
                    end = len(self._text) - k
                    break
        out = self._text[self._emitted:end]
        self._emitted = end
        return out

    @property
    def text(self) -> str:
        """Text emitted so far."""
        return self._text[:self._emitted]

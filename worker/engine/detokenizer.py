"""Incremental detokenization and stop-string detection.

Why incremental with a prefix window (as vLLM does): decoding only the new token loses leading spaces and splits
multi-byte characters; decoding the whole output every step is quadratic. We decode a short window that ends at
the new token, and hold text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        ctx = list(prompt_token_ids[-5:])
        self.ids = ctx
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.text = ""
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def flush(self) -> None:
        """At the end of a request, emit text held back for an incomplete character (as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def append(self, token_id: int) -> bool:
        """Adds a token; returns True if a stop string now appears (text is cut before it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if not self.stop:
            return False
        search_from = max(0, old_len - self.max_stop_len + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

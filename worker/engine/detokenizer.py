"""Incremental detokenization and stop-string detection.

Why incremental with a prefix window (as vLLM does): decoding only the new token loses leading spaces and splits
multi-byte characters; decoding the whole output every step is quadratic. With a fast tokenizer we use the Rust
`DecodeStream` (one call per token, seeded with the last prompt tokens); otherwise we decode a short window that
ends at the new token. Either way text is held back while it ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

_CTX = 5  # prompt tokens that seed the window, so the first output token gets its leading space right


def _decode_stream(tokenizer, ctx: list[int]):
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None, None
    try:
        from tokenizers.decoders import DecodeStream

        return backend, DecodeStream(ctx, skip_special_tokens=True)
    except Exception:  # noqa: BLE001 - older tokenizers without prefix ids: use the window path
        return None, None


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None, include_stop: bool = False
    ) -> None:
        """`include_stop`: a matched stop string stays at the end of the text (vLLM's include_stop_str_in_output);
        otherwise the text is cut before it."""
        self.tokenizer = tokenizer
        ctx = list(prompt_token_ids[-_CTX:])
        self.num_ctx = len(ctx)
        self.ids = ctx
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.text = ""
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.include_stop = include_stop
        self.matched: str | None = None  # the stop string that ended the text
        self._backend, self._stream = _decode_stream(tokenizer, ctx)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def flush(self) -> None:
        """At the end of a request, emit text held back for an incomplete character (as U+FFFD)."""
        full = self._decode(self.ids[self.num_ctx :])
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full
        self.prefix_offset = self.read_offset = len(self.ids)

    def decode_all(self, output_ids: list[int]) -> None:
        """The whole output's text at once, for a request that never needed it token by token: the context tokens
        are decoded with it and their text cut off, so the first token keeps its leading space as it would have
        incrementally; an incomplete last character becomes U+FFFD, as `flush` makes it."""
        ctx = self.ids[: self.num_ctx]
        self.ids = ctx + list(output_ids)
        head = self._decode(ctx)
        full = self._decode(self.ids)
        self.text = full[len(head) :] if full.startswith(head) else self._decode(self.ids[self.num_ctx :])
        self.prefix_offset = self.read_offset = len(self.ids)

    def _new_text(self, token_id: int) -> str:
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id) or ""
            except Exception:  # noqa: BLE001 - e.g. an id outside the tokenizer's vocab: fall back for good
                self._stream = None
                self.prefix_offset = max(0, len(self.ids) - 1 - _CTX)
                self.read_offset = len(self.ids) - 1
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Adds a token; returns the stop string that now appears (the text is cut before it, or after it with
        `include_stop`), else None. `check_stop=False` (before min_tokens) only extends the text."""
        self.ids.append(token_id)
        new = self._new_text(token_id)
        if not new:
            return None
        old_len = len(self.text)
        self.text += new
        if not self.stop or not check_stop:
            return None
        search_from = max(0, old_len - self.max_stop_len + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return None
        at, matched = min(hits, key=lambda h: h[0])  # the earliest; the first listed among equals
        self.text = self.text[: at + len(matched)] if self.include_stop else self.text[:at]
        self.matched = matched
        return matched

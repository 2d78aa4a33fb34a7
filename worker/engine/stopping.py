"""When a request stops, why (vLLM's `finish_reason` and `stop_reason`), and the output a step reports for it.

Why its own module: the stop rules are decisions over one sequence and its new token (stop token ids, EOS, stop
strings, min_tokens, max_tokens, the context), the same for the synchronous and the async-scheduled step; the engine
only applies what `check_stop` decides. vLLM's semantics: a token in `stop_token_ids` stops with that id as
`stop_reason`, EOS stops with None, a stop string with the string (cut from the text unless
`include_stop_str_in_output`), and nothing of these ends an output shorter than `min_tokens` (the sampler also keeps
stop tokens from being drawn before it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.worker.engine.sequence import RequestOutput, Sequence, SequenceStatus


@dataclass(frozen=True)
class Stop:
    reason: str  # finish_reason: "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string; None at EOS or length
    by_token: bool = False  # a stop token or EOS: not part of the text
    by_string: bool = False  # the detokenizer cut the text at the string already


def check_stop(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> Stop | None:
    """Whether `token`, just placed at the end of `seq.token_ids`, ends the request; extends the incremental text
    when the request reads text token by token (streaming or stop strings)."""
    p = seq.params
    detok = seq.detokenizer
    may_stop = seq.num_output_tokens >= p.min_tokens
    if may_stop and token in p.stop_token_ids:
        return Stop("stop", token, by_token=True)
    if may_stop and not p.ignore_eos and token in eos_token_ids:
        return Stop("stop", None, by_token=True)
    if detok is not None and reads_text_per_token(seq):
        matched = detok.append(token, check_stop=may_stop)
        if matched is not None:
            return Stop("stop", matched, by_string=True)
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
        return Stop("length")
    return None


def reads_text_per_token(seq: Sequence) -> bool:
    """Text is built token by token for streams and for stop strings; otherwise once, at the end."""
    return seq.params.incremental_text or bool(seq.params.stop)


def finish_text(seq: Sequence, stop: Stop) -> None:
    """The final text of a stopped request: decoded once when it was not built per token (the stop token left
    out), else the held-back tail of an incomplete character flushed (a stop string already cut it)."""
    detok = seq.detokenizer
    if detok is None:
        return
    if not reads_text_per_token(seq):
        out = seq.output_token_ids
        detok.decode_all(out[:-1] if stop.by_token else out)
    elif not stop.by_string:
        detok.flush()


def build_output(seq: Sequence, new: list[int]) -> RequestOutput:
    """What a step reports for `seq`; token ids and logprobs are views of the sequence's growing lists."""
    av = seq.adapter
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=new,
        text=seq.detokenizer.text if seq.detokenizer is not None else "",
        finished=seq.status == SequenceStatus.FINISHED,
        finish_reason=seq.finish_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        lora_name=av.name if av is not None else None,
        lora_version=av.version if av is not None else None,
        all_token_ids=seq.token_ids,
        num_output_tokens=len(seq.token_ids) - seq.num_prompt_tokens,
        stop_reason=seq.stop_reason,
        all_logprobs=seq.logprobs,
    )


def eos_token_ids(hf_config: Any, tokenizer: Any, model_dir: str) -> set[int]:
    """The model's EOS ids: the config's, the tokenizer's and generation_config.json's (models list several)."""
    ids: set[int] = set()
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([e] if isinstance(e, int) else list(e or []))
    return ids

"""OpenAI / vLLM request bodies (pydantic), with the checks that turn unsupported options into a 400.

Why `extra="allow"`: OpenAI SDKs send fields we do not use (`user`, `metadata`, ...); rejecting them would break
ordinary clients. Options that would change the *output* and that we do not implement (logit_bias, tools, guided
decoding, prompt logprobs, ...) are refused explicitly instead of being silently ignored. Penalties use the OpenAI
names and ranges (presence/frequency in [-2, 2]) plus vLLM's `repetition_penalty` in (0, 10]; the engine applies
them, and vLLM's `min_tokens` and `include_stop_str_in_output`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs (worker/engine/logprobs.py)
MAX_CHOICES = 128  # prompts x n in one request: each choice is an engine request


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# vLLM / OpenAI options that change the output and that the engine does not implement: any value other than the
# "off" ones listed is a 400 naming the option (ignoring it would return a 200 that is not what was asked)
UNIMPLEMENTED: dict[str, tuple] = {
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "chat_template": (None,),
    "min_p": (None, 0, 0.0),
    "parallel_tool_calls": (None, False),
}


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Body):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for an option we would otherwise silently ignore."""
        for key, value in (self.model_extra or {}).items():
            off = UNIMPLEMENTED.get(key)
            if off is not None and not any(value == o and type(value) is type(o) for o in off if o is not None):
                if value is not None:
                    return key, f"{key} is not supported by this worker"
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            return "stream_options", "stream_options.continuous_usage_stats is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo and self.logprobs is not None:
            # the prompt's logprobs need every prompt position's logits; the engine computes the sampled rows' only
            return "echo", "echo with logprobs (prompt token logprobs) is not supported; send one without the other"
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of other than n is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts in order: a string, a token-id list, or a list of either (one choice block each,
        OpenAI's batched prompts)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if len(p) == 0:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        prompts = list(p)  # type: ignore[arg-type]
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts)} x {self.n}")
        if any(len(x) == 0 for x in prompts if isinstance(x, list)):
            raise ValueError("a token-id prompt must not be empty")
        return prompts


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        if self.tools:
            return "tools", "tools are not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool_choice is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        return super().unsupported()

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """The engine's logprobs count: None without logprobs, else top_logprobs (0 by default)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False

    @field_validator("lora_name", "lora_path")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = ""
    lora_int_id: int | None = None


class TokenizeRequest(_Body):
    """vLLM's `/tokenize`: a `prompt`, or chat `messages` rendered with the model's template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)

"""OpenAI chat completions (`POST /v1/chat/completions`): the request schema, the chat template that
turns `messages` into one prompt, and the response / stream chunk bodies.

Generation itself is the completions path (the same queue, `SamplingParams` and the one loop of
runtimes/decode/loop.py); this module only knows what is chat-specific: roles, the tokenizer's chat
template (a 400 when the tokenizer has none), `max_completion_tokens`, and the `chat.completion.chunk`
stream shape (the role first, then content deltas, then the finish reason, then usage on request).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from runtimes.serve.openai_schema import ChoiceState, Number, bad_request
from runtimes.serve.text import TextModel


class TextPart(BaseModel):
    """A content part; only text parts exist for a text model (an image part is a 422)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(0.0, ge=0.0, le=2.0)  # greedy by default, as /v1/completions here
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None

    def token_budget(self) -> int | None:
        """`max_completion_tokens` (the current name) or `max_tokens` (the deprecated one); None = as
        many as the model leaves. Both given with different values is ambiguous: a 400."""
        a, b = self.max_completion_tokens, self.max_tokens
        if a is not None and b is not None and a != b:
            raise bad_request(f"'max_tokens' ({b}) and 'max_completion_tokens' ({a}) disagree; give one of them")
        return a if a is not None else b

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("'stop' takes at most 4 sequences")
        return tuple(s for s in stops if s)

    def check_supported(self) -> None:
        unsupported = {"n": self.n != 1, "logprobs": bool(self.logprobs) or self.top_logprobs is not None,
                       "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                       "response_format": (self.response_format or {}).get("type", "text") != "text",
                       "presence_penalty": bool(self.presence_penalty),
                       "frequency_penalty": bool(self.frequency_penalty), "logit_bias": bool(self.logit_bias)}
        names = [k for k, bad in unsupported.items() if bad]
        if names:
            raise bad_request(f"unsupported parameter(s) {names}: this server generates one plain-text choice "
                              "without tools, logprobs, penalties or response formats")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def has_chat_template(text: TextModel) -> bool:
    return bool(getattr(text.tokenizer, "chat_template", None))


def render_prompt(text: TextModel, messages: list[ChatMessage], model_id: str) -> list[int]:
    """The token ids of `messages` through the tokenizer's chat template, ending with the assistant's
    turn opened (`add_generation_prompt=True`). The template writes the special tokens itself, so the
    rendered text is encoded without adding any (what `apply_chat_template(tokenize=True)` does)."""
    if not has_chat_template(text):
        raise bad_request(f"model '{model_id}' has no chat template (its tokenizer_config.json / chat_template.jinja "
                          "defines none), so /v1/chat/completions cannot format messages; use /v1/completions "
                          "with a plain prompt", code="no_chat_template")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        rendered = text.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except ImportError as exc:  # jinja2 missing in a minimal install
        raise bad_request(f"the chat template cannot be rendered here: {exc}", code="no_chat_template") from None
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, raise_exception() in templates: user input
        raise bad_request(f"the model's chat template rejected these messages: {exc}", code="invalid_messages") from None
    if not isinstance(rendered, str) or not rendered:
        raise bad_request("the chat template rendered these messages to an empty prompt", code="invalid_messages")
    if text.fast is not None:
        return list(text.fast.encode(rendered, add_special_tokens=False).ids)
    return list(text.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_body(cid: str, model: str, choices: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
    completion_tokens = sum(c.generated for c in choices)
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatChunks:
    """`chat.completion.chunk` bodies of one streamed chat completion, for the shared SSE stream."""

    def __init__(self, cid: str, model: str, include_usage: bool):
        self.cid = cid
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def start(self, index: int) -> list[dict[str, Any]]:
        return [self._chunk(index, {"role": "assistant", "content": ""}, None)]

    def delta(self, index: int, text: str) -> list[dict[str, Any]]:
        return [self._chunk(index, {"content": text}, None)] if text else []

    def finish(self, index: int, rest: str, reason: str) -> list[dict[str, Any]]:
        return [*self.delta(index, rest), self._chunk(index, {}, reason)]

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "system_fingerprint": None, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}]

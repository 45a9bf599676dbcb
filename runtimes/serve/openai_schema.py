"""OpenAI-compatible request bodies, response bodies and errors for /v1/embeddings and /v1/completions
(/v1/chat/completions adds its own in runtimes/serve/chat.py),
plus the per-choice text state of a completion (incremental decoding, stop strings, streaming).

Requests are pydantic models with strict types (a wrong type is a 422); values the model cannot
take (too many tokens, unsupported options) are `APIError`s with status 400.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from runtimes.serve.text import IncrementalDecoder, TextModel

MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request

TextOrTokens = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, error_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.headers = headers or {}
        self.error_id = error_id

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        if self.error_id:
            err["id"] = self.error_id
        return {"error": err}


def bad_request(message: str, code: str | None = None) -> APIError:
    return APIError(400, message, code=code)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: TextOrTokens
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: TextOrTokens
    model: StrictStr | None = None
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(0.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("'stop' takes at most 4 sequences")
        return tuple(s for s in stops if s)

    def check_supported(self) -> None:
        unsupported = {"n": self.n != 1, "echo": self.echo, "logprobs": self.logprobs is not None,
                       "best_of": self.best_of not in (None, 1), "suffix": self.suffix is not None}
        names = [k for k, bad in unsupported.items() if bad]
        if names:
            raise bad_request(f"unsupported parameter(s) {names}: this server generates one choice per prompt "
                              "without logprobs, echo or suffix")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: dict[StrictStr, Any]
    outputs: list[StrictStr] | None = None


def tokenize_inputs(value: Any, text: TextModel, what: str, max_inputs: int = MAX_INPUTS) -> list[list[int]]:
    """OpenAI's four input forms -> token id lists (texts get the model's special tokens). More than
    `max_inputs` items is a 400: the server's per-request cap, never above its queue (--max-queue)."""
    if isinstance(value, str):
        return text.encode([value])
    if not value:
        raise bad_request(f"'{what}' must not be empty")
    if len(value) > max_inputs and not isinstance(value[0], int):
        raise bad_request(f"'{what}' has {len(value)} items; this server takes at most {max_inputs} per request "
                          "(--max-inputs, at most --max-queue): split the request", code="too_many_inputs")
    if isinstance(value[0], str):
        return text.encode(list(value))
    seqs = [list(value)] if isinstance(value[0], int) else [list(v) for v in value]
    for i, seq in enumerate(seqs):
        if not seq:
            raise bad_request(f"'{what}' item {i} is an empty token list")
        if min(seq) < 0 or max(seq) >= text.vocab_size:
            raise bad_request(f"'{what}' item {i} has token ids outside [0, {text.vocab_size})")
    return seqs


def check_lengths(seqs: list[list[int]], limit: tuple[int, str], extra: int = 0, what: str = "input") -> None:
    """400 naming the limit (tokens, its source) when an input (plus `extra` tokens to generate) is too long."""
    most, source = limit
    for i, seq in enumerate(seqs):
        if len(seq) + extra > most:
            more = f" plus max_tokens {extra}" if extra else ""
            raise bad_request(f"{what} {i} has {len(seq)} tokens{more}; this model accepts at most "
                              f"{most} tokens ({source})", code="context_length_exceeded")


def embeddings_body(vectors: list[np.ndarray], model: str, prompt_tokens: int, encoding: str) -> dict[str, Any]:
    def encode(v: np.ndarray) -> Any:
        if encoding == "base64":
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        return v.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, choices: list["ChoiceState"], prompt_tokens: int) -> dict[str, Any]:
    completion_tokens = sum(c.generated for c in choices)
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk_body(cid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


class CompletionChunks:
    """`text_completion` stream bodies of one streamed completion, for the shared SSE stream (the chat
    route has its own, runtimes/serve/chat.py `ChatChunks`, with the same four methods)."""

    def __init__(self, cid: str, model: str):
        self.cid = cid
        self.model = model

    def start(self, index: int) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, text: str) -> list[dict[str, Any]]:
        return [chunk_body(self.cid, self.model, index, text, None)]

    def finish(self, index: int, rest: str, reason: str) -> list[dict[str, Any]]:
        return [chunk_body(self.cid, self.model, index, rest, reason)]

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
        return []


class ChoiceState:
    """Text of one generated choice. `on_token` runs in the batch thread: it decodes incrementally,
    cuts at a stop string, and hands streamable text deltas to `emit` (never text that could still
    turn out to be the start of a stop string)."""

    def __init__(self, index: int, text_model: TextModel, stops: tuple[str, ...], emit=None):
        self.index = index
        self._decoder = IncrementalDecoder(text_model)
        self._stops = stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._emit = emit
        self._text = ""
        self._sent = 0
        self.generated = 0
        self.stopped = False
        self.cancelled = False
        self.finish_reason: str | None = None

    def on_token(self, token: int) -> bool:
        if self.cancelled:
            return False
        self.generated += 1
        self._text += self._decoder.push(token)
        self._apply_stops()
        safe = len(self._text) if self.stopped else max(self._sent, len(self._text) - self._holdback)
        if self._emit is not None and safe > self._sent:
            self._emit(self.index, self._text[self._sent:safe])
        self._sent = max(self._sent, safe)
        return not self.stopped

    def _apply_stops(self) -> None:
        for stop in self._stops:
            cut = self._text.find(stop)
            if cut >= 0:
                self._text = self._text[:cut]
                self.stopped = True

    def finish(self, reason: str) -> str:
        """Record the finish reason; returns the text not yet emitted (including a trailing partial
        character the incremental decoder held back)."""
        self.finish_reason = reason
        if not self.stopped:
            self._text = self._decoder.text
            self._apply_stops()
        rest = self._text[self._sent:]
        self._sent = len(self._text)
        return rest

    @property
    def text(self) -> str:
        return self._text

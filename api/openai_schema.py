"""OpenAI's request and response shapes for the endpoints Corolla serves, as pydantic models.

Requests validate ranges here so a bad parameter becomes a 400 before any
session opens; unknown fields are ignored, as clients send options (`user`,
`logprobs: null`, ...) that do not change what a swarm computes.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    """What every completion object and chunk carries beside its choices."""

    id: str
    object: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionChoice(_Choice):
    text: str


class Completion(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletion(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: Delta


class ChatCompletionChunk(_Response):
    object: str = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "corolla"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

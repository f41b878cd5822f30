"""The OpenAI response objects the server sends, as pydantic models: one place that says what a
chat.completion, a chunk or a text_completion holds (with the nulls OpenAI clients expect), instead of dict
literals in each route.

Fields OpenAI sends only in some cases are left out of the JSON when unset: `usage` on stream chunks (only
with stream_options.include_usage) and `session_id` (only for requests on a persistent session).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: None = None
    session_id: str | None = None  # streamkv: the session the turn was appended to

    def dump(self) -> dict:
        """The JSON object: fields that are optional in OpenAI's schema appear only when they were set."""
        return self.model_dump(exclude={k for k in ("session_id", "usage") if k not in self.model_fields_set})


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict  # {"role", "content"} on the first chunk, {"content"} after, {} on the last
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class TextCompletion(_Response):
    """Both the non-streaming response and the stream chunks of /v1/completions (OpenAI uses one object)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None

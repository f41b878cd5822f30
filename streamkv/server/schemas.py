"""Request bodies (the OpenAI fields we honour, strictly typed) and how validation failures become errors.

Bodies are validated with `model_validate_json` on the raw bytes: malformed JSON, invalid UTF-8, a body that
is not an object and wrong types all become one ValidationError, answered as 400 in OpenAI's error format.
Unknown fields are ignored (OpenAI clients send fields we do not use), fields we cannot honour are refused.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI, but common in local servers
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)  # accepted only as 0 (not implemented)
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    user: str | None = None
    session_id: str | None = None  # streamkv: append this request to a persistent session


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = Field(default=None)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    logprobs: int | None = None


class SessionCreate(_Strict):
    policy: Union[str, dict, None] = None
    system: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)


def parse_body(model: type[BaseModel], body: bytes):
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise BadRequest(f"request body is not valid JSON (or not UTF-8): {err['msg']}", code="invalid_json") from None
        if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
            raise BadRequest("request body must be a JSON object", code="invalid_json") from None
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"invalid value for {param or 'body'}: {err['msg']}", param=param, code="invalid_value") from None

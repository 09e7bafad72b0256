"""The OpenAI-compatible completions API that `passn serve` speaks (pure: parsing, limits, bodies).

    request = parse_completion_request(body, limits, served={"ce-468", "dco-468"})  # or ApiError
    body = completion_body(request_id, request.model, choices, prompt_tokens)

Every rejection is an :class:`ApiError` with the HTTP status and the field (``param``) it concerns,
rendered as OpenAI's error object so that the official client raises the matching exception
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429/503 retried).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request; anything above is refused with 400 naming the field."""

    max_n: int = 256
    max_tokens: int = 1024
    max_prompts: int = 64
    max_logprobs: int = 5
    max_prompt_chars: int = 65536


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class CompletionRequest(BaseModel):
    """The fields of ``POST /v1/completions`` that passn honours; other OpenAI fields are ignored,
    except those whose meaning it cannot honour (``stream``, ``echo``, ``suffix``, ``best_of``),
    which are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_completion_request(body: Any, limits: Limits, served: set[str] | dict[str, Any]) -> CompletionRequest:
    """A validated request, or ApiError (400 naming the field; 404 for a model id not served)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']} (got {first.get('input')!r:.80})", param=param) from None
    for field, value, bound in (("n", request.n, limits.max_n), ("max_tokens", request.max_tokens, limits.max_tokens),
                                ("logprobs", request.logprobs or 0, limits.max_logprobs),
                                ("prompt", len(request.prompts), limits.max_prompts)):
        if value > bound:
            what = "prompts" if field == "prompt" else field
            raise ApiError(400, f"{field}: {what} {value} exceeds this server's limit of {bound}", param=field)
    if any(len(p) > limits.max_prompt_chars for p in request.prompts):
        raise ApiError(400, f"prompt: longer than {limits.max_prompt_chars} characters", param="prompt")
    if request.temperature == 0 and request.n > 1:
        raise ApiError(400, "n: greedy decoding (temperature 0) gives one completion; use n=1", param="n")
    for field, refused in (("stream", request.stream), ("echo", request.echo), ("suffix", request.suffix is not None),
                           ("best_of", request.best_of not in (None, request.n))):
        if refused:
            raise ApiError(400, f"{field}: not supported by this server", param=field)
    if request.model not in served:
        raise ApiError(404, f"model {request.model!r} is not served here; GET /v1/models lists the served ids",
                       param="model", code="model_not_found")
    return request


def token_digest(token: str) -> str:
    """What the server keeps of its bearer token (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(authorization: str | None, digest: str | None) -> None:
    """Raise 401 unless the ``Authorization`` header carries the token (constant-time comparison).
    ``digest`` None means the server runs without authentication."""
    if digest is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", code="invalid_api_key")
    if not hmac.compare_digest(token_digest(token.strip()), digest):
        raise ApiError(401, "invalid bearer token", code="invalid_api_key")


def logprobs_body(tokens: list[str], token_logprobs: list[float], top: list[dict[str, float]] | None,
                  offset0: int = 0) -> dict[str, Any]:
    offsets, at = [], offset0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_body(request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """``choices``: dicts with text, finish_reason, logprobs (or None) and num_tokens, in order."""
    completion_tokens = sum(c.pop("num_tokens") for c in choices)
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def models_body(model_ids: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "passn"}
                                       for m in model_ids]}

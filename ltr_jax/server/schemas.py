"""The HTTP API's request shapes (OpenAI completions / chat completions), their checks, and the error body.

Parsing is pydantic in strict mode (a string where a number belongs is an error, not a coercion) with unknown
top-level fields rejected, as OpenAI does. `APIError` is the one exception type the endpoints raise; it renders
as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body. `format_validation_error` turns pydantic's
error list into one such error whose message names the offending field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------- request models
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's extension: usage so far in every chunk


class SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (0 = off)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # extension: keep generating past end-of-sequence tokens
    user: str | None = None
    # Accepted for compatibility, but only their neutral value is supported.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # e.g. tool_calls/refusal echoed back by clients
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    # OpenAI's pattern; it also keeps names, which the chat template writes as its own text, free of control tokens
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ----------------------------------------------------------------------------------------------- checks
def unsupported_options(req: SamplingRequest) -> None:
    """Reject options this server accepts syntactically but cannot honour."""
    if req.n is not None and req.n != 1:
        raise bad_request(f"n = {req.n} is not supported: this server returns exactly one choice (n = 1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise bad_request(f"{name} = {value} is not supported (only 0)", name, "unsupported_parameter")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo = true is not supported", "echo", "unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
        if req.best_of not in (None, 1):
            raise bad_request(f"best_of = {req.best_of} is not supported (only 1)", "best_of", "unsupported_parameter")
        if req.logprobs not in (None, 0):
            raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
    if isinstance(req, ChatRequest) and (req.logprobs or req.top_logprobs):
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty strings", "stop")
    return tuple(stops)


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """Messages as the chat template wants them (text parts joined; other part types rejected)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}] has type {part.type!r}; only text parts "
                                      f"({{'type': 'text', 'text': ...}}) are supported",
                                      f"messages[{i}].content[{j}].type")
                texts.append(part.text)
            content = "".join(texts)
        if content is None:
            if m.role != "assistant":
                raise bad_request(f"messages[{i}].content is missing; a {m.role} message needs text content",
                                  f"messages[{i}].content")
            content = ""
        msg = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


# ----------------------------------------------------------------------------------------------- validation errors
_EXPECTED = {
    "prompt": "a string or a non-empty list of token ids (integers)",
    "stop": f"a string or a list of up to {MAX_STOP_SEQUENCES} strings",
    "content": "a string or a list of text parts",
}
_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _clean_loc(loc: tuple[Any, ...]) -> list[Any]:
    """Drop FastAPI's 'body' prefix and pydantic's union-branch tags ('str', 'list[int]', ...)."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    return [p for p in parts if isinstance(p, int) or ("[" not in p and p not in _BRANCH_TAGS)]


def _param_name(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def format_validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 error for a pydantic/FastAPI validation failure, naming the first bad field."""
    if not errors:
        return bad_request("invalid request body", None)
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return bad_request(f"the request body is not valid JSON ({detail})", None, "invalid_json")
    parts = _clean_loc(tuple(first.get("loc", ())))
    param = _param_name(parts) or None
    if kind == "missing" and not parts:
        return bad_request("the request body is missing; send a JSON object", None, "missing_body")
    if not parts and kind in ("model_type", "dict_type", "model_attributes_type"):
        return bad_request("the request body must be a JSON object", None, "invalid_type")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    # All errors of a union share the same cleaned location: describe what the field accepts instead.
    same_field = [e for e in errors if _clean_loc(tuple(e.get("loc", ()))) [: len(parts)] == parts]
    leaf = next((p for p in reversed(parts) if isinstance(p, str)), "")
    got = first.get("input")
    got_text = f"got {type(got).__name__} {got!r}" if not isinstance(got, (dict, list)) else f"got {type(got).__name__}"
    if len(got_text) > 100:
        got_text = got_text[:97] + "..."
    if leaf in _EXPECTED and len(same_field) > 1 or leaf in ("prompt", "stop", "content") and kind.endswith("_type"):
        return bad_request(f"invalid value for {param!r}: expected {_EXPECTED[leaf]}, {got_text}", param,
                           "invalid_type")
    msg = first.get("msg", "invalid value")
    return bad_request(f"invalid value for {param!r}: {msg[0].lower() + msg[1:] if msg else msg}, {got_text}",
                       param, "invalid_type" if kind.endswith("_type") else "invalid_value")

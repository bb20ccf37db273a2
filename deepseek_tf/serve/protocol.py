"""Request bodies of the HTTP API (OpenAI's fields, validated strictly) and its error JSON.

Types are strict (a string where a number belongs is a 400, not a conversion); fields
OpenAI defines that this server ignores (`user`, `logit_bias`, ...) are accepted and
ignored. `top_k` is an extra (OpenAI has none; 0 = off).

Example:
    >>> ChatRequest.model_validate({"model": "run", "messages": [
    ...     {"role": "user", "content": "Hi"}], "max_tokens": 8}).max_tokens
    8
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

#: Seeds are int32 in the graph; a request's n-th choice uses seed + n.
MAX_SEED = 2**31 - 1 - 128
MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Sampling(_Body):
    """The options every generating endpoint shares."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: dict | None = None

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class ChatRequest(Sampling):
    """`POST /v1/chat/completions`."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(Sampling):
    """`POST /v1/completions`: one prompt or a list (choice index = prompt * n + k)."""

    model: str
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_N)]]
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class GenerateRequest(_Body):
    """`POST /generate`: the simple endpoint (names as `python -m deepseek_tf.generate`;
    greedy by default)."""

    prompt: str
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    chat: bool = False


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_message(errors: list) -> tuple[str, str | None]:
    """(one line, the first bad field) of pydantic's / FastAPI's validation errors."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    what = e.get("msg", "invalid value")
    return (f"{param}: {what}" if param else what), param

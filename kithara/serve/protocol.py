"""The OpenAI request bodies the server accepts (pydantic models) and its OpenAI-style errors.

Fields the server cannot honour (log probabilities, penalties, tools, ...) are refused with
a 400 error naming them rather than silently ignored; unknown fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# A request's stop strings at most (OpenAI allows 4; more cost nothing here).
MAX_STOP_STRINGS = 16


class OpenAIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status.
        message: what went wrong and how to fix it.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``, ...).
        param: the request field at fault, if one is.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share: the model, sampling and stop settings."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)  # an extra (vLLM's name); 0 or None keeps every token
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # an extra (vLLM's name)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused unless left at their defaults (see ``unsupported``).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise OpenAIError(400, f"At most {MAX_STOP_STRINGS} stop strings, got {len(stops)}.", param="stop")
        if any(s == "" for s in stops):
            raise OpenAIError(400, "Stop strings must not be empty.", param="stop")
        return stops

    def unsupported(self) -> list[str]:
        """Names of the fields set to something this server does not implement."""
        names = [n for n in ("frequency_penalty", "presence_penalty") if getattr(self, n)]
        return names + (["logit_bias"] if self.logit_bias else [])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template

    role: str
    content: str | list[ContentPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates expect it: ``content`` a string (text parts joined)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                kinds = sorted({part.type for part in self.content} - {"text"})
                raise OpenAIError(400, f"Only text content parts are supported, got {kinds}.", param="messages")
            message["content"] = "".join(part.text or "" for part in self.content)
        return message


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported() + (["logprobs"] if self.logprobs else [])
        names += [n for n in ("tools", "functions") if getattr(self, n)]
        names += [n for n in ("tool_choice", "function_call") if getattr(self, n) not in (None, "none", "auto")]
        if self.response_format and self.response_format.get("type", "text") != "text":
            names.append("response_format")
        return names


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids
    or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's legacy default
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [n for n in ("logprobs", "suffix") if getattr(self, n) is not None]
        return names + (["best_of"] if self.best_of not in (None, self.n) else [])

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise OpenAIError(400, "prompt is empty.", param="prompt")
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


FinishReason = Literal["stop", "length"]

"""The ASGI app (FastAPI): OpenAI's ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, plus ``/health`` and ``/stats``.

Every error, including malformed JSON and invalid fields, is answered with OpenAI's error
body and a 4xx/5xx status; an exception in one request never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kithara.serve.engine import Engine, Generated, Sampling
from kithara.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    error_body,
)
from kithara.serve.streaming import StreamMeta, event_stream, merge, stream_choice
from kithara.serve.text import FinishedText, finish_text

logger = logging.getLogger(__name__)


def create_app(
    engine: Engine, *, default_max_tokens: int = 256, stream_segment_tokens: int = 16, log_requests: bool = False
) -> FastAPI:
    """The app serving ``engine.served`` (the engine is started and stopped with the app).

    Args:
        engine: the batching engine around the served model.
        default_max_tokens: completion tokens of a chat request without ``max_tokens`` (capped
            by what ``max_model_len`` leaves).
        stream_segment_tokens: tokens generated per step of a streamed completion (see ``streaming``).
        log_requests: log each request's prompt at INFO.

    Example:
        >>> import uvicorn
        >>> uvicorn.run(create_app(Engine(served)), host="127.0.0.1", port=8000)
    """
    served = engine.served
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kithara", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(error.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(message, code=str(error.status_code)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Request %s %s failed.", request.method, request.url.path)
        body = error_body(f"{type(error).__name__}: {error}", type="server_error")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served.name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, served.name)
        return _model_card(served.name, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        _check_request(request, served.name, engine.max_batch_size)
        messages = [m.as_template_input() for m in request.messages]
        if served.tokenizer.chat_template is None:
            raise OpenAIError(
                400,
                f"The model {served.name!r} has no chat template; use /v1/completions, or serve it with a "
                "tokenizer that has one (--tokenizer).",
            )
        try:
            prompt_ids = list(served.tokenizer.encode_chat(messages, add_generation_prompt=True)[0])
        except Exception as error:  # a template that rejects these messages (roles, order)
            raise OpenAIError(400, f"The chat template failed on these messages: {error}", param="messages") from None
        max_tokens = request.max_completion_tokens or request.max_tokens
        if log_requests:
            logger.info("chat request: %s", json.dumps({"messages": messages, "n": request.n}))
        budget = _completion_budget(engine, prompt_ids, max_tokens, default_max_tokens, "messages")
        stops = request.stop_strings()
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            streams = [
                stream_choice(
                    engine,
                    prompt_ids,
                    budget,
                    _sampling(request),
                    stops,
                    served.tokenizer,
                    index=i,
                    segment_tokens=stream_segment_tokens,
                )
                for i in range(request.n)
            ]
            openers = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(request.n)
            ]
            meta = StreamMeta(response_id, "chat.completion.chunk", served.name, len(prompt_ids), request)
            return event_stream(meta, openers, merge(streams))
        rows = await _generate(engine, prompt_ids, budget, request)
        # Decoding is host work: off the event loop, like generation.
        finished = await asyncio.to_thread(
            lambda: [finish_text(r.token_ids, r.stopped, served.tokenizer, stops) for r in rows]
        )
        usage = _usage(len(prompt_ids), finished)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": f.text},
                "finish_reason": f.finish_reason,
                "logprobs": None,
            }
            for i, f in enumerate(finished)
        ]
        return _response(response_id, "chat.completion", served.name, choices, usage)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Any:
        _check_request(request, served.name, engine.max_batch_size)
        prompts = request.prompts()
        tokenizer = served.tokenizer
        prompt_ids = [tokenizer.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]
        vocab = int(served.model.backbone.vocabulary_size)
        if any(not 0 <= t < vocab for ids in prompt_ids for t in ids):
            raise OpenAIError(400, f"Prompt token ids must be in [0, {vocab}).", param="prompt")
        if log_requests:
            logger.info("completion request: %s", json.dumps({"prompt": prompts, "n": request.n}))
        budgets = [
            _completion_budget(engine, ids, request.max_tokens, default_max_tokens, "prompt") for ids in prompt_ids
        ]
        stops = request.stop_strings()
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        n = request.n
        if request.stream:
            streams = [
                stream_choice(
                    engine,
                    ids,
                    budget,
                    _sampling(request),
                    stops,
                    tokenizer,
                    index=p * n + j,
                    segment_tokens=stream_segment_tokens,
                )
                for p, (ids, budget) in enumerate(zip(prompt_ids, budgets, strict=True))
                for j in range(n)
            ]
            openers = (
                [
                    {"index": i, "text": texts[i // n], "finish_reason": None, "logprobs": None}
                    for i in range(len(streams))
                ]
                if request.echo
                else []
            )
            meta = StreamMeta(response_id, "text_completion", served.name, sum(map(len, prompt_ids)), request)
            return event_stream(meta, openers, merge(streams))
        per_prompt = await asyncio.gather(
            *(_generate(engine, ids, budget, request) for ids, budget in zip(prompt_ids, budgets, strict=True))
        )
        rows = [r for prompt_rows in per_prompt for r in prompt_rows]
        finished = await asyncio.to_thread(
            lambda: [finish_text(r.token_ids, r.stopped, tokenizer, stops) for r in rows]
        )
        echoed = [texts[i // n] if request.echo else "" for i in range(len(rows))]
        usage = _usage(sum(len(ids) for ids in prompt_ids), finished)
        choices = [
            {"index": i, "text": e + f.text, "finish_reason": f.finish_reason, "logprobs": None}
            for i, (f, e) in enumerate(zip(finished, echoed, strict=True))
        ]
        return _response(response_id, "text_completion", served.name, choices, usage)

    return app


# Checks and generation ---------------------------------------------------------------------


def _check_model(name: str, served_name: str) -> None:
    if name != served_name:
        raise OpenAIError(
            404,
            f"The model {name!r} does not exist; this server serves {served_name!r}.",
            param="model",
            code="model_not_found",
        )


def _check_request(request: SamplingFields, served_name: str, max_batch_size: int) -> None:
    _check_model(request.model, served_name)
    unsupported = request.unsupported()
    if unsupported:
        raise OpenAIError(400, f"Not supported by this server: {', '.join(unsupported)}.", param=unsupported[0])
    if request.n > max_batch_size:
        raise OpenAIError(
            400,
            f"n={request.n} is more than this server's max_batch_size={max_batch_size} (--max-batch-size).",
            param="n",
        )
    request.stop_strings()  # checks them before any generation


def _completion_budget(
    engine: Engine, prompt_ids: list[int], max_tokens: int | None, default_max_tokens: int, prompt_field: str
) -> int:
    """The request's ``max_tokens`` (``default_max_tokens`` capped by the room left when unset),
    or a 400 error when the prompt and completion do not fit in ``max_model_len``."""
    limit = engine.served.max_model_len
    if not prompt_ids:
        raise OpenAIError(400, "The prompt has no tokens.", param=prompt_field)
    room = limit - len(prompt_ids)
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, room))
    if room < 1 or len(prompt_ids) + max_tokens > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {prompt_field}, {max_tokens} in "
            f"the completion). Please reduce the length of the {prompt_field} or completion.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    return max_tokens


def _sampling(request: SamplingFields) -> Sampling:
    return Sampling(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=request.seed,
    )


async def _generate(engine: Engine, prompt_ids: list[int], max_tokens: int, request: SamplingFields) -> list[Generated]:
    """Queues the prompt's ``n`` rows and awaits them."""
    return await asyncio.wrap_future(engine.submit(prompt_ids, max_tokens, request.n, _sampling(request)))


def _validation_body(errors: Sequence[Any]) -> dict[str, Any]:
    """OpenAI's answer to a body it cannot use: the first problem, its field as ``param``."""
    first = dict(errors[0]) if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        message = f"We could not parse the JSON body of your request: {first.get('msg', 'invalid JSON')}."
        return error_body(message, param=None, code="invalid_json")
    field = ".".join(location) or None
    message = f"{field + ': ' if field else ''}{first.get('msg', 'invalid request')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return error_body(message, param=field, code=code)


# Responses ---------------------------------------------------------------------------------


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "kithara"}


def _usage(prompt_tokens: int, finished: Sequence[FinishedText]) -> dict[str, int]:
    completion_tokens = sum(f.num_tokens for f in finished)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _response(
    response_id: str, kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }

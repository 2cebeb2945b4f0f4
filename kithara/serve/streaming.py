"""Streaming: a completion generated in segments of a few tokens, each segment's text sent as
soon as it is decoded.

Each segment is one engine request (prompt plus the tokens so far, up to ``segment_tokens``
new ones), so concurrent streams share batches as other requests do, and a stream stops
generating at its first stop token or stop string instead of running to ``max_tokens``. Text
that could be the start of a stop string, or an incomplete UTF-8 character, is held back
until the next segment shows what it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from kithara.serve.engine import Engine, Sampling
from kithara.serve.protocol import FinishReason, SamplingFields, error_body
from kithara.serve.text import finish_text, first_stop

logger = logging.getLogger(__name__)

_SEED_MASK = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """New text of choice ``index``; the last event of a choice has its ``finish_reason`` and
    ``num_tokens`` (its completion tokens, as ``usage`` counts them)."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    num_tokens: int = 0


async def stream_choice(
    engine: Engine,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: Sampling,
    stop: Sequence[str],
    tokenizer: Any,
    *,
    index: int,
    segment_tokens: int,
) -> AsyncIterator[StreamEvent]:
    """One choice's events, generated ``segment_tokens`` at a time.

    A seeded request derives each segment's seed from ``(seed, index, segment)``, so the same
    request streams the same text every time (but not the text it gets unstreamed, which is
    sampled in one call with one key)."""
    generated: list[int] = []
    sent = 0
    hold = max((len(s) for s in stop), default=1) - 1
    segment = 0
    while True:
        seed = sampling.seed
        if seed is not None:
            seed = int(np.random.SeedSequence([seed & _SEED_MASK, index, segment]).generate_state(1)[0])
        rows = await asyncio.wrap_future(
            engine.submit(
                prompt_ids + generated,
                min(segment_tokens, max_tokens - len(generated)),
                1,
                dataclasses.replace(sampling, seed=seed),
            )
        )
        segment += 1
        generated += rows[0].token_ids
        stopped = rows[0].stopped
        text = await asyncio.to_thread(tokenizer.decode, generated, skip_special_tokens=True)
        if stopped or len(generated) >= max_tokens or first_stop(text, stop) is not None:
            final = await asyncio.to_thread(finish_text, generated, stopped, tokenizer, stop)
            yield StreamEvent(index, final.text[sent:], final.finish_reason, final.num_tokens)
            return
        safe = len(text.rstrip("\ufffd")) - hold
        if safe > sent:
            yield StreamEvent(index, text[sent:safe])
            sent = safe


async def merge(streams: Sequence[AsyncIterator[StreamEvent]]) -> AsyncIterator[StreamEvent]:
    """The events of several streams as they come; the first failure cancels the rest and raises."""
    queue: asyncio.Queue[StreamEvent | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as error:
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    running = len(tasks)
    try:
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


@dataclasses.dataclass(frozen=True)
class StreamMeta:
    """What every chunk of one streamed response carries."""

    response_id: str
    kind: str  # "chat.completion.chunk" or "text_completion"
    model: str
    prompt_tokens: int
    request: SamplingFields


def event_stream(
    meta: StreamMeta, openers: list[dict[str, Any]], events: AsyncIterator[StreamEvent]
) -> StreamingResponse:
    """OpenAI's server-sent events: ``data: {chunk}`` per chunk (the ``openers`` first, then one
    per event), a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``. A
    failure after the stream started (status 200 already sent) becomes an error event."""
    chat = meta.kind == "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": meta.response_id,
            "object": meta.kind,
            "created": int(time.time()),
            "model": meta.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        if chat:
            return {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
        return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}

    async def body() -> AsyncIterator[str]:
        for opener in openers:
            yield chunk([opener])
        completion_tokens = 0
        try:
            async for event in events:
                if event.text:
                    yield chunk([choice(event.index, event.text, None)])
                if event.finish_reason is not None:
                    completion_tokens += event.num_tokens
                    yield chunk([choice(event.index, None, event.finish_reason)])
        except Exception as error:
            logger.exception("A streamed request failed.")
            yield f"data: {json.dumps(error_body(f'{type(error).__name__}: {error}', type='server_error'))}\n\n"
            return
        options = meta.request.stream_options
        if options is not None and options.include_usage:
            total = meta.prompt_tokens + completion_tokens
            usage = {"prompt_tokens": meta.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")

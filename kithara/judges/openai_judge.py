"""OpenAIPairwiseJudge: a pairwise judge asking a model behind an OpenAI-compatible API
(OpenAI itself, ``kithara serve``, vLLM, ...), with retries, backoff, timeouts and a
concurrency limit."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from typing import Any

import numpy as np

from kithara.judges.base import BasePairwiseJudge, check_pairs
from kithara.judges.prompts import PAIRWISE_SYSTEM_PROMPT, pairwise_request, parse_pairwise, shuffled_pairs, unflip

logger = logging.getLogger(__name__)

# HTTP statuses worth another try: rate limits and server-side failures.
_RETRY_STATUSES = (408, 409, 429)


class OpenAIPairwiseJudge(BasePairwiseJudge):
    """A pairwise judge that asks a chat model over the OpenAI API (TRL's
    ``OpenAIPairwiseJudge``), through any OpenAI-compatible endpoint (``base_url``).

    Each pair becomes one user message, ``system_prompt`` filled with the prompt and the two
    completions (``kithara.judges.pairwise_request``), sent to ``/chat/completions``; the reply
    is read by ``parse_pairwise`` (a reply naming neither or both completions gives -1, logged
    with the reply). Requests run ``concurrency`` at a time. A connection error, timeout, 429
    or 5xx answer is retried ``max_retries`` times with exponential backoff (``backoff *
    2**attempt`` seconds, at most ``max_backoff``, plus up to 10% jitter); after the last one,
    ``judge`` raises ``ConnectionError`` (endpoint down) or ``RuntimeError`` naming
    ``base_url``. Other errors (an unknown model, a bad request) raise at once.

    As in TRL, at most ``max_requests`` pairs are sent over the judge's life; pairs past it
    get -1 (with one warning).

    Args:
        model: the judge model's name at the endpoint.
        system_prompt: the request template with ``{prompt}``, ``{response0}`` and
            ``{response1}``; default ``PAIRWISE_SYSTEM_PROMPT`` (TRL's).
        max_requests: pairs to send at most (None or <= 0: no limit).
        base_url: the API's base URL (e.g. ``"http://127.0.0.1:8000/v1"`` for ``kithara
            serve``); None is OpenAI's (or ``OPENAI_BASE_URL``).
        api_key_env: the environment variable holding the API key. Required for OpenAI's
            own endpoint; with a ``base_url`` an unset key sends ``"EMPTY"`` (local servers
            ignore it).
        timeout: seconds to wait for one answer.
        max_retries: further tries of a request after a retryable failure.
        backoff: seconds before the first retry (doubling each time).
        max_backoff: the longest wait between tries.
        concurrency: requests in flight at once at most.
        max_tokens: reply tokens (TRL's 1: the prompt asks for the identifier alone).
        temperature: sampling temperature sent with each request (None: the endpoint's default).
        seed: seeds the order shuffling (None: fresh entropy).
        http_client: an ``httpx.Client`` for the ``openai`` client (proxies, custom transports,
            or an in-process app's test client).

    Example:
        >>> judge = OpenAIPairwiseJudge("tiny", base_url="http://127.0.0.1:8000/v1")  # kithara serve
        >>> judge.judge(["What is 2 + 2?"], [["5", "4"]])
        [1]
    """

    def __init__(
        self,
        model: str = "gpt-4-turbo-preview",
        system_prompt: str | None = None,
        max_requests: int | None = 1_000,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        max_tokens: int = 1,
        temperature: float | None = None,
        seed: int | None = None,
        http_client: Any = None,
    ) -> None:
        try:
            import openai
        except ImportError as error:
            raise ImportError(
                "OpenAIPairwiseJudge needs the openai client: pip install 'kithara[serve]' (or openai)."
            ) from error
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, got {concurrency!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        if timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"Need timeout > 0, backoff >= 0, max_backoff >= 0; got {timeout}, {backoff}, {max_backoff}."
            )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}.")
        api_key = os.environ.get(api_key_env)
        if api_key is None:
            if base_url is None and not os.environ.get("OPENAI_BASE_URL"):
                raise ValueError(
                    f"OpenAIPairwiseJudge found no API key: set the environment variable {api_key_env} "
                    "(api_key_env names it), or pass base_url= for an endpoint that needs none."
                )
            api_key = "EMPTY"
        self.model = model
        self.system_prompt = system_prompt or PAIRWISE_SYSTEM_PROMPT
        pairwise_request("", "", "", self.system_prompt)  # check the placeholders now, not at the first judge call
        self.max_requests = max_requests
        self.num_requests = 0
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        # The client's own retries are off: this judge retries, with its own backoff.
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0, http_client=http_client
        )
        self.base_url = str(self.client.base_url)
        self._openai = openai
        self._rng = np.random.default_rng(seed)
        self._warned = False
        self._lock = threading.Lock()

    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[int]:
        """Per prompt, the index (0 or 1) of the better completion of its pair; -1 where the
        reply names neither (or both) or ``max_requests`` is used up.

        Args:
            prompts: the prompts (strings, or chat message lists).
            completions: one pair ``[first, second]`` per prompt (strings or message lists).
            shuffle_order: show a random half of the pairs swapped, against position bias.

        Raises:
            ConnectionError: the endpoint could not be reached, after the retries.
            RuntimeError: the endpoint kept failing (429, 5xx) or refused a request.
        """
        check_pairs(prompts, completions, "OpenAIPairwiseJudge")
        if shuffle_order:
            shown, flipped = shuffled_pairs(completions, self._rng)
        else:
            shown, flipped = [list(pair) for pair in completions], [False] * len(completions)
        budget = self._take_budget(len(prompts))
        requests = [pairwise_request(p, a, b, self.system_prompt) for p, (a, b) in zip(prompts, shown, strict=True)]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            replies = list(pool.map(self._ask, requests[:budget]))
        verdicts = []
        for i, reply in enumerate(replies):
            verdict = parse_pairwise(reply)
            if verdict is None:
                logger.warning(
                    "OpenAIPairwiseJudge: no verdict (0 or 1) in the reply to pair %d: %r; judged -1.", i, reply
                )
            verdicts.append(-1 if verdict is None else verdict)
        return unflip(verdicts + [-1] * (len(prompts) - budget), flipped)

    def _take_budget(self, wanted: int) -> int:
        """How many of ``wanted`` pairs ``max_requests`` still allows; counts them as sent."""
        with self._lock:
            if self.max_requests is None or self.max_requests <= 0:
                allowed = wanted
            else:
                allowed = max(0, min(wanted, self.max_requests - self.num_requests))
            self.num_requests += allowed
        if allowed < wanted and not self._warned:
            self._warned = True
            logger.warning(
                "OpenAIPairwiseJudge reached max_requests=%s: the remaining pairs are judged -1. Raise "
                "max_requests to judge more.",
                self.max_requests,
            )
        return allowed

    def _ask(self, content: str) -> str:
        """The reply to one request, retried with backoff on retryable failures."""
        openai = self._openai
        extra: dict[str, Any] = {} if self.temperature is None else {"temperature": self.temperature}
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=self.max_tokens,
                    **extra,
                )
                return response.choices[0].message.content or ""
            except (openai.APIConnectionError, openai.APIStatusError) as error:
                status = getattr(error, "status_code", None)
                retryable = status is None or status >= 500 or status in _RETRY_STATUSES
                if not retryable:
                    raise RuntimeError(
                        f"OpenAIPairwiseJudge: {self.base_url} refused the request for model {self.model!r} "
                        f"(HTTP {status}): {getattr(error, 'message', error)}"
                    ) from error
                if attempt == self.max_retries:
                    tries = f"{self.max_retries + 1} tries"
                    if status is None:
                        raise ConnectionError(
                            f"OpenAIPairwiseJudge could not reach {self.base_url} after {tries} "
                            f"({type(error).__name__}: {error}). Is the server running there (base_url=)?"
                        ) from error
                    raise RuntimeError(
                        f"OpenAIPairwiseJudge: {self.base_url} kept failing with HTTP {status} after {tries}: "
                        f"{getattr(error, 'message', error)}"
                    ) from error
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (1 + 0.1 * random.random())
                logger.info("OpenAIPairwiseJudge: %s (try %d); retrying in %.2fs.", error, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

"""OpenAIPairwiseJudge against ``kithara serve`` (a real process) and against in-test HTTP stubs
with known answers, failures, and delays."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from test_serve import MODEL, free_port, shared_server

from kithara.judges.prompts import PAIRWISE_SYSTEM_PROMPT, pairwise_request, parse_pairwise, shuffled_pairs, unflip

openai = pytest.importorskip("openai")
from kithara.judges.openai_judge import OpenAIPairwiseJudge  # noqa: E402

SHORT_PROMPT = "Question: {prompt}\nAnswer 0: {response0}\nAnswer 1: {response1}\nBetter answer:"
PROMPTS = ["two plus two", "capital of france", "a color of the sky"]
PAIRS = [["four", "five"], ["paris", "rome"], ["blue", "green"]]


def reply_body(content: str) -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class Stub:
    """An OpenAI-like ``/v1/chat/completions`` on a thread: ``answer(request_body, call_number)``
    returns ``(status, body)``; the stub records the bodies and the most requests in flight."""

    def __init__(self, answer, delay: float = 0.0):
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with lock:
                    stub.bodies.append(body)
                    call = len(stub.bodies)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(delay)
                status, payload = answer(body, call)
                with lock:
                    stub.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def contents(self) -> list[str]:
        return [b["messages"][0]["content"] for b in self.bodies]


@pytest.fixture
def stub(request):
    made = []

    def make(answer, delay=0.0):
        made.append(Stub(answer, delay))
        return made[-1]

    yield make
    for s in made:
        s.server.shutdown()


def prefers(word: str):
    """A judge that knows the answer: the completion containing ``word`` wins, wherever it is shown."""

    def answer(body, call):
        content = body["messages"][0]["content"]
        first = content.split('"output": """')[1].split('"""')[0]
        return 200, reply_body("0" if word in first else "1")

    return answer


def test_known_answers_through_shuffling_and_the_default_prompt(stub):
    server = stub(prefers("good"))
    judge = OpenAIPairwiseJudge("stub", base_url=server.base_url, seed=0)
    pairs = [["good one", "bad"], ["bad", "good two"], ["bad", "good three"], ["good four", "bad"]] * 3
    prompts = [f"prompt {i}" for i in range(len(pairs))]
    assert judge.judge(prompts, pairs) == [0 if "good" in a else 1 for a, _ in pairs]
    shown, _ = shuffled_pairs(pairs, np.random.default_rng(0))  # the order the seeded judge showed them in
    expected = [pairwise_request(p, a, b, PAIRWISE_SYSTEM_PROMPT) for p, (a, b) in zip(prompts, shown, strict=True)]
    assert sorted(server.contents()) == sorted(expected)
    assert any(s != list(p) for s, p in zip(shown, pairs, strict=True))  # some pairs were swapped
    assert {b["model"] for b in server.bodies} == {"stub"} and {b["max_tokens"] for b in server.bodies} == {1}
    assert judge.num_requests == len(pairs)


def test_retries_with_backoff_then_the_known_answer(stub):
    failures = {1: (500, {"error": {"message": "boom"}}), 2: (429, {"error": {"message": "slow down"}})}
    server = stub(lambda body, call: failures.get(call, (200, reply_body("1"))))
    judge = OpenAIPairwiseJudge("stub", base_url=server.base_url, max_retries=2, backoff=0.05)
    started = time.monotonic()
    assert judge.judge(["q"], [["a", "b"]], shuffle_order=False) == [1]
    assert len(server.bodies) == 3
    assert time.monotonic() - started >= 0.05 + 0.1  # waited backoff, then twice that

    always_failing = stub(lambda body, call: (503, {"error": {"message": "overloaded"}}))
    judge = OpenAIPairwiseJudge("stub", base_url=always_failing.base_url, max_retries=1, backoff=0.01)
    with pytest.raises(RuntimeError, match=r"503 after 2 tries"):
        judge.judge(["q"], [["a", "b"]])
    assert len(always_failing.bodies) == 2


def test_a_closed_port_raises_a_clear_error_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = OpenAIPairwiseJudge("stub", base_url=url, max_retries=2, backoff=0.01, timeout=2)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"could not reach {url}/? after 3 tries"):
        judge.judge(["q"], [["a", "b"]])
    assert time.monotonic() - started < 10


def test_refused_requests_raise_at_once(stub):
    server = stub(
        lambda body, call: (404, {"error": {"message": "The model 'x' does not exist", "code": "model_not_found"}})
    )
    judge = OpenAIPairwiseJudge("x", base_url=server.base_url, max_retries=3, backoff=0.01)
    with pytest.raises(RuntimeError, match=r"refused.*HTTP 404.*does not exist"):
        judge.judge(["q"], [["a", "b"]])
    assert len(server.bodies) == 1  # a 4xx is not retried


def test_concurrency_limit_is_respected(stub):
    server = stub(lambda body, call: (200, reply_body("0")), delay=0.15)
    judge = OpenAIPairwiseJudge("stub", base_url=server.base_url, concurrency=2)
    assert judge.judge(["q"] * 6, [["a", "b"]] * 6, shuffle_order=False) == [0] * 6
    assert server.max_in_flight == 2


def test_undecidable_replies_and_max_requests_give_minus_one(stub, caplog):
    replies = iter(["maybe", "0 or 1", "Answer: 1", "0"])
    server = stub(lambda body, call: (200, reply_body(next(replies))))
    judge = OpenAIPairwiseJudge("stub", base_url=server.base_url, max_requests=3, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="kithara.judges.openai_judge"):
        verdicts = judge.judge(["q"] * 4, [["a", "b"]] * 4, shuffle_order=False)
    assert verdicts == [-1, -1, 1, -1]  # the fourth pair is past max_requests
    assert len(server.bodies) == 3
    assert "'maybe'" in caplog.text and "max_requests=3" in caplog.text
    assert judge.judge(["q"], [["a", "b"]]) == [-1] and len(server.bodies) == 3


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.delenv("KITHARA_NO_SUCH_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="KITHARA_NO_SUCH_KEY"):
        OpenAIPairwiseJudge("gpt-4o", api_key_env="KITHARA_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIPairwiseJudge("m", base_url="http://127.0.0.1:1/v1", concurrency=0)
    with pytest.raises(ValueError, match="placeholder"):
        OpenAIPairwiseJudge("m", base_url="http://127.0.0.1:1/v1", system_prompt="no slots")
    judge = OpenAIPairwiseJudge("m", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="pair"):
        judge.judge(["q"], [["only one"]])


def test_against_kithara_serve(tmp_path_factory):
    """The judge's requests reach a real ``kithara serve`` as sent (the server's request log),
    and each verdict is ``parse_pairwise`` of what the served model answers to that request."""
    server = shared_server(tmp_path_factory)
    url = server["url"] + "/v1"
    judge = OpenAIPairwiseJudge(MODEL, SHORT_PROMPT, base_url=url, temperature=0, max_tokens=4, concurrency=3, seed=1)
    verdicts = judge.judge(PROMPTS, PAIRS)
    shown, flipped = shuffled_pairs(PAIRS, np.random.default_rng(1))
    requests = [pairwise_request(p, a, b, SHORT_PROMPT) for p, (a, b) in zip(PROMPTS, shown, strict=True)]
    text = server["log"].read_text()
    assert all(json.dumps(r) in text for r in requests), text[-2000:]
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    replies = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": r}], max_tokens=4, temperature=0
        )
        .choices[0]
        .message.content
        for r in requests
    ]
    parsed = [parse_pairwise(r) for r in replies]
    assert verdicts == unflip([-1 if v is None else v for v in parsed], flipped)
    with pytest.raises(RuntimeError, match="HTTP 404"):
        OpenAIPairwiseJudge("not-served", base_url=url).judge(["q"], [["a", "b"]])

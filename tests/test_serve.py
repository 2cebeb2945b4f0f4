"""``kithara serve``: a real server process on 127.0.0.1, talked to with the ``openai`` client.

One server (a tiny Llama saved in Hugging Face format with the bundled BPE tokenizer and its
ChatML template) is shared by the module. Greedy answers are checked against the same
model's ``generate`` in this process: the server serves this model, token for token.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ASSETS, TINY

import kithara

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny"
MAX_BATCH = 4
MAX_LEN = 256
NEW = 8  # max_tokens of every generating test: one new-token bucket
SEGMENT = 3  # tokens per streamed segment: an 8-token stream takes 3 generate calls
CHAT = [{"role": "user", "content": "hello there"}]
PROMPTS = ["the cat sat on the mat", "one two three four", "a quick brown fox jumps", "to be or not to be"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_tiny_model(directory: Path) -> Path:
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    model = kithara.KerasHubModel.from_config("llama3", **{**TINY, "vocab_size": tokenizer.vocab_size}, seed=3)
    model.save_in_hf_format(directory, tokenizer=tokenizer)
    return directory


def start_server(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``python -m kithara serve`` on a free port; returns once ``/health`` answers."""
    port = free_port()
    command = [sys.executable, "-m", "kithara", "serve", str(model_dir), "--port", str(port), *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"The server did not answer in time:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


_RUNNING: dict = {}


def shared_server(tmp_path_factory) -> dict:
    """The one server process of the test session (tests/test_openai_judge.py talks to it
    too), started on first use and stopped when the session's process exits."""
    if not _RUNNING:
        root = tmp_path_factory.mktemp("serve")
        model_dir = save_tiny_model(root / "model")
        log = root / "server.log"
        extra = ["--model-name", MODEL, "--max-batch-size", str(MAX_BATCH), "--max-model-len", str(MAX_LEN)]
        extra += ["--batch-wait-ms", "100", "--stream-segment-tokens", str(SEGMENT), "--log-requests"]
        process, url = start_server(model_dir, log, *extra)
        atexit.register(stop_server, process)
        _RUNNING.update(url=url, process=process, model_dir=model_dir, log=log)
    return _RUNNING


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(server):
    """The served directory loaded in this process: the reference for greedy answers."""
    model = kithara.KerasHubModel.from_preset(str(server["model_dir"]))
    tokenizer = kithara.Tokenizer.from_pretrained(server["model_dir"])
    return model, tokenizer


def reference(local, prompt_ids: list[int], max_new_tokens: int = NEW) -> tuple[str, int, bool]:
    """``model.generate``'s greedy text, its completion-token count (the stop token counts)
    and whether a stop token (EOS or ``<|im_end|>``) ended it."""
    model, tokenizer = local
    stops = [tokenizer.eos_id, tokenizer.backend.convert_tokens_to_ids("<|im_end|>")]
    tokens = model.generate([prompt_ids], max_new_tokens=max_new_tokens, stop_token_ids=stops)[0]
    stopped = len(tokens) < max_new_tokens
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens) + stopped, stopped


def stats(server) -> dict:
    return httpx.get(server["url"] + "/stats").json()


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_chat_equals_generate_in_process(client, local):
    _, tokenizer = local
    prompt_ids = tokenizer.encode_chat(CHAT, add_generation_prompt=True)[0]
    text, count, stopped = reference(local, prompt_ids)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == count
    assert reply.model == MODEL and reply.object == "chat.completion"


def test_greedy_completions_equal_generate_in_process(client, local):
    _, tokenizer = local
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=NEW, temperature=0, n=2)
    assert len(reply.choices) == 4
    for i, choice in enumerate(reply.choices):  # OpenAI's order: prompt by prompt, n choices each
        expected, _, _ = reference(local, tokenizer.encode_text(PROMPTS[i // 2]))
        assert choice.index == i and choice.text == expected
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode_text(p)) for p in PROMPTS[:2])
    ids = tokenizer.encode_text(PROMPTS[2])  # a prompt of token ids, echoed back as text
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=NEW, temperature=0, echo=True)
    assert echoed.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True) + reference(local, ids)[0]


def test_streaming_sends_the_same_text_in_segments(client, server):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW, temperature=0)
    before = stats(server)["requests"]
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=NEW, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same tokens, segment by segment
    calls = stats(server)["requests"] - before
    assert calls == -(-whole.usage.completion_tokens // SEGMENT) or whole.choices[0].finish_reason == "stop"
    assert len(pieces) > 1 and calls > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    texts = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stream=True)
    whole_text = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert "".join(c.choices[0].text for c in texts) == whole_text.choices[0].text


def test_streams_stop_at_stop_strings_and_replay_with_a_seed(client):
    text = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=NEW, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=NEW, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"

    def sampled() -> dict[int, str]:
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[:2], max_tokens=NEW, temperature=1.0, n=2, seed=11, stream=True
        )
        out: dict[int, str] = {}
        for c in stream:
            out[c.choices[0].index] = out.get(c.choices[0].index, "") + c.choices[0].text
        return out

    first = sampled()
    assert sorted(first) == [0, 1, 2, 3] and len(set(first.values())) == 4
    assert sampled() == first


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW, temperature=0).choices[0]
    text = full.text
    assert len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=NEW, temperature=0, stop=["never-in-the-output", stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < NEW
    single = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW, temperature=0, stop=stop)
    assert single.choices[0].text == cut.choices[0].text


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(client):
    def sample(seed: int, **extra) -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=NEW, temperature=1.0, n=3, seed=seed, **extra
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.message.content for c in reply.choices]

    first = sample(7)
    assert sample(7) == first  # same seed, same samples
    assert len(set(first)) == 3  # n rows are independent samples
    assert sample(8) != first
    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW, temperature=0)
    # top_k=1 (an extra, as vLLM names it) leaves only the likeliest token: greedy, whatever the seed.
    assert set(sample(9, extra_body={"top_k": 1})) == {greedy.choices[0].message.content}


def test_concurrent_requests_share_batches_and_compiled_programs(client, local, server):
    _, tokenizer = local
    expected = [reference(local, tokenizer.encode_text(p))[0] for p in PROMPTS]
    before = stats(server)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        replies = list(
            pool.map(
                lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=NEW, temperature=0),
                PROMPTS * 2,
            )
        )
    assert [r.choices[0].text for r in replies] == expected * 2  # batching changes no answer
    after = stats(server)
    assert after["requests"] - before["requests"] == 2 * len(PROMPTS)
    assert after["batches"] - before["batches"] < 2 * len(PROMPTS)  # some requests shared a call
    assert after["max_requests_per_batch"] >= 2
    assert max(b["rows"] for b in after["recent_batches"]) <= MAX_BATCH
    # Prompts of other lengths in the same power-of-two bucket (9 to 16 tokens) reuse the compiled programs.
    lengths = {len(tokenizer.encode_text(p)) for p in PROMPTS}
    others = [" ".join(["the"] * k) for k in range(4, 20)]
    others = [
        p for p in others if 9 <= len(tokenizer.encode_text(p)) <= 16 and len(tokenizer.encode_text(p)) not in lengths
    ]
    assert lengths <= set(range(9, 17)) and len(others) >= 2
    for prompt in others[:3]:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0)
    assert stats(server)["compilations"] == after["compilations"]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(client, server):
    url = server["url"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=CHAT, max_tokens=NEW)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "gpt-nope" in caught.value.message and MODEL in caught.value.message

    long_prompt = " ".join(["hello"] * MAX_LEN)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=NEW)
    assert caught.value.code == "context_length_exceeded" and f"{MAX_LEN} tokens" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW, n=MAX_BATCH + 1)
    assert caught.value.param == "n" and "max_batch_size" in caught.value.message

    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    truncated = b'{"model": "tiny", "messages": ['
    bad_json = post("/v1/chat/completions", content=truncated, headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and error_of(bad_json)["code"] == "invalid_json"
    missing = post("/v1/chat/completions", json={"model": MODEL})
    assert missing.status_code == 400 and error_of(missing)["param"] == "messages"
    hot = post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 5})
    assert hot.status_code == 400 and error_of(hot)["param"] == "temperature"
    unsupported = post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "logprobs": True})
    assert unsupported.status_code == 400 and error_of(unsupported)["param"] == "logprobs"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": tools})
    assert with_tools.status_code == 400 and error_of(with_tools)["param"] == "tools"
    forced = post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tool_choice": "required"})
    assert forced.status_code == 400 and error_of(forced)["param"] == "tool_choice"
    huge_k = post("/v1/completions", json={"model": MODEL, "prompt": "hi", "top_k": 10**12, "max_tokens": NEW})
    assert huge_k.status_code == 400 and error_of(huge_k)["param"] == "top_k"
    out_of_vocab = post("/v1/completions", json={"model": MODEL, "prompt": [1, 10**6], "max_tokens": NEW})
    assert out_of_vocab.status_code == 400 and error_of(out_of_vocab)["param"] == "prompt"
    nowhere = httpx.get(url + "/v1/nowhere")
    assert nowhere.status_code == 404 and "/v1/nowhere" in error_of(nowhere)["message"]

    assert server["process"].poll() is None
    good = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW, temperature=0)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_the_request_log_holds_the_prompts(client, server):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "log me please"}], max_tokens=1)
    assert json.dumps("log me please") in server["log"].read_text()


def test_training_checkpoint_needs_base(tmp_path, capsys):
    from kithara import cli
    from kithara.serve import ServeConfig, load_served_model

    (tmp_path / "ckpt" / "4" / "state").mkdir(parents=True)
    with pytest.raises(ValueError, match="--base"):
        load_served_model(ServeConfig(str(tmp_path / "ckpt")))
    assert cli.main(["serve", str(tmp_path / "ckpt")]) == 2
    assert "--base" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_served_model(ServeConfig(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig("x", max_batch_size=0)
    with pytest.raises(ValueError, match="--precision bfloat16 with a YAML --base"):
        load_served_model(ServeConfig(str(tmp_path / "ckpt"), base=str(tmp_path / "run.yaml"), precision="bfloat16"))


@pytest.mark.slow
def test_a_training_checkpoint_is_served_with_its_trained_weights(tmp_path):
    import numpy as np
    import optax
    from conftest import pattern_examples

    from kithara.serve import ServeConfig, load_served_model

    base = save_tiny_model(tmp_path / "base")
    model = kithara.KerasHubModel.from_preset(str(base))
    loader = kithara.Dataloader(pattern_examples(16, vocab=64), 1, seed=0)
    checkpointer = kithara.Checkpointer(str(tmp_path / "ckpt"), save_interval=2, async_save=False)
    kithara.Trainer(model, optax.adam(1e-2), loader, steps=2, checkpointer=checkpointer, progress_bar=False).train()
    served = load_served_model(ServeConfig(str(tmp_path / "ckpt"), base=str(base), model_name="trained"))
    assert served.name == "trained" and "checkpoint step 2" in served.source
    trained, untouched = model.variables.trainable, kithara.KerasHubModel.from_preset(str(base)).variables.trainable
    for name, value in served.model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[name]))
    assert any(not np.array_equal(np.asarray(trained[n]), np.asarray(untouched[n])) for n in trained)
    other = tmp_path / "other"
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    wider = {**TINY, "vocab_size": tokenizer.vocab_size, "intermediate_dim": 96}
    kithara.KerasHubModel.from_config("llama3", **wider).save_in_hf_format(other, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"does not match --base.*shape"):
        load_served_model(ServeConfig(str(tmp_path / "ckpt" / "2"), base=str(other)))


def test_the_server_answers_while_a_batch_compiles_and_runs(client, server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # 100 new tokens: a new bucket, so this request compiles a program (seconds) first.
        slow = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[0], max_tokens=100, temperature=0)
        time.sleep(0.5)
        started = time.monotonic()
        assert httpx.get(server["url"] + "/health", timeout=5).json() == {"status": "ok"}
        answered_in = time.monotonic() - started
        assert not slow.done(), "the slow request finished too soon to show anything"
        assert answered_in < 1.0
        assert slow.result().usage.completion_tokens <= 100


class FakeModel:
    """Stands in for the model: records each ``sample`` call; prompt [0] makes it fail."""

    generate_compilations = 0

    class backbone:
        vocabulary_size = 64

    def __init__(self):
        self.calls = []

    def sample(self, prompts, max_new_tokens, **kwargs):
        self.calls.append((prompts, max_new_tokens, kwargs))
        if [0] in prompts:
            raise RuntimeError("boom")
        rows = [[p[0]] * max_new_tokens for p in prompts]
        return [[*r[:-1], 2] if p[0] == 7 else r for r, p in zip(rows, prompts, strict=True)], [
            p[0] == 7 for p in prompts
        ]


def test_engine_batches_by_sampling_settings_and_survives_a_failed_batch():
    from kithara.serve import Engine, Sampling, ServedModel

    fake = FakeModel()
    served = ServedModel(fake, None, "fake", 64, [2], "test")  # type: ignore[arg-type]
    engine = Engine(served, max_batch_size=4, batch_wait_s=0.2)
    engine.start()
    try:
        greedy, hot, seeded = Sampling(0.0), Sampling(0.7), Sampling(0.7, seed=5)
        futures = [
            engine.submit([1], 3, 1, greedy),
            engine.submit([3], 2, 2, hot),
            engine.submit([4], 5, 3, greedy),
            engine.submit([5], 2, 1, seeded),
            engine.submit([6], 2, 1, seeded),
            engine.submit([7], 4, 1, greedy),  # a 3rd greedy job: 4 rows already, so a later call
        ]
        results = [f.result(timeout=10) for f in futures]
        failed = engine.submit([0], 2, 1, greedy)
        with pytest.raises(RuntimeError, match="boom"):
            failed.result(timeout=10)
        after = engine.submit([8], 2, 1, greedy).result(timeout=10)
    finally:
        engine.stop()
    batches = [(prompts, new, kw["temperature"], kw["seed"]) for prompts, new, kw in fake.calls]
    assert batches[0] == ([[1], [4], [4], [4]], 5, 0.0, 0)  # greedy rows together, up to the longest max_tokens
    assert batches[1][0] == [[3], [3]] and batches[1][2] == 0.7  # unseeded sampling: its own call
    assert batches[2] == ([[5]], 2, 0.7, 5) and batches[3] == ([[6]], 2, 0.7, 5)  # a seeded request runs alone
    assert batches[4][0] == [[7]]
    assert results[0][0].token_ids == [1, 1, 1] and not results[0][0].stopped  # cut to its own max_tokens
    assert [r.token_ids for r in results[2]] == [[4] * 5] * 3
    assert results[5][0].token_ids == [7, 7, 7] and results[5][0].stopped  # the stop token dropped
    assert after[0].token_ids == [8, 8]
    assert engine.stats()["max_requests_per_batch"] == 2


def test_a_failure_inside_generation_is_a_500_and_the_next_request_is_served():
    from conftest import W, word_tokenizer
    from fastapi.testclient import TestClient

    from kithara.serve import Engine, ServedModel
    from kithara.serve.app import create_app

    served = ServedModel(FakeModel(), word_tokenizer(), "fake", 64, [2], "test")  # type: ignore[arg-type]
    with TestClient(create_app(Engine(served, batch_wait_s=0)), raise_server_exceptions=False) as http:
        failed = http.post("/v1/completions", json={"model": "fake", "prompt": [0], "max_tokens": 3})
        assert failed.status_code == 500
        assert error_of(failed)["type"] == "server_error" and "boom" in error_of(failed)["message"]
        streamed = http.post("/v1/completions", json={"model": "fake", "prompt": [0], "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200 and '"server_error"' in streamed.text  # an error event, then the end
        good = http.post(
            "/v1/completions", json={"model": "fake", "prompt": [W["how"]], "max_tokens": 3, "temperature": 0}
        )
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == "how how how"


def test_finish_text_cuts_at_stop_strings_and_counts_tokens():
    from conftest import W, word_tokenizer

    from kithara.serve.text import finish_text

    tok = word_tokenizer()
    ids = [W[w] for w in ("how", "are", "you", "fine", "thanks")]
    whole = finish_text(ids, False, tok, [])
    assert (whole.text, whole.finish_reason, whole.num_tokens) == ("how are you fine thanks", "length", 5)
    cut = finish_text(ids, False, tok, ["thanks", "you f"])
    assert (cut.text, cut.finish_reason, cut.num_tokens) == ("how are ", "stop", 4)  # "you f" completes at "fine"
    stopped = finish_text(ids[:2], True, tok, ["zzz"])
    assert (stopped.text, stopped.finish_reason, stopped.num_tokens) == ("how are", "stop", 3)
    empty = finish_text([], True, tok, [])
    assert (empty.text, empty.num_tokens) == ("", 1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_a_lora_run_of_kithara_train_is_served_from_its_yaml(tmp_path, monkeypatch):
    """``kithara train`` on a YAML with LoRA, then its checkpoint served with ``--base run.yaml``:
    the served variables are the checkpoint's arrays (read back by orbax on their own)."""
    import numpy as np
    import orbax.checkpoint as ocp
    import yaml

    from kithara import cli
    from kithara.serve import ServeConfig, load_served_model

    sizes = {k: v for k, v in TINY.items() if k != "vocab_size"}
    run = {
        "model": {"family": "llama3", **sizes},
        "lora": {"enabled": True, "rank": 4},
        "data": {"train_file": str(ASSETS / "demo" / "train.jsonl"), "tokenizer": str(ASSETS / "demo" / "tokenizer")},
        "args": {"max_steps": 2, "max_length": 24, "per_device_train_batch_size": 1, "output_dir": "out",
                 "save_strategy": "steps", "save_steps": 2, "logging_steps": 1},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "run.yaml"]) == 0
    served = load_served_model(ServeConfig("out/checkpoints", base="run.yaml"))
    assert "checkpoint step 2" in served.source and served.model.lora is not None
    saved = ocp.PyTreeCheckpointer().restore(tmp_path / "out" / "checkpoints" / "2" / "state")["model"]
    lora = [n for n in served.model.variables.trainable if "lora" in n]
    assert lora and set(served.model.variables.trainable) == set(saved["trainable"])
    for group in ("trainable", "non_trainable"):
        for name, value in getattr(served.model.variables, group).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(saved[group][name]), err_msg=name)
    assert any(np.abs(np.asarray(saved["trainable"][n])).max() > 0 for n in lora if "lora_kernel_b" in n)

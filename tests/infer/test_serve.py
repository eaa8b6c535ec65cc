"""The OpenAI-compatible server, driven by the real `openai` client over loopback.

A tiny random decoder with a byte-level tokenizer serves the default tests; SmolLM2 and
all-MiniLM-L6-v2 are the slow, data-marked ones.
"""

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tiny_lm import tiny_lm  # noqa: E402

from infer import generate  # noqa: E402
from infer.engine import EngineConfig, Request  # noqa: E402
from infer.serve import StopStrings, create_app  # noqa: E402

NAME = "tiny"
KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "Hello there"}]


class LiveServer:
    """uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key=KEY, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def server(lm):
    config = EngineConfig(max_batch=4, prefill_chunk=32)
    live = LiveServer(
        create_app(lm, model_name=NAME, api_key=KEY, max_queue=2, engine_config=config)
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_chat_completion_equals_generate(client, lm):
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content == generate(lm, MESSAGES, max_tokens=12)
    assert choice.message.role == "assistant" and choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    prompt = lm.tokenizer.apply_chat_template(MESSAGES)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.object == "chat.completion" and reply.model == NAME


def test_text_completion_equals_generate(client, lm):
    reply = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0)
    assert reply.choices[0].text == generate(lm, "Once upon", max_tokens=10)
    assert reply.usage.completion_tokens <= 10
    if reply.usage.completion_tokens == 10:
        assert reply.choices[0].finish_reason == "length"


def _chunks(server, body):
    """The SSE data lines of a streamed request, parsed."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + body.pop("path"), json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunk_sequence(server, lm, include_usage):
    body = dict(path="/v1/chat/completions", model=NAME, messages=MESSAGES, max_tokens=12)
    body.update(temperature=0, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = _chunks(server, body)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == []
        assert last["usage"]["completion_tokens"] <= 12
        assert last["usage"]["total_tokens"] == sum(
            last["usage"][k] for k in ("prompt_tokens", "completion_tokens")
        )
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    first, *middle, final = [c["choices"] for c in chunks]
    assert first == [
        {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
    ]
    assert final[0]["delta"] == {} and final[0]["finish_reason"] in ("stop", "length")
    assert all(c[0]["finish_reason"] is None and set(c[0]["delta"]) == {"content"} for c in middle)
    text = "".join(c[0]["delta"]["content"] for c in middle)
    assert text == generate(lm, MESSAGES, max_tokens=12)


def test_openai_client_streams_chat_and_completions(client, lm):
    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == generate(lm, MESSAGES, max_tokens=8)
    stream = client.completions.create(
        model=NAME, prompt="abc", max_tokens=8, temperature=0, stream=True
    )
    pieces = list(stream)
    assert "".join(c.choices[0].text for c in pieces) == generate(lm, "abc", max_tokens=8)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_have_their_indices_and_seeds(client):
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=10, temperature=1.5, seed=3)
    reply = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.chat.completions.create(n=2, **kwargs)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]
    # Choice i is drawn with seed + i.
    shifted = client.chat.completions.create(n=1, **{**kwargs, "seed": 4})
    assert shifted.choices[0].message.content == reply.choices[1].message.content
    stream = client.completions.create(
        model=NAME, prompt="xy", max_tokens=4, temperature=1.0, n=2, stream=True
    )
    finished = [c.choices[0].index for c in stream if c.choices[0].finish_reason]
    assert finished == [0, 1]


def test_stop_strings_cut_the_text():
    stopper = StopStrings(["END", "\n\n"])
    out = []
    for piece in ["abc E", "N", "xyz\n", "\n", "more"]:
        text, stopped = stopper.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "abc ENxyz" and stopped


def test_stop_string_from_the_server(client, lm):
    full = generate(lm, "Once upon", max_tokens=20)
    stop = full[5:7]
    if not stop.strip():
        pytest.skip("the tiny model's text has no usable stop string here")
    reply = client.completions.create(
        model=NAME, prompt="Once upon", max_tokens=20, temperature=0, stop=[stop]
    )
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_out_of_range_temperature_is_a_bad_request_without_retries(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature"
    assert e.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-9", input="hi")


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200


def test_malformed_json_is_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tin', headers=headers)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"]


def test_body_without_json_content_type_is_400(server):
    """curl -d sends application/x-www-form-urlencoded; the error says what to send instead."""
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    body = json.dumps({"model": NAME, "prompt": "hi"}).encode()
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="context is 160 tokens; the prompt has 300"):
        client.completions.create(model=NAME, prompt="a" * 300)
    with pytest.raises(openai.BadRequestError, match=r"\+ 150 completion tokens"):
        client.completions.create(model=NAME, prompt="a" * 20, max_tokens=150)


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == [NAME]


def test_bad_requests_never_give_5xx(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    good = {"model": NAME, "messages": MESSAGES, "max_tokens": 2}
    values = [None, -1, 0, 10**12, 2.5, "x", "", [], {}, [1, "a"], True, {"a": [None]}]
    fields = [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "prompt",
    ]
    rng = np.random.default_rng(0)
    for _ in range(40):
        body = dict(good)
        for field in rng.choice(fields, size=rng.integers(1, 3), replace=False):
            body[str(field)] = values[rng.integers(len(values))]
        path = "/v1/completions" if rng.random() < 0.3 else "/v1/chat/completions"
        r = httpx.post(server.url + path, json=body, headers=headers)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for body in (
        {"model": NAME, "messages": MESSAGES, "n": 10**6},
        {"model": NAME, "messages": MESSAGES, "max_tokens": -5},
        {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]},
        {"model": NAME, "messages": "hi"},
        {"model": NAME, "messages": MESSAGES, "seed": 2**64},
        [1, 2],
        "null",
    ):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
    assert httpx.post(server.url + "/v1/nothing", headers=headers).status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200


def _wait_idle(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)


def _metric(server, name):
    lines = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = [line.split()[-1] for line in lines.splitlines() if line.startswith(name + " ")]
    return float(values[0])


def test_full_queue_is_429_and_disconnect_cancels(server, client, monkeypatch):
    engine = server.app.state.engine
    engine.pause()  # nothing leaves the queue while it is held
    try:
        engine.submit(*[Request([1, 2, 3], 2) for _ in range(2)])  # max_queue=2: full
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        assert _metric(server, "jaxlm_queue_length") == 2
    finally:
        engine.resume()
    _wait_idle(engine)
    # A client that reads one chunk and leaves: its sequence stops early and frees its blocks.
    # (Each decode step is slowed so that the tiny model cannot finish first.)
    cancelled = engine.cancelled
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda requests: (time.sleep(0.02), decode(requests)))
    with client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=110, temperature=0, stream=True
    ) as stream:
        next(iter(stream))
        time.sleep(0.1)
        assert _metric(server, "jaxlm_running_sequences") == 1
        assert _metric(server, "jaxlm_kv_blocks_used") > 0
    _wait_idle(engine)
    assert engine.cancelled == cancelled + 1
    assert engine.stats()["blocks_used"] == 0
    assert _metric(server, "jaxlm_running_sequences") == 0
    assert _metric(server, "jaxlm_kv_blocks_used") == 0
    assert httpx.get(server.url + "/health").status_code == 200


def test_error_during_a_stream_ends_it_and_the_server_lives_on(client, lm, monkeypatch):
    def broken():
        raise RuntimeError("decoder exploded")

    with monkeypatch.context() as m:
        m.setattr(lm.tokenizer, "stream_decoder", broken)
        stream = client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=4, stream=True
        )
        with pytest.raises(openai.APIError, match="decoder exploded"):
            list(stream)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def batch_server(lm):
    """A second app over the same model and shapes (no new compilation), with a long queue."""
    config = EngineConfig(max_batch=4, prefill_chunk=32)
    live = LiveServer(create_app(lm, model_name=NAME, max_queue=64, engine_config=config))
    yield live
    live.stop()


def test_32_concurrent_streams_equal_their_solo_outputs(batch_server, lm):
    prompts = [f"{i} little {'pigs' if i % 2 else 'ducks'} went" + "!" * (i % 7) for i in range(32)]
    client = batch_server.client(api_key="unused", timeout=120)
    texts = [None] * len(prompts)

    def stream(i):
        chunks = client.completions.create(
            model=NAME, prompt=prompts[i], max_tokens=10, temperature=0, stream=True
        )
        texts[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == [generate(lm, p, max_tokens=10) for p in prompts]
    engine = batch_server.app.state.engine
    _wait_idle(engine)
    assert engine.stats()["blocks_used"] == 0
    metrics = httpx.get(batch_server.url + "/metrics").text
    assert "jaxlm_time_to_first_token_seconds_count 32.0" in metrics
    assert "jaxlm_time_per_output_token_seconds_count" in metrics


def test_logprobs_and_new_sampling_parameters(client, lm):
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    reply = client.completions.create(
        model=NAME, prompt="abc", max_tokens=4, temperature=0, logprobs=3,
        logit_bias={"66": 100}, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.text == lm.tokenizer.decode([66] * 4)
    assert choice.logprobs.tokens == [lm.tokenizer.decode([66])] * 4
    assert len(choice.logprobs.top_logprobs[0]) == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="abc", logit_bias={"x": 1})
    assert e.value.body["param"] == "logit_bias"


def test_fuzzed_requests_never_give_5xx(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schemas = server.app.openapi()["components"]["schemas"]
    headers = {"Authorization": f"Bearer {KEY}"}
    leaf = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
        | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0, 1, 2, 0.5, -1])
    )  # fmt: skip
    values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    )

    @st.composite
    def bodies(draw):
        chat = draw(st.booleans())
        schema = schemas["ChatCompletionRequest" if chat else "CompletionRequest"]
        body = {"model": NAME, "max_tokens": 2}
        body.update({"messages": MESSAGES} if chat else {"prompt": "hi"})
        fields = draw(st.lists(st.sampled_from(sorted(schema["properties"])), max_size=3))
        for field in fields:
            body[field] = draw(values)
        return ("/v1/chat/completions" if chat else "/v1/completions"), body

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies())
    def check(case):
        path, body = case
        r = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.app.state.engine.stats()["blocks_used"] == 0


@pytest.mark.slow
@pytest.mark.data
def test_smollm2_answers_and_embeds():
    from models import hub, load_pretrained

    try:
        lm = load_pretrained("smollm2-135m-instruct")
        embedder = load_pretrained("all-minilm-l6-v2")
    except hub.PackageUnavailable as e:
        pytest.skip(f"weights unavailable: {e}")
    app = create_app(
        lm,
        model_name="smollm2-135m-instruct",
        embedder=embedder,
        embedding_model_name="all-minilm-l6-v2",
    )
    live = LiveServer(app)
    try:
        client = live.client(api_key="unused")
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32,
            temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content
        texts = ["The cat sits on the mat.", "A cat is on a mat.", "Stock markets fell."]
        result = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
        vectors = np.array([d.embedding for d in result.data])
        np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    finally:
        live.stop()

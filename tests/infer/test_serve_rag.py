"""`python -m infer.serve --rag-index DIR`: chat answers grounded in an index, with sources."""

import dataclasses
import json
import pathlib
import sys

import pytest

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "rag"))
from flax import nnx  # noqa: E402
from rag_fakes import FakeEmbedder  # noqa: E402
from test_serve import LiveServer  # noqa: E402
from tiny_lm import LM, byte_tokenizer, tiny_config  # noqa: E402

from infer.engine import EngineConfig  # noqa: E402
from infer.serve import create_app  # noqa: E402
from models import Decoder  # noqa: E402
from rag.chunking import ChunkConfig  # noqa: E402
from rag.index import Index  # noqa: E402

DOC = (
    "The Globe Theatre was built in 1599 by the Lord Chamberlain's Men on Bankside. "
    "It burned down in 1613 during a performance of Henry VIII. "
    "Shakespeare was born in Stratford-upon-Avon and died there in 1616."
)
QUESTION = [{"role": "user", "content": "When was the Globe built?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rag")
    (directory / "globe.txt").write_text(DOC)
    index = Index.open(directory / "idx", FakeEmbedder(), create=True, config=ChunkConfig(20, 4))
    index.add_paths([directory / "globe.txt"])
    # The grounded prompt (instructions and sources, one byte a token) needs a longer context.
    cfg = dataclasses.replace(tiny_config(), max_seq_len=1024)
    lm = LM(Decoder(cfg, rngs=nnx.Rngs(0)), byte_tokenizer())
    app = create_app(
        lm, model_name="tiny", engine_config=EngineConfig(max_batch=2, prefill_chunk=64),
        rag_index=index, rag_top_k=2,
    )  # fmt: skip
    live = LiveServer(app)
    yield live
    live.stop()
    index.close()


def test_chat_answers_carry_the_retrieved_sources(server):
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    sources = reply["sources"]
    assert 1 <= len(sources) <= 2 and [s["number"] for s in sources] == [1, 2][: len(sources)]
    assert any("1599" in s["text"] for s in sources)
    assert all(s["source"].endswith("globe.txt") and s["end"] > s["start"] for s in sources)
    # The model saw the sources: the prompt is far longer than the question alone.
    assert reply["usage"]["prompt_tokens"] > 3 * len(QUESTION[0]["content"])

    # Streaming: the first chunk (the assistant role) carries the same sources.
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert first["sources"] == sources
    assert all("sources" not in json.loads(line.removeprefix("data: ")) for line in lines[1:])


def test_a_request_without_a_user_message_is_400(server):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "x"}], "max_tokens": 2}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "user message" in response.json()["error"]["message"]

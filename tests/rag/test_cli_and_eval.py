"""The two CLIs (with the fake embedder and a stub model patched in)."""

import json

import pytest
from rag_fakes import FakeEmbedder

import models
from rag import answer as answer_lib
from rag import ask, embed
from rag import index as index_lib


@pytest.fixture
def fake_models(monkeypatch):
    monkeypatch.setattr(embed, "PretrainedEmbedder", lambda *a, **kw: FakeEmbedder())
    monkeypatch.setattr(models, "load_pretrained", lambda name: f"model {name}")
    replies = []

    def completer(lm, max_tokens):
        def complete(messages):
            replies.append(messages)
            return "It was built in 1599 [1] [4]."

        return complete

    monkeypatch.setattr(ask, "chat_completer", completer)
    return replies


def test_index_and_ask_cli(tmp_path, capsys, fake_models):
    doc = tmp_path / "globe.md"
    doc.write_text("# Globe\n\nThe Globe Theatre was built in 1599 on Bankside.")
    index_lib.main(["--index", str(tmp_path / "idx"), str(doc), "--chunk-size", "16"])
    assert "1 added, 0 replaced" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["embedder"] == "fake-bow" and manifest["chunk_size"] == 16
    index_lib.main(["--index", str(tmp_path / "idx"), str(doc)])
    assert "0 added, 0 replaced, 1 unchanged" in capsys.readouterr().out

    ask.main(
        ["--index", str(tmp_path / "idx"), "When was the Globe built?", "--min-similarity", "0"]
    )
    out = capsys.readouterr().out
    assert out.startswith("It was built in 1599 [1].")  # [4] was not retrieved: dropped
    assert f"[1] {doc.resolve()} [" in out
    assert len(fake_models) == 1


def test_answer_module_defaults_are_sane():
    assert 0 < answer_lib.MIN_SIMILARITY < 1

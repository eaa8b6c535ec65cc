"""End-to-end answer accuracy on the Britannica questions, with and without retrieval.

  python -m rag.eval.answers --index runs/rag_corpus [--model smollm2-135m-instruct] [--out F]
      [--answer-prefix]

Scoring rule (deterministic): the reply and each gold answer string are normalised (lowercase,
every non-alphanumeric character a space, split into words); the answer is correct when one of
the question's gold strings occurs in the reply as a contiguous run of whole words. Greedy
decoding, at most 48 new tokens. "With retrieval" is `rag.answer.answer` (top-3 hybrid search
restricted to the article, citations), an abstention counting as wrong; "without" asks the
same model the bare question.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time
from collections.abc import Sequence

from rag.answer import ANSWER_PREFIX, Completer, answer
from rag.eval.data import Query
from rag.index import Index

CLOSED_BOOK_PROMPT = "Answer the question in one short sentence."
MAX_TOKENS = 48


def normalize(text: str) -> list[str]:
    """Lowercased alphanumeric words: "the 26th of April," -> ["the", "26th", "of", "april"]."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def is_correct(reply: str, answers: Sequence[str]) -> bool:
    """True when a gold string's words occur contiguously in the reply's words."""
    words = normalize(reply)
    for gold in answers:
        want = normalize(gold)
        if want and any(words[i : i + len(want)] == want for i in range(len(words))):
            return True
    return False


def closed_book(question: str, complete: Completer) -> str:
    """The model's reply to the bare question (no sources)."""
    return complete(
        [
            {"role": "system", "content": CLOSED_BOOK_PROMPT},
            {"role": "user", "content": question},
        ]
    )


def evaluate_answers(
    index: Index,
    questions: Sequence[Query],
    complete: Completer,
    k: int = 3,
    progress: bool = False,
    answer_prefix: str | None = None,
) -> dict:
    """Accuracy and every reply, with retrieval (`rag.answer.answer`) and without."""
    records = []
    for q in questions:
        if not q.answers:
            raise ValueError(f"question {q.text!r} has no gold answer strings")
        grounded = answer(
            q.text, index, complete, k=k, source=q.source, answer_prefix=answer_prefix
        )
        bare = closed_book(q.text, complete)
        first = grounded.citations[0] if grounded.citations else grounded.attributed
        records.append(
            {
                "question": q.text,
                "answers": list(q.answers),
                "with_retrieval": grounded.text,
                "with_retrieval_correct": is_correct(grounded.text, q.answers),
                "cited": [c.number for c in grounded.citations],
                "attributed": grounded.attributed.number if grounded.attributed else None,
                # The source the answer names first (cited, else attributed) holds a gold string.
                "source_holds_answer": first is not None and is_correct(first.text, q.answers),
                "without_retrieval": bare,
                "without_retrieval_correct": is_correct(bare, q.answers),
            }
        )
        if progress:
            r = records[-1]
            print(
                f"{len(records)}/{len(questions)} {r['with_retrieval_correct']:d}"
                f"{r['without_retrieval_correct']:d} {q.text}",
                flush=True,
            )
    n = len(records)
    return {
        "accuracy_with_retrieval": sum(r["with_retrieval_correct"] for r in records) / n,
        "accuracy_without_retrieval": sum(r["without_retrieval_correct"] for r in records) / n,
        "answers_citing": sum(bool(r["cited"]) for r in records),
        "answers_attributed": sum(r["attributed"] is not None for r in records),
        "named_source_holds_answer": sum(r["source_holds_answer"] for r in records),
        "correct_with_named_source_holding_it": sum(
            r["with_retrieval_correct"] and r["source_holds_answer"] for r in records
        ),
        "questions": n,
        "records": records,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="an index holding the article")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default=None, help="write accuracy and replies as JSON here")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument(
        "--answer-prefix",
        action="store_true",
        help="prefill the grounded replies with rag.answer.ANSWER_PREFIX ('According to [')",
    )
    args = parser.parse_args(argv)

    from models import load_pretrained
    from rag.answer import chat_completer
    from rag.embed import PretrainedEmbedder
    from rag.eval import data
    from rag.index import read_manifest

    article = data.britannica_document()
    questions = data.fact_questions(article)[: args.limit]
    embedder = PretrainedEmbedder(read_manifest(args.index)["embedder"], progress=False)
    complete = chat_completer(load_pretrained(args.model), max_tokens=MAX_TOKENS)
    start = time.perf_counter()
    with Index.open(args.index, embedder) as index:
        if article.source not in index.documents():
            raise ValueError(f"{args.index} does not hold {article.source}; index it first")
        prefix = ANSWER_PREFIX if args.answer_prefix else None
        result = evaluate_answers(index, questions, complete, progress=True, answer_prefix=prefix)
    result["seconds"] = time.perf_counter() - start
    result["model"] = args.model
    result["max_tokens"] = MAX_TOKENS
    result["answer_prefix"] = prefix
    print(
        f"{result['questions']} questions, {args.model}, greedy, <= {MAX_TOKENS} tokens: "
        f"accuracy with retrieval {result['accuracy_with_retrieval']:.3f}, "
        f"without {result['accuracy_without_retrieval']:.3f} ({result['seconds']:.0f} s); "
        f"{result['answers_citing']} answers cite, {result['answers_attributed']} more are "
        f"attributed by word overlap; the named source holds the answer in "
        f"{result['named_source_holds_answer']}"
    )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Asks a question of an index: `python -m rag.ask --index DIR "question"`.

Prints the answer, then the cited sources with their character offsets.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

from rag.answer import MIN_SIMILARITY, answer, chat_completer, format_answer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Answer a question from a RAG index.")
    parser.add_argument("--index", required=True, help="the index directory")
    parser.add_argument("question")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the chat model")
    parser.add_argument("-k", type=int, default=3, help="sources shown to the model")
    parser.add_argument("--mode", default="hybrid", choices=("hybrid", "dense", "bm25"))
    parser.add_argument("--min-similarity", type=float, default=MIN_SIMILARITY)
    parser.add_argument("--source", default=None, help="only search chunks of this file")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--no-abstain",
        action="store_true",
        help="with no relevant source, still ask the model (told to say it does not know)",
    )
    args = parser.parse_args(argv)

    from models import load_pretrained
    from rag.embed import PretrainedEmbedder
    from rag.index import Index, read_manifest

    embedder = PretrainedEmbedder(read_manifest(args.index)["embedder"], progress=False)
    with Index.open(args.index, embedder) as index:
        complete = chat_completer(load_pretrained(args.model), max_tokens=args.max_tokens)
        result = answer(
            args.question,
            index,
            complete,
            k=args.k,
            min_similarity=args.min_similarity,
            mode=args.mode,
            source=str(pathlib.Path(args.source).resolve()) if args.source else None,
            abstain=not args.no_abstain,
        )
    print(format_answer(result))


if __name__ == "__main__":
    main()

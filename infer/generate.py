"""Generate text from a pretrained model on the command line.

    python -m infer.generate --model smollm2-135m-instruct --prompt "What is the capital of France?"

The prompt of a chat model goes through the model's chat template (as one user message, after
an optional --system message) unless --raw is given; the completion streams to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from infer.decoding import Messages, add_model_args, generate_stream, load_model_or_exit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default=None, help="a system message (chat models)")
    parser.add_argument(
        "--raw", action="store_true", help="continue the prompt as text, no chat template"
    )
    parser.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    args = parser.parse_args(argv)

    lm = load_model_or_exit(args)
    if args.raw or lm.tokenizer.chat_template is None:
        prompt: str | Messages = args.prompt
    else:
        prompt = [{"role": "user", "content": args.prompt}]
        if args.system:
            prompt.insert(0, {"role": "system", "content": args.system})
    start, count = time.perf_counter(), 0
    for piece in generate_stream(
        lm, prompt, args.max_tokens, args.temperature, args.top_p, args.seed, top_k=args.top_k
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
        count += 1
    sys.stdout.write("\n")
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"[{count} pieces in {elapsed:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

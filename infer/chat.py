"""An interactive chat in the terminal that streams the reply as it is decoded.

    python -m infer.chat --model smollm2-135m-instruct [--system "You are terse."]

The whole conversation is sent through the model's chat template every turn, so the model
sees what was said before. Commands: /reset starts over, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from infer.decoding import Messages, add_model_args, generate_stream, load_model_or_exit


def chat_loop(lm, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> Messages:
    """Reads user turns from stdin until EOF or /exit; returns the conversation."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: Messages = list(system)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            return messages
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return messages
        if text == "/reset":
            messages = list(system)
            stdout.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": text})
        stdout.write("assistant> ")
        reply = []
        for piece in generate_stream(
            lm, messages, args.max_tokens, args.temperature, args.top_p, args.seed, top_k=args.top_k
        ):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.chat", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="a system message")
    args = parser.parse_args(argv)

    lm = load_model_or_exit(args)
    if lm.tokenizer.chat_template is None:
        print(
            f"{args.model} has no chat template; use python -m infer.generate --raw",
            file=sys.stderr,
        )
        return 2
    print(f"chatting with {args.model} (/reset, /exit)", file=sys.stderr)
    chat_loop(lm, args, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving load test: our continuous-batching server against static batching, over loopback.

Run from the repository root (the JSON records the load average; the numbers are only
comparable within one run):
  python experiments/benchmarks/serve.py --out experiments/results/serve_cpu_DATE.json
Quick check: `--tiny --concurrency 1 4 --requests 8`.

Method:
  * One in-process uvicorn server (`infer.serve.create_app`, engine max_batch = the highest
    concurrency); a load generator of C concurrent streaming clients (httpx, /v1/completions
    with token-id prompts, greedy) for each C in --concurrency (default 1 8 32 64).
  * Load, from --seed: max(C, 8) requests per level (--requests); each prompt is P random
    token ids (default 64) and each max_tokens is drawn from [--min-tokens, --max-tokens]
    (8..48), so requests end at different times. The same requests go to both modes (so with
    C >= the request count both modes send one wave and differ only by noise).
  * continuous: each client sends its next request as soon as its previous one ends; the engine
    admits and retires sequences at every decode step.
  * static (our baseline): the same server and kernels, but requests go in waves of C and a
    wave starts only when all of the previous one has finished: the batch is fixed until its
    longest member ends, as in static batching.
  * Per request: TTFT (send -> first token chunk), time per output token ((end - first token) /
    (tokens - 1)); per level: requests/s and output tokens/s over the wall time. Medians and p99.
  * Warm-up: one untimed pass at the highest concurrency compiles every shape first.
  * Peers: llama.cpp's server and HF transformers are not run here (see docs/serving.md).
Prints a table and the continuous/static ratios; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

DEFAULT_MODEL = "smollm2-135m-instruct"


class _Server:
    """uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_load(num: int, vocab: int, prompt_tokens: int, token_range, seed: int):
    """num (prompt ids, max_tokens) pairs, the same for every mode."""
    rng = np.random.default_rng(seed)
    low, high = token_range
    return [
        (
            [int(t) for t in rng.integers(100, vocab, prompt_tokens)],
            int(rng.integers(low, high + 1)),
        )
        for _ in range(num)
    ]


async def _one(client, url: str, model: str, prompt, max_tokens: int) -> dict:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {
        "ttft_s": first - start,
        "tpot_s": (end - first) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
    }


async def _drive(url: str, model: str, load, concurrency: int, static: bool) -> dict:
    import httpx

    results = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        if static:
            for i in range(0, len(load), concurrency):
                wave = load[i : i + concurrency]
                results += await asyncio.gather(*(_one(client, url, model, *w) for w in wave))
        else:
            queue = list(reversed(load))

            async def worker():
                while queue:
                    results.append(await _one(client, url, model, *queue.pop()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _summary(results, wall)


def _summary(results: list[dict], wall: float) -> dict:
    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "wall_s": wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": tokens / wall,
        "output_tokens": tokens,
    }


def run_benchmark(lm, model_name: str, concurrency=(1, 8, 32, 64), requests: int | None = None,
                  prompt_tokens: int = 64, token_range=(8, 48), seed: int = 0,
                  block_size: int = 16, prefill_chunk: int = 256,
                  partial: str | None = None) -> dict:  # fmt: skip
    """Runs both modes at every concurrency against one server; returns the results dict.

    requests: per level (default max(C, 8)). partial: a path to write each level to as
    soon as it is measured.
    """
    from infer.engine import EngineConfig
    from infer.serve import capacity_statement, create_app

    cfg = lm.model.cfg
    top = max(concurrency)
    per_seq = -(-(prompt_tokens + token_range[1]) // block_size)
    # Room for every sequence of the load at once, and for one whole context (the server's rule).
    num_blocks = max(top * per_seq, -(-cfg.max_seq_len // block_size)) + 1
    config = EngineConfig(max_batch=top, block_size=block_size, num_blocks=num_blocks,
                          prefill_chunk=prefill_chunk)  # fmt: skip
    app = create_app(lm, model_name=model_name, max_queue=4 * top + 16, engine_config=config)
    print(capacity_statement(app.state.engine), flush=True)
    server = _Server(app)
    levels = []
    try:
        warm = make_load(top, cfg.vocab_size, prompt_tokens, token_range, seed + 1)
        t = time.perf_counter()
        asyncio.run(_drive(server.url, model_name, warm, top, static=False))
        asyncio.run(_drive(server.url, model_name, warm[:1], 1, static=False))
        warmup_s = time.perf_counter() - t
        for c in concurrency:
            n = requests or max(c, 8)
            load = make_load(n, cfg.vocab_size, prompt_tokens, token_range, seed)
            row = {"concurrency": c}
            for mode in ("continuous", "static"):
                row[mode] = asyncio.run(_drive(server.url, model_name, load, c, mode == "static"))
                print(f"C={c} {mode}: {_fmt(row[mode])}", flush=True)
            row["ratios"] = {
                k: row["continuous"][k] / row["static"][k]
                for k in ("requests_per_s", "output_tokens_per_s")
            }
            levels.append(row)
            if partial:  # a long run keeps what it has measured so far
                pathlib.Path(partial).write_text(json.dumps(levels, indent=2) + "\n")
    finally:
        server.stop()
        app.state.engine.close()
    return {"warmup_s": warmup_s, "levels": levels, "engine": dict(vars(config))}


def _fmt(s: dict) -> str:
    return (
        f"TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms p99 {s['ttft_p99_s'] * 1e3:.0f} ms, "
        f"TPOT p50 {(s['tpot_p50_s'] or 0) * 1e3:.1f} ms, {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} tok/s"
    )


def table(results: dict) -> str:
    lines = [
        "| C | mode | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | req/s | "
        "out tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["levels"]:
        for mode in ("continuous", "static"):
            s = row[mode]
            lines.append(
                f"| {row['concurrency']} | {mode} | {s['ttft_p50_s'] * 1e3:.0f} | "
                f"{s['ttft_p99_s'] * 1e3:.0f} | {(s['tpot_p50_s'] or 0) * 1e3:.1f} | "
                f"{(s['tpot_p99_s'] or 0) * 1e3:.1f} | {s['requests_per_s']:.2f} | "
                f"{s['output_tokens_per_s']:.1f} |"
            )
        r = row["ratios"]
        lines.append(
            f"| {row['concurrency']} | continuous / static | | | | | "
            f"{r['requests_per_s']:.2f}x | {r['output_tokens_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=None, help="per level")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=1024, help="the context to serve")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("serve.json")))
    args = parser.parse_args(argv)

    import jax

    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests" / "infer"))
        from tiny_lm import tiny_lm

        lm, name = tiny_lm(), "tiny"
    else:
        from models import load_pretrained

        lm, name = load_pretrained(args.model, max_seq_len=args.max_seq_len), args.model
    results = run_benchmark(
        lm, name, tuple(args.concurrency), args.requests, args.prompt_tokens,
        (args.min_tokens, args.max_tokens), args.seed, partial=args.out + ".partial",
    )  # fmt: skip
    print(table(results))
    results.update(
        model=name,
        date=datetime.date.today().isoformat(),
        device=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        jax=jax.__version__,
        python=platform.python_version(),
        args=vars(args),
        median_ratio_tokens_per_s=statistics.median(
            r["ratios"]["output_tokens_per_s"] for r in results["levels"]
        ),
    )
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    pathlib.Path(args.out + ".partial").unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

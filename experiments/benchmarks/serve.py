"""Serving load test: our continuous-batching server, static batching, and llama.cpp's server.

Run from the repository root on an otherwise idle machine (the JSON records the load average;
the numbers are only comparable within one run):
  python experiments/benchmarks/serve.py [--llama-server PATH/TO/llama-server] \
      --out experiments/results/serve_cpu_DATE.json
Quick check: `--tiny --concurrency 1 4 --requests 8` (a tiny random model; no peer).

Method:
  * Each server is its own process on a free loopback port, started here and stopped after its
    runs, so the load generator (this process: httpx, asyncio) never shares an interpreter
    with a server. Ours: `python -m infer.serve` with max_batch = the highest concurrency and
    room in its KV cache for every sequence of the load at once.
  * Load, from --seed: max(4 C, 8) requests per level (--requests), so that under continuous
    batching clients keep refilling freed slots; each prompt is P random
    token ids (default 64) and each max_tokens is drawn from [--min-tokens, --max-tokens]
    (8..48), so requests end at different times. Greedy, `ignore_eos`, streamed
    (/v1/completions with token-id prompts): every server produces exactly the same number of
    tokens for the same load.
  * continuous: C clients, each sending its next request as soon as its previous one ends.
    static (our baseline): our server, but the requests go in waves of C and a wave starts
    only when all of the previous one has finished, as in static batching.
  * Per request: TTFT (send -> first token chunk), time per output token ((end - first token) /
    (tokens - 1)); per level: requests/s and output tokens/s over the wall time. p50 and p99.
  * Warm-up: before each timed run, the same load with other token ids (the same lengths)
    runs untimed, so every program shape the run needs is compiled before it is timed. Every
    run (warm-up or timed, each mode) draws its own token ids for the same lengths, so no run
    is served from the prefix cache of an earlier one; the servers see the same work.
  * Peer (--llama-server): llama.cpp's `llama-server` on the same model's GGUF file
    (SmolLM2-135M-Instruct Q4_1), `-np` = the highest concurrency (its continuous batching over
    parallel slots), `-t` = the cores. It computes on the 4-bit blocks; ours on the same
    weights dequantized to float32 (so it reads ~5x fewer weight bytes per token).
Prints a table and the ratios; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

DEFAULT_MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess; `url` once its /health answers 200."""

    def __init__(self, cmd: list[str], port: int, name: str, log: pathlib.Path, timeout=900):
        import httpx

        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{name} did not answer /health within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def make_load(num: int, vocab: int, prompt_tokens: int, token_range, seed: int, ids_seed=None):
    """num (prompt ids, max_tokens) pairs, the same for every mode and server. `ids_seed` draws
    other token ids for the same lengths: a warm-up load of the same shapes (so every program
    shape is compiled) that the prefix cache cannot serve to the timed load."""
    rng = np.random.default_rng(seed)
    ids = np.random.default_rng(seed if ids_seed is None else ids_seed)
    low, high = token_range
    limits = rng.integers(low, high + 1, num)
    return [([int(t) for t in ids.integers(100, vocab, prompt_tokens)], int(m)) for m in limits]


async def _one(client, url: str, model: str, prompt, max_tokens: int) -> dict:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    first, tokens, chunks = None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    first = first or end
    tokens = chunks if tokens is None else tokens  # one token per chunk if no usage came
    return {
        "ttft_s": first - start,
        "tpot_s": (end - first) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
    }


async def _drive(url: str, model: str, load, concurrency: int, static: bool) -> dict:
    import httpx

    results = []
    # A new connection per request, for every server: the llama-server build we compare with
    # (llama.cpp 0c1e570) shuts itself down when a kept-alive connection sends a second request.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
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


def measure(server: ServerProcess, model: str, levels, modes, load_for) -> dict[int, dict]:
    """{concurrency: {mode: summary}} of `server` for each level and mode; each level's load
    runs once untimed first (compilation), then timed. Each run's prompts have their own token
    ids (the same lengths): no run finds another's prompts in the server's prefix cache."""
    out = {}
    for c in levels:
        out[c] = {}
        for i, mode in enumerate(modes):
            static = mode == "static"
            warm, timed = load_for(c, ids=2 * i + 1), load_for(c, ids=2 * i + 2)
            asyncio.run(_drive(server.url, model, warm, c, static))
            out[c][mode] = asyncio.run(_drive(server.url, model, timed, c, static))
            print(f"{server.name} C={c} {mode}: {_fmt(out[c][mode])}", flush=True)
    return out


def ours_command(
    args: argparse.Namespace, model: str, port: int, top: int, num_blocks: int
) -> list[str]:
    cmd = [sys.executable, "-m", "infer.serve", "--model", model, "--port", str(port),
           "--max-batch", str(top), "--num-blocks", str(num_blocks), "--max-queue",
           str(4 * top + 16), "--embedding-model", ""]  # fmt: skip
    for flag in ("block_size", "prefill_chunk", "prefill_batch"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd + ([] if args.tiny else ["--max-seq-len", str(args.max_seq_len)])


def llama_server_command(binary: str, gguf: str, port: int, top: int, slot_ctx: int) -> list:
    # -c is the context of all slots together; -np slots decode together (continuous batching).
    return [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-np", str(top),
            "-c", str(top * slot_ctx), "-t", str(os.cpu_count()), "--no-webui"]  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> dict:
    """Starts each server in turn, measures every level; returns the results dict."""
    from models import load_pretrained

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="serve_bench_"))
    if args.tiny:  # a tiny random model, written as a Hugging Face dir for the server to load
        sys.path.insert(0, str(ROOT / "tests" / "infer"))
        from tiny_lm import tiny_lm

        from models.hf import save_hf_dir

        lm = tiny_lm()
        model = str(save_hf_dir(lm.model, workdir / "tiny", tokenizer=lm.tokenizer))
    else:
        model = args.model
        lm = load_pretrained(model, max_seq_len=args.max_seq_len)
    vocab, context = lm.model.cfg.vocab_size, lm.model.cfg.max_seq_len
    top, prompt, (low, high) = max(args.concurrency), args.prompt_tokens, args.token_range

    def load_for(c: int, ids: int):
        n = args.requests or max(4 * c, 8)
        return make_load(n, vocab, prompt, (low, high), args.seed, ids_seed=args.seed + ids)

    per_seq = -(-(prompt + high) // args.block_size)  # blocks for one request
    # Room for every sequence of the load at once, and for one whole context (the server's rule).
    num_blocks = max(top * per_seq, -(-context // args.block_size)) + 1
    port = free_port()
    ours = ServerProcess(
        ours_command(args, model, port, top, num_blocks), port, "ours", workdir / "ours.log"
    )
    try:
        results = {"ours": measure(ours, model, args.concurrency, ("continuous", "static"),
                                   load_for), "ours_startup_s": ours.startup_s}  # fmt: skip
    finally:
        ours.stop()
    if args.llama_server:
        gguf = args.gguf or str(_registry_gguf(model))
        port = free_port()
        peer = ServerProcess(
            llama_server_command(args.llama_server, gguf, port, top, 1 << (prompt + high).bit_length()),
            port, "llama.cpp", workdir / "llama_server.log",
        )  # fmt: skip
        try:
            results["llama_cpp"] = measure(peer, model, args.concurrency, ("continuous",),
                                           load_for)  # fmt: skip
            results["llama_cpp_version"] = _llama_version(args.llama_server)
        finally:
            peer.stop()
    levels = []
    for c in args.concurrency:
        row = {"concurrency": c, **results["ours"][c]}
        row["ratios"] = {"continuous_over_static": _ratios(row["continuous"], row["static"])}
        if "llama_cpp" in results:
            row["llama_cpp"] = results["llama_cpp"][c]["continuous"]
            row["ratios"]["ours_over_llama_cpp"] = _ratios(row["continuous"], row["llama_cpp"])
        levels.append(row)
    return {
        "levels": levels,
        "model": model if not args.tiny else "tiny",
        "ours_startup_s": results["ours_startup_s"],
        "llama_cpp_version": results.get("llama_cpp_version"),
        "engine": {
            "max_batch": top,
            "num_blocks": num_blocks,
            **{k: getattr(args, k) for k in ("block_size", "prefill_chunk", "prefill_batch")},
        },  # fmt: skip
    }


def _ratios(a: dict, b: dict) -> dict:
    return {k: a[k] / b[k] for k in ("requests_per_s", "output_tokens_per_s")}


def _registry_gguf(name: str) -> pathlib.Path:
    from models.hub import fetch_registered

    path = fetch_registered(name)
    if path.suffix != ".gguf":
        raise ValueError(f"{name} is not a GGUF model; give the peer's file with --gguf")
    return path


def _llama_version(binary: str) -> str:
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if proc.stdout + proc.stderr else ""


def _fmt(s: dict) -> str:
    return (
        f"TTFT p50 {s['ttft_p50_s'] * 1e3:.0f} ms p99 {s['ttft_p99_s'] * 1e3:.0f} ms, "
        f"TPOT p50 {(s['tpot_p50_s'] or 0) * 1e3:.1f} ms, {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} tok/s"
    )


def table(results: dict) -> str:
    lines = [
        "| C | server | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | req/s | "
        "out tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"continuous": "ours, continuous", "static": "ours, static waves",
             "llama_cpp": "llama.cpp server"}  # fmt: skip
    for row in results["levels"]:
        for key, name in names.items():
            if (s := row.get(key)) is None:
                continue
            lines.append(
                f"| {row['concurrency']} | {name} | {s['ttft_p50_s'] * 1e3:.0f} | "
                f"{s['ttft_p99_s'] * 1e3:.0f} | {(s['tpot_p50_s'] or 0) * 1e3:.1f} | "
                f"{(s['tpot_p99_s'] or 0) * 1e3:.1f} | {s['requests_per_s']:.2f} | "
                f"{s['output_tokens_per_s']:.1f} |"
            )
        for label, r in row["ratios"].items():
            lines.append(
                f"| {row['concurrency']} | {label.replace('_', ' ')} | | | | | "
                f"{r['requests_per_s']:.2f}x | {r['output_tokens_per_s']:.2f}x |"
            )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--llama-server", default="", help="llama.cpp's llama-server binary")
    parser.add_argument("--gguf", default="", help="the peer's GGUF (default: the registry's)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("serve.json")))
    args = parser.parse_args(argv)
    args.token_range = (args.min_tokens, args.max_tokens)
    return args


def main(argv=None) -> int:
    import jax

    args = parse_args(argv)
    results = run_benchmark(args)
    print(table(results))
    ratios = [r["ratios"] for r in results["levels"]]
    results.update(
        date=datetime.date.today().isoformat(),
        device=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        jax=jax.__version__,
        python=platform.python_version(),
        args={k: v for k, v in vars(args).items() if k != "token_range"},
        median_continuous_over_static_tokens_per_s=statistics.median(
            r["continuous_over_static"]["output_tokens_per_s"] for r in ratios
        ),
    )
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

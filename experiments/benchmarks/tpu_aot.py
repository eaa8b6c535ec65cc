"""Does the sharded train step fit a TPU slice? Compiled ahead of time on a CPU machine.

Run from the repository root (needs libtpu: `pip install -e ".[dev]"` on Linux x86_64):
  JAX_PLATFORMS=cpu python experiments/benchmarks/tpu_aot.py
  JAX_PLATFORMS=cpu python experiments/benchmarks/tpu_aot.py --only gpt2   # a subset
No TPU is used: libtpu describes each slice (`jax.experimental.topologies`), XLA's TPU compiler
compiles `parallel.train.make_sharded_train_step` for it, and its memory analysis gives the
bytes per device. On a 2-core CPU machine each case compiles in 0.5-10 minutes (the TPU
compiler rematerialises programs near the HBM limit, which is slow), so the full sweep is long.

Cases (CASES): GPT-2 124M and Llama 3.2 1B shapes, bf16 compute with float32 parameters and Adam
moments (mixed precision, as the trainer runs), the trainer's optimizer (clipped AdamW), whole
blocks rematerialised (`remat_policy="full"`), under FSDP, FSDP x tensor parallelism and, for
GPT-2, data parallelism, on v5e 2x2, v5e 2x4 and v5p 2x2x1.

Prints a markdown table; writes JSON to --out (default experiments/results/tpu_aot_<date>.json)
and the table with notes to --doc (default docs/tpu_aot.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from models.config import preset  # noqa: E402
from parallel import aot  # noqa: E402

GiB = 2**30

# (rules, mesh config): the mesh covers the whole slice.
STRATEGIES = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tp": {"fsdp": -1, "tensor": 2},
}
# (preset, topology, rules, batch, seq), most informative first: a realistic pretraining batch of
# 16k-32k tokens per step, halved for the 1B model on the smallest slice.
CASES = [
    ("gpt2-124m", "v5e:2x2", "fsdp", 32, 1024),
    ("llama3.2-1b", "v5e:2x4", "fsdp", 16, 2048),
    ("llama3.2-1b", "v5p:2x2x1", "fsdp", 16, 2048),
    ("gpt2-124m", "v5e:2x4", "fsdp_tp", 32, 1024),
    ("llama3.2-1b", "v5e:2x4", "fsdp_tp", 16, 2048),
    ("gpt2-124m", "v5e:2x2", "dp", 32, 1024),
    ("llama3.2-1b", "v5e:2x2", "fsdp", 8, 2048),
    ("gpt2-124m", "v5p:2x2x1", "fsdp", 32, 1024),
]


def run_case(model: str, topology: str, rules: str, batch: int, seq: int, remat: str) -> dict:
    cfg = preset(model, dtype="bfloat16", param_dtype="float32", remat_policy=remat)
    report = aot.compile_train_step(cfg, STRATEGIES[rules], rules, topology, batch, seq)
    return {
        "model": model,
        "params": cfg.num_params(),
        "batch": batch,
        "seq": seq,
        "remat_policy": remat,
        **report.to_dict(),
    }


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | topology | rules | mesh (data, fsdp, tensor) | batch x seq | args GiB | "
        "out GiB | alias GiB | temp GiB | code GiB | peak GiB | HBM GiB | fits | compile s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        m = r["mesh"]
        fits = "yes" if r["fits"] else ("no (compiler OOM)" if r["error"] else "no")
        lines.append(
            f"| {r['model']} | {r['topology']} | {r['rules']} | "
            f"{m['data']}, {m['fsdp']}, {m['tensor']} | {r['batch']} x {r['seq']} | "
            f"{_gib(r['argument_bytes'])} | {_gib(r['output_bytes'])} | "
            f"{_gib(r['alias_bytes'])} | {_gib(r['temp_bytes'])} | "
            f"{_gib(r['generated_code_bytes'])} | {_gib(r['peak_bytes'])} | "
            f"{_gib(r['hbm_bytes'])} | {fits} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def versions() -> dict:
    import libtpu

    return {
        "jax": jax.__version__,
        "libtpu": getattr(libtpu, "__version__", "unknown"),
        "python": platform.python_version(),
        "host": platform.machine(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    date = datetime.date.today().isoformat()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run cases whose model/topology/rules contain this")
    p.add_argument("--remat", default="full", help="ModelConfig.remat_policy of every case")
    p.add_argument("--out", default=str(ROOT / f"experiments/results/tpu_aot_{date}.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/tpu_aot.md"), help="'' to skip")
    p.add_argument("--from-json", default="", help="only rewrite --doc from this results JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(pathlib.Path(args.from_json).read_text())
        pathlib.Path(args.doc).write_text(doc(table(result["rows"]), result))
        return result
    ok, reason = aot.libtpu_available()
    if not ok:
        raise SystemExit(f"tpu_aot needs libtpu: {reason}")
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "rows": [],
    }
    for model, topology, rules, batch, seq in CASES:
        if args.only and args.only not in f"{model}/{topology}/{rules}":
            continue
        row = run_case(model, topology, rules, batch, seq, args.remat)
        result["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("model", "topology", "rules", "peak_bytes", "fits")}))
        print(f"  compiled in {row['compile_s']:.0f} s", flush=True)
        write(args, result)  # after every case: a long sweep that is stopped keeps its rows
    print(table(result["rows"]))
    return result


def write(args: argparse.Namespace, result: dict) -> None:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        pathlib.Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.doc).write_text(doc(table(result["rows"]), result))


def doc(md: str, result: dict) -> str:
    v = result["versions"]
    return f"""# TPU ahead-of-time compilation: memory per device

Generated by `experiments/benchmarks/tpu_aot.py` on {result["date"]} (jax {v["jax"]}, libtpu
{v["libtpu"]}, a CPU machine: no TPU was used). Each row compiles the sharded train step
(`parallel.train.make_sharded_train_step`: forward, backward, clipped AdamW update, state donated)
for the slice with `parallel.aot.compile_train_step` and reads XLA's memory analysis per device.

{md}

How to read it:
- bf16 compute, float32 parameters, gradients and Adam moments; whole blocks rematerialised
  (`remat_policy="full"`). Params: GPT-2 124M = 124M (tied head), Llama 3.2 1B = 1.24B.
- args: the inputs per device (train state shard + batch shard); out: the outputs; alias: the
  donated input bytes reused for outputs; temp: XLA's scratch (activations, gradients,
  all-gathered weights); code: the compiled program. peak = args + out - alias + temp + code,
  the compiler's estimate of what is resident at once, against the chip's HBM (v5e 16 GiB,
  v5p 95 GiB). "compiler OOM": the TPU compiler refused the program (RESOURCE_EXHAUSTED).
- Compile seconds are on a shared 2-core CPU machine, inflated by other work running beside it.
- Reproduce a row: `JAX_PLATFORMS=cpu python experiments/benchmarks/tpu_aot.py --only gpt2-124m/v5e:2x2`.
  Rows missing from the sweep in `CASES` were not run (compile time, see the JSON's date).

## The Pallas kernels on TPU

`tests/kernels/test_tpu_lowering.py` compiles the TPU (Mosaic) lowerings ahead of time for a
v5e core the same way: flash attention forward and backward (`kernels/flash_attention_tpu.py`;
bf16 head_dim 128 causal and fp32 head_dim 64, GQA, segment ids), paged decode attention
(`kernels/decode_attention_tpu.py`; bf16 and int8 KV) and the quantized matmul
(`kernels/quant_matmul_tpu.py`; int8 per channel and group 32, int4 group 32 and 128). Mosaic
accepting them proves block shapes and ops are legal on TPU; their numerics are checked against
the references by running the same TPU kernels in interpret mode (the `slow` tests there).
Their speed on a real TPU has not been measured, and the block sizes are not tuned.
"""


if __name__ == "__main__":
    main()

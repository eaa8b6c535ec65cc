"""Speed of our Pallas kernels beside XLA and cuDNN, relative to the device's measured roofs.

Run from the repository root (on GPU the defaults are the full sweep, a few minutes):
  python experiments/benchmarks/kernels.py --out experiments/results/kernels_h100_DATE.json
Quick check (~30 s on 2 CPU cores; the default on CPU): `python experiments/benchmarks/kernels.py --quick`.
On CPU the Pallas kernels run in interpret mode (an HLO loop over the grid): those numbers test
that the script runs, they are NOT performance numbers, and the output says so.

Sections:
  * Roofs, measured first: the bf16 matmul rate (a square [n, n] @ [n, n] bf16 matmul, float32
    accumulation) and the copy bandwidth (y = x + 1 over a big float32 array: read + write).
  * Attention (bf16, [B, T, N, H] layout, T = S, MHA): our `kernels.flash_attention` against
    `jax.nn.dot_product_attention(implementation='xla')` and `implementation='cudnn'` ("n/a"
    with the error where cuDNN is unavailable), forward and backward, causal and not. Shapes as in
    the FlashAttention-2 paper: B * T = 16k tokens, N * H = 2048.
  * Decode attention (bf16 and int8 KV, paged, GQA): our `kernels.decode_attention` against its
    XLA reference (`reference_decode_attention`), in achieved GB/s.
  * Quantized matmul: our `kernels.quant_matmul` (int8 per-channel, int4 group 128) against the
    bf16 `jnp.dot` at the same shape, M = 1, 16, 64 (decode) and one prefill M; GB/s, TFLOP/s and
    the speedup over bf16.

FLOP conventions (those of the FlashAttention papers, so numbers compare with theirs):
  * attention forward = 4 * B * N * T * S * H (two matmuls, QK^T and PV, 2 FLOPs per
    multiply-add); causal counts half of it, whatever the kernel really computes on the diagonal.
  * attention backward = 2.5 x forward (five matmuls: QK^T recomputed, dV, dP, dQ, dK); the
    backward time is that of the VJP alone (the forward and its residuals are computed before).
  * matmul = 2 * M * K * N. Softmax, scaling and dequantization are not counted.
Byte conventions (achieved GB/s = bytes / time, 1 GB = 1e9 bytes): bytes that must cross memory
at least once. Decode attention: the K and V cache entries up to each sequence's length (+ int8
scales), q, out, and the block table. Matmul: the stored weight (values, scales, offsets), x and
y. Copy: 2 x the array (read + write).

Timing: each function is jitted and called once untimed (compilation, reported as `compile_s`),
then R repeats (default 10 on GPU, 3 on CPU); each repeat issues I back-to-back calls (default 10
on GPU, 1 on CPU) and waits with `jax.block_until_ready`, so the per-call time is repeat / I and
host dispatch overlaps the device work. The median per-call time is reported.

Prints markdown tables; writes JSON to --out (default: kernels.json beside this script), with the
device, date and library versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python experiments/benchmarks/...` from a checkout

import kernels  # noqa: E402

LATEST_JSON = pathlib.Path(__file__).with_name("kernels.json")
ATTENTION_IMPLS = ("pallas", "xla", "cudnn")
INTERPRET_NOTE = (
    "CPU: the Pallas kernels ran in interpret mode (an HLO loop over the grid, for testing); "
    "these are NOT performance numbers."
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every shape the benchmark runs; `full()` on GPU, `quick()` on CPU or with --quick."""

    matmul_n: int  # roof: [n, n] @ [n, n] bf16
    copy_bytes: int  # roof: float32 array of this many bytes
    seq_lens: tuple[int, ...]
    head_dims: tuple[int, ...]
    tokens: int  # B * T per attention call
    model_dim: int  # N * H
    decode_batch: int
    decode_len: int  # tokens in each sequence's cache
    decode_heads: tuple[int, int]  # (N, K)
    decode_head_dim: int
    page_size: int
    qmm_k: int
    qmm_n: int
    qmm_m: tuple[int, ...]  # decode Ms, then the prefill M last

    @classmethod
    def full(cls) -> Sizes:
        # The quantized weight (K x N = 8192 x 28672, a 70B-class MLP) is bigger than the L2
        # cache even at int4 (~118 MB), so repeats read it from HBM.
        return cls(
            matmul_n=8192, copy_bytes=1 << 30, seq_lens=(1024, 2048, 4096, 8192),
            head_dims=(64, 128), tokens=16384, model_dim=2048, decode_batch=16,
            decode_len=4096, decode_heads=(32, 8), decode_head_dim=128, page_size=16,
            qmm_k=8192, qmm_n=28672, qmm_m=(1, 16, 64, 2048),
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            matmul_n=256, copy_bytes=1 << 22, seq_lens=(128,), head_dims=(64,), tokens=128,
            model_dim=128, decode_batch=2, decode_len=64, decode_heads=(4, 2),
            decode_head_dim=64, page_size=16, qmm_k=256, qmm_n=256, qmm_m=(1, 16, 64, 128),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Timing and roofs.


def time_fn(fn, *args, repeats: int, inner: int) -> dict:
    """Median seconds per call of `fn(*args)` after one untimed (compiling) call.

    Returns:
      {"compile_s", "seconds"}: the first call's time and the median per-call time.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return {"compile_s": compile_s, "seconds": statistics.median(times)}


def measure_matmul_rate(n: int, repeats: int, inner: int) -> dict:
    """bf16 [n, n] @ [n, n] (float32 accumulation, bf16 out): FLOP/s = 2 n^3 / time."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    t = time_fn(mm, a, b, repeats=repeats, inner=inner)
    return {"n": n, **t, "tflops": 2.0 * n**3 / t["seconds"] / 1e12}


def measure_copy_bandwidth(num_bytes: int, repeats: int, inner: int) -> dict:
    """y = x + 1 over a float32 array of `num_bytes`: GB/s = 2 * num_bytes / time."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    t = time_fn(jax.jit(lambda x: x + 1), x, repeats=repeats, inner=inner)
    return {"bytes": num_bytes, **t, "gb_per_s": 2.0 * num_bytes / t["seconds"] / 1e9}


def _error(e: Exception) -> str:
    return f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"


# ------------------------------------------------------------------------------------------------
# Attention.


def attention_flops(batch, heads, seq, head_dim, causal: bool) -> float:
    """Forward FLOPs by the convention of the module docstring (backward = 2.5x)."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def _attention_fn(impl: str, causal: bool):
    if impl == "pallas":
        return functools.partial(kernels.flash_attention, causal=causal)
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)


def bench_attention_case(impl, q, k, v, causal, repeats, inner) -> dict:
    """Forward and backward seconds of one implementation; errors become "n/a: ..." strings."""
    attn = _attention_fn(impl, causal)
    result = {}
    try:
        result["fwd"] = time_fn(jax.jit(attn), q, k, v, repeats=repeats, inner=inner)
    except Exception as e:  # cuDNN missing, a compile failure, out of memory: recorded, go on
        return {"fwd": _error(e), "bwd": _error(e)}
    do = jax.random.normal(jax.random.key(3), q.shape, q.dtype)
    try:
        # The VJP closure (a pytree holding the residuals) crosses jit, so only the backward
        # kernels are timed.
        out, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v))(q, k, v)
        bwd = jax.jit(lambda vjp_fn, do: vjp_fn(do))
        result["bwd"] = time_fn(bwd, vjp_fn, do, repeats=repeats, inner=inner)
        result["bwd"]["method"] = "vjp alone"
        del out, vjp_fn
    except Exception as e:
        try:  # a jax whose VJP closure cannot cross jit: (forward + backward) - forward
            both = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
            t = time_fn(both, q, k, v, do, repeats=repeats, inner=inner)
            t["seconds"] = max(t["seconds"] - result["fwd"]["seconds"], 1e-9)
            result["bwd"] = {**t, "method": f"fwd+bwd minus fwd ({_error(e)[5:80]})"}
        except Exception as e2:
            result["bwd"] = _error(e2)
    return result


def bench_attention(sizes: Sizes, matmul_tflops: float, repeats: int, inner: int) -> list[dict]:
    rows = []
    for head_dim in sizes.head_dims:
        for seq in sizes.seq_lens:
            batch, heads = max(1, sizes.tokens // seq), max(1, sizes.model_dim // head_dim)
            keys = jax.random.split(jax.random.key(seq + head_dim), 3)
            q, k, v = (
                jax.random.normal(x, (batch, seq, heads, head_dim), jnp.bfloat16) for x in keys
            )
            for causal in (True, False):
                fwd_flops = attention_flops(batch, heads, seq, head_dim, causal)
                row = {
                    "batch": batch, "seq_len": seq, "num_heads": heads, "head_dim": head_dim,
                    "causal": causal, "dtype": "bfloat16", "fwd_flops": fwd_flops,
                    "bwd_flops": 2.5 * fwd_flops,
                }  # fmt: skip
                for impl in ATTENTION_IMPLS:
                    r = bench_attention_case(impl, q, k, v, causal, repeats, inner)
                    for pass_, flops in (("fwd", fwd_flops), ("bwd", 2.5 * fwd_flops)):
                        if isinstance(r[pass_], dict):
                            tflops = flops / r[pass_]["seconds"] / 1e12
                            r[pass_] |= {"tflops": tflops, "of_matmul": tflops / matmul_tflops}
                    row[impl] = r
                for pass_ in ("fwd", "bwd"):
                    for peer in ("xla", "cudnn"):
                        ours, theirs = row["pallas"][pass_], row[peer][pass_]
                        ok = isinstance(ours, dict) and isinstance(theirs, dict)
                        row[f"{pass_}_pallas_over_{peer}"] = (
                            ours["tflops"] / theirs["tflops"] if ok else None
                        )
                rows.append(row)
            del q, k, v
    return rows


# ------------------------------------------------------------------------------------------------
# Decode attention and quantized matmul.


def _nbytes(*arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def bench_decode(sizes: Sizes, copy_gbs: float, repeats: int, inner: int) -> list[dict]:
    b, length, page = sizes.decode_batch, sizes.decode_len, sizes.page_size
    (n, kv_heads), h = sizes.decode_heads, sizes.decode_head_dim
    pages_per_seq = -(-length // page)
    num_pages = b * pages_per_seq
    kq, kk, kv, kp = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(kq, (b, n, h), jnp.bfloat16)
    k_pages = jax.random.normal(kk, (num_pages, page, kv_heads, h), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (num_pages, page, kv_heads, h), jnp.bfloat16)
    # Pages scattered over the cache, as a paged engine leaves them.
    block_tables = jax.random.permutation(kp, num_pages).reshape(b, pages_per_seq)
    block_tables = block_tables.astype(jnp.int32)
    lengths = jnp.full((b,), length, jnp.int32)
    (k8, ks), (v8, vs) = kernels.quantize_kv_int8(k_pages), kernels.quantize_kv_int8(v_pages)
    rows = []
    for kv_dtype, kp_, vp_, scales in (
        ("bfloat16", k_pages, v_pages, {}),
        ("int8", k8, v8, {"k_scales": ks, "v_scales": vs}),
    ):
        per_token = 2 * kv_heads * h * kp_.dtype.itemsize + (8 * kv_heads if scales else 0)
        num_bytes = b * length * per_token + 2 * _nbytes(q) + _nbytes(block_tables, lengths)
        row = {
            "batch": b, "kv_len": length, "num_heads": n, "num_kv_heads": kv_heads,
            "head_dim": h, "page_size": page, "kv_dtype": kv_dtype, "bytes": num_bytes,
        }  # fmt: skip
        for name, fn in (
            ("pallas", kernels.decode_attention),
            ("xla_reference", kernels.reference_decode_attention),
        ):
            call = jax.jit(lambda q, kp, vp, bt, ln, sc, fn=fn: fn(q, kp, vp, bt, ln, **sc))
            try:
                t = time_fn(call, q, kp_, vp_, block_tables, lengths, scales, repeats=repeats, inner=inner)  # fmt: skip
                gbs = num_bytes / t["seconds"] / 1e9
                row[name] = {**t, "gb_per_s": gbs, "of_copy": gbs / copy_gbs}
            except Exception as e:
                row[name] = _error(e)
        rows.append(row)
    return rows


def bench_quant_matmul(sizes: Sizes, copy_gbs: float, repeats: int, inner: int) -> list[dict]:
    k, n = sizes.qmm_k, sizes.qmm_n
    w = jax.random.normal(jax.random.key(11), (k, n), jnp.float32) / np.sqrt(k)
    weights = {
        "bf16": w.astype(jnp.bfloat16),
        "int8": kernels.quantize_int8(w),
        "int4": kernels.quantize_int4(w, group_size=128),
    }
    del w
    bf16_dot = jax.jit(
        lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    )
    quant = jax.jit(kernels.quant_matmul)
    rows = []
    for i, m in enumerate(sizes.qmm_m):
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        io_bytes = 2 * m * k + 2 * m * n  # bf16 x and y
        row = {"M": m, "K": k, "N": n, "kind": "prefill" if i == len(sizes.qmm_m) - 1 else "decode"}
        for name, wq in weights.items():
            w_bytes = _nbytes(wq) if name == "bf16" else _nbytes(wq.values, wq.scales, wq.offsets)
            fn = bf16_dot if name == "bf16" else quant
            try:
                t = time_fn(fn, x, wq, repeats=repeats, inner=inner)
                gbs = (w_bytes + io_bytes) / t["seconds"] / 1e9
                row[name] = {
                    **t, "weight_bytes": w_bytes, "gb_per_s": gbs, "of_copy": gbs / copy_gbs,
                    "tflops": 2.0 * m * k * n / t["seconds"] / 1e12,
                }  # fmt: skip
            except Exception as e:
                row[name] = _error(e)
        for name in ("int8", "int4"):
            ok = isinstance(row["bf16"], dict) and isinstance(row[name], dict)
            row[f"{name}_speedup_over_bf16"] = (
                row["bf16"]["seconds"] / row[name]["seconds"] if ok else None
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Report.


def machine_info() -> dict:
    import flax

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "flax_version": flax.__version__,
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def run_benchmark(args: argparse.Namespace) -> dict:
    """Roofs first, then the selected sections; returns the report (see format_tables)."""
    on_cpu = jax.default_backend() == "cpu"
    quick = args.quick or on_cpu
    sizes = Sizes.quick() if quick else Sizes.full()
    repeats = args.repeats or (3 if on_cpu else 10)
    inner = args.inner or (1 if on_cpu else 10)
    report = {
        **machine_info(),
        "settings": {
            "mode": "quick" if quick else "full",
            "pallas_interpret_mode": on_cpu,
            "repeats": repeats,
            "calls_per_repeat": inner,
            "sections": list(args.sections),
            "sizes": dataclasses.asdict(sizes),
        },
        "notes": [INTERPRET_NOTE] if on_cpu else [],
    }
    report["matmul_roof"] = measure_matmul_rate(sizes.matmul_n, repeats, inner)
    report["copy_roof"] = measure_copy_bandwidth(sizes.copy_bytes, repeats, inner)
    tflops, gbs = report["matmul_roof"]["tflops"], report["copy_roof"]["gb_per_s"]
    if "attention" in args.sections:
        report["attention"] = bench_attention(sizes, tflops, repeats, inner)
    if "decode" in args.sections:
        report["decode_attention"] = bench_decode(sizes, gbs, repeats, inner)
    if "matmul" in args.sections:
        report["quant_matmul"] = bench_quant_matmul(sizes, gbs, repeats, inner)
    return report


def _cell(r, key: str, spec: str = ".1f") -> str:
    if isinstance(r, str):
        return "n/a"
    return "-" if r is None or r.get(key) is None else format(r[key], spec)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_tables(report: dict) -> str:
    s = report["settings"]
    mm, cp = report["matmul_roof"], report["copy_roof"]
    lines = [
        f"Device: {report['device_kind']} ({report['backend']}), jax {report['jax_version']}, "
        f"{report['date']}; {s['mode']} sizes; median of {s['repeats']} repeats x "
        f"{s['calls_per_repeat']} calls after 1 warm-up call",
        *[f"NOTE: {note}" for note in report["notes"]],
        f"Roofs: bf16 matmul {mm['n']}^3 {mm['tflops']:.2f} TFLOP/s; copy of "
        f"{cp['bytes'] / 2**20:.0f} MiB {cp['gb_per_s']:.1f} GB/s",
    ]
    if "attention" in report:
        lines += [
            "",
            "Attention TFLOP/s (bf16; causal counts half; bwd = 2.5x fwd FLOPs; "
            "'of mm' = ours / bf16 matmul rate)",
            "| B x T | N x H | causal | pass | pallas | xla | cudnn | pallas of mm | "
            "pallas/xla | pallas/cudnn |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["attention"]:
            for p in ("fwd", "bwd"):
                lines.append(
                    f"| {r['batch']} x {r['seq_len']} | {r['num_heads']} x {r['head_dim']} | "
                    f"{'yes' if r['causal'] else 'no'} | {p} | "
                    + " | ".join(_cell(r[i][p], "tflops", ".2f") for i in ATTENTION_IMPLS)
                    + f" | {_cell(r['pallas'][p], 'of_matmul', '.2f')} | "
                    f"{_ratio(r[f'{p}_pallas_over_xla'])} | {_ratio(r[f'{p}_pallas_over_cudnn'])} |"
                )
    if "decode_attention" in report:
        lines += [
            "",
            "Decode attention GB/s ('of copy' = / measured copy bandwidth)",
            "| B x len | N/K x H | page | KV | pallas GB/s | of copy | XLA ref GB/s | of copy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["decode_attention"]:
            ours, ref = r["pallas"], r["xla_reference"]
            lines.append(
                f"| {r['batch']} x {r['kv_len']} | {r['num_heads']}/{r['num_kv_heads']} x "
                f"{r['head_dim']} | {r['page_size']} | {r['kv_dtype']} | {_cell(ours, 'gb_per_s')} | "
                f"{_cell(ours, 'of_copy', '.2f')} | {_cell(ref, 'gb_per_s')} | "
                f"{_cell(ref, 'of_copy', '.2f')} |"
            )
    if "quant_matmul" in report:
        lines += [
            "",
            "Quantized matmul y[M, N] = x[M, K] @ w[K, N] (bf16 x; int8 per channel, int4 group "
            "128); GB/s (of copy), TFLOP/s, speedup over bf16",
            "| M x K x N | bf16 GB/s | int8 GB/s | int4 GB/s | bf16 TFLOP/s | int8 TFLOP/s | "
            "int4 TFLOP/s | int8 speedup | int4 speedup |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["quant_matmul"]:
            gbs = " | ".join(
                f"{_cell(r[w], 'gb_per_s')} ({_cell(r[w], 'of_copy', '.2f')})"
                for w in ("bf16", "int8", "int4")
            )
            tfl = " | ".join(_cell(r[w], "tflops", ".3f") for w in ("bf16", "int8", "int4"))
            lines.append(
                f"| {r['M']} x {r['K']} x {r['N']} ({r['kind']}) | {gbs} | {tfl} | "
                f"{_ratio(r['int8_speedup_over_bf16'])} | {_ratio(r['int4_speedup_over_bf16'])} |"
            )
    errors = sorted(
        {
            v
            for sec in ("attention", "decode_attention", "quant_matmul")
            for v in _strings(report.get(sec, []))
        }
    )
    lines += [f"n/a reason: {e}" for e in errors]
    return "\n".join(lines)


def _strings(tree) -> list[str]:
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree)
        if isinstance(leaf, str) and leaf.startswith("n/a")
    ]


def write_json(report: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (the default on CPU)")
    p.add_argument("--repeats", type=int, default=0, help="R timed repeats; 0: 10 GPU, 3 CPU")
    p.add_argument("--inner", type=int, default=0, help="I calls per repeat; 0: 10 GPU, 1 CPU")
    p.add_argument(
        "--sections",
        default="attention,decode,matmul",
        type=lambda s: tuple(x for x in s.split(",") if x),
        help="comma-separated subset of attention,decode,matmul (the roofs always run)",
    )
    p.add_argument("--out", default="", help=f"JSON path; default {LATEST_JSON.relative_to(ROOT)}")
    args = p.parse_args(argv)
    unknown = set(args.sections) - {"attention", "decode", "matmul"}
    if unknown or args.repeats < 0 or args.inner < 0:
        p.error(f"unknown sections {sorted(unknown)} or negative --repeats/--inner")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(format_tables(report))
    path = pathlib.Path(args.out) if args.out else LATEST_JSON
    write_json(report, path)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()

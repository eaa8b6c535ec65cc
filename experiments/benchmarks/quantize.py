"""Perplexity and size of SmolLM2-135M-Instruct under weight-only quantization, in one table.

Run from the repository root (~10 minutes on 2 busy CPU cores):
  python experiments/benchmarks/quantize.py --out experiments/results/quantize_cpu_DATE.json
Smoke mode (a tiny random model, a few seconds; what tests/experiments run): `--quick`.

Rows: fp32, bf16 (weights and compute), int8 (per channel), int4 with groups of 128, 64 and 32
(models/quantize.py: asymmetric, GGUF-Q4_1-like; a group that does not divide SmolLM2's 576
input dims falls back to 64), and "gguf q4_1": the file's Q4_1 blocks used as they are
(`load_pretrained(..., quant="gguf")`). The quantized rows compute in float32 (dequantize, then
matmul); the embedding table (also the tied LM head) and the norms stay float32 in every row but
bf16.

The honest baseline: the only SmolLM2 weights in the project are the registry's Q4_1 GGUF
(models/hub.py), so "fp32" is those 4-bit weights dequantized, not the original bf16
checkpoint. The int8 and int4 rows requantize already-4-bit weights; int4 with groups of 32 can
then land almost exactly on Q4_1's own grid. The differences between rows measure our
quantizers relative to that baseline, not the loss of quantizing the original model.

Data: the held-out Shakespeare plays of train.corpus (DEFAULT_VAL_PLAYS, never trained on),
concatenated, the first --tokens tokens, cut into windows of --seq tokens (no overlap);
perplexity = exp(mean next-token NLL) over the seq - 1 predicted tokens of every window.
Size: bytes of every array the model holds (MB = 1e6 bytes), and of the projections alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.config import ModelConfig  # noqa: E402
from models.decoder import Decoder  # noqa: E402
from models.lora import projections  # noqa: E402
from models.quantize import QuantizedDense, model_bytes, quantize  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8", "int4-g128", "int4-g64", "int4-g32", "gguf-q4_1")


def as_bf16(model: nnx.Module) -> nnx.Module:
    """A copy with bfloat16 parameters and compute."""
    model = nnx.clone(model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "cfg"):
            node.cfg = node.cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
        if isinstance(node, nnx.Param):
            node.set_value(node[...].astype(jnp.bfloat16))
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
            node.dtype = jnp.bfloat16  # Embed keeps its compute dtype as an attribute
    return model


def projection_bytes(model: nnx.Module) -> int:
    total = 0
    for _, owner, name in projections(model):
        w = getattr(owner, name)
        total += w.nbytes if isinstance(w, QuantizedDense) else w[...].size * w[...].dtype.itemsize
    return total


def perplexity(model: nnx.Module, windows: np.ndarray, batch: int) -> float:
    """exp(mean NLL) of every window's next-token predictions: windows [W, T] int."""

    @nnx.jit
    def nll(model, tokens):
        logits = model(tokens[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()

    total = 0.0
    for start in range(0, len(windows), batch):
        total += float(nll(model, jnp.asarray(windows[start : start + batch])))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def build_variant(name: str, base: nnx.Module, gguf_loader) -> nnx.Module | None:
    if name == "fp32":
        return base
    if name == "bf16":
        return as_bf16(base)
    if name == "int8":
        return quantize(nnx.clone(base), "int8", None)
    if name.startswith("int4-g"):
        return quantize(nnx.clone(base), "int4", int(name.removeprefix("int4-g")))
    if name == "gguf-q4_1":
        return gguf_loader() if gguf_loader else None
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def load_real(model_name: str, tokens: int, seq: int):
    """(fp32 model, GGUF-block loader, windows, notes) for the registry model on Shakespeare."""
    from models import load_pretrained
    from train.corpus import DEFAULT_VAL_PLAYS, load_corpus

    lm = load_pretrained(model_name)
    text = "\n".join(doc.text for doc in load_corpus("shakespeare").val)
    ids = np.asarray(lm.tokenizer.encode(text[: tokens * 8]), np.int32)[: tokens - tokens % seq]
    if ids.size < seq:
        raise ValueError(f"only {ids.size} tokens of held-out text, fewer than --seq={seq}")
    loader = None
    if lm.gguf_file is not None:
        loader = lambda: load_pretrained(model_name, quant="gguf").model  # noqa: E731
    notes = [
        f"text: held-out plays {list(DEFAULT_VAL_PLAYS)}, first {ids.size} tokens",
        "fp32 = the registry's Q4_1 GGUF weights dequantized (the only SmolLM2 weights here)",
    ]
    return lm.model, loader, ids.reshape(-1, seq), notes


def load_quick(tokens: int, seq: int):
    """A tiny random llama and random tokens: checks the script, not the numbers."""
    cfg = ModelConfig(
        vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
        max_seq_len=seq, tie_embeddings=True,
    )  # fmt: skip
    ids = np.random.default_rng(0).integers(0, 256, tokens - tokens % seq).astype(np.int32)
    return Decoder(cfg, rngs=nnx.Rngs(0)), None, ids.reshape(-1, seq), ["quick: random model"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.seq = min(args.tokens, 128), min(args.seq, 32)
        base, gguf_loader, windows, notes = load_quick(args.tokens, args.seq)
    else:
        base, gguf_loader, windows, notes = load_real(args.model, args.tokens, args.seq)
    notes.append(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    report = {
        "date": datetime.date.today().isoformat(),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "jax_version": jax.__version__,
        "settings": {
            "model": "tiny-random" if args.quick else args.model,
            "tokens": int(windows.size),
            "seq": args.seq,
            "windows": int(windows.shape[0]),
            "mode": "quick" if args.quick else "full",
        },
        "rows": rows,
        "notes": notes,
    }
    out = args.out or pathlib.Path(__file__).with_name("quantize.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        model = build_variant(name, base, gguf_loader)
        if model is None:
            continue  # no GGUF file behind this model
        start = time.perf_counter()
        ppl = perplexity(model, windows, args.batch)
        groups = sorted({
            "per channel" if m.group_size == math.prod(m.shape[: m.num_contract]) else m.group_size
            for _, o, n in projections(model) for m in [getattr(o, n)]
            if isinstance(m, QuantizedDense)
        }, key=str)  # fmt: skip
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "size_mb": model_bytes(model) / 1e6,
                "projections_mb": projection_bytes(model) / 1e6,
                "group_sizes": groups,
                "eval_s": time.perf_counter() - start,
            }
        )
        print(f"{name}: ppl {ppl:.3f} ({rows[-1]['eval_s']:.0f} s)", flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after every row: long runs
    print(format_table(report))
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    base = next((r["perplexity"] for r in report["rows"] if r["variant"] == "fp32"), None)
    lines = [
        "| variant | perplexity | vs fp32 | size (MB) | projections (MB) | groups |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "n/a"
        groups = ",".join(map(str, r["group_sizes"])) or "-"
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.3f} | {delta} | {r['size_mb']:.1f} | "
            f"{r['projections_mb']:.1f} | {groups} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Bytes per device of parameters, gradients and Adam state under each sharding strategy.

Computed from the shardings the rules actually produce (parallel.sharding on an AbstractMesh,
shapes from jax.eval_shape): nothing is allocated, no devices are needed. Run from the
repository root:
  python experiments/benchmarks/sharding_memory.py
Prints a markdown table, writes experiments/results/sharding_memory.json and replaces the table
between the markers in docs/parallelism.md. Activations are not counted (they depend on batch,
sequence, remat and the pipeline's microbatches).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import numpy as np
from jax.sharding import AbstractMesh

from models.config import ModelConfig, gpt2
from parallel.mesh import MESH_AXES, mesh_shape
from parallel.train import abstract_train_state
from train.defaults import base_config
from train.optimizer import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "parallelism.md"
BEGIN, END = "<!-- sharding_memory:begin -->", "<!-- sharding_memory:end -->"

# Llama 2 7B (Touvron et al. 2023): 32 layers, D=4096, 32 heads (MHA), F=11008, 32k vocabulary.
LLAMA_7B = ModelConfig(
    vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=11008,
    max_seq_len=4096, norm="rmsnorm", mlp_activation="swiglu", position="rope",
)  # fmt: skip
MODELS = {"gpt2_124m": gpt2("124m"), "llama_7b": LLAMA_7B}
# (rules preset, mesh config): tensor parallelism within an 8-device node, pipeline over 4.
STRATEGIES = {
    "dp": ("dp", {"data": -1}),
    "fsdp": ("fsdp", {"fsdp": -1}),
    "dp_tp8": ("dp_tp", {"data": -1, "tensor": 8}),
    "fsdp_tp8": ("fsdp_tp", {"fsdp": -1, "tensor": 8}),
    "pp4_dp_tp2": ("pp_dp_tp", {"pipeline": 4, "data": -1, "tensor": 2}),
    "pp4_fsdp_tp2": ("pp_fsdp_tp", {"pipeline": 4, "fsdp": -1, "tensor": 2}),
}
DEVICE_COUNTS = (8, 64, 256)


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shard of every leaf (shards are equal: uneven splits replicate)."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def measure(cfg: ModelConfig, rules: str, mesh_config: dict, num_devices: int) -> dict:
    """{params, grads, opt_state, total} bytes on one device."""
    shape = mesh_shape(mesh_config, num_devices)
    mesh = AbstractMesh(tuple(shape.values()), MESH_AXES)
    opt = make_optimizer(base_config().optimizer, num_steps=1000)[0]
    _, state, _ = abstract_train_state(cfg, opt, mesh, rules)
    params = _bytes_per_device(state["params"])
    opt_state = _bytes_per_device(state["opt_state"])
    # Gradients are reduced (FSDP: reduce-scattered) into the parameters' sharding.
    return {
        "mesh": {k: v for k, v in shape.items() if v > 1},
        "params": params,
        "grads": params,
        "opt_state": opt_state,
        "total": 2 * params + opt_state,
    }


def run() -> dict:
    results = {}
    for model, cfg in MODELS.items():
        results[model] = {"num_params": cfg.num_params()}
        for name, (rules, mesh_config) in STRATEGIES.items():
            for n in DEVICE_COUNTS:
                results[model][f"{name}/{n}"] = measure(cfg, rules, mesh_config, n)
    return results


def markdown(results: dict) -> str:
    lines = []
    for model, rows in results.items():
        # MiB for the small model, GiB for the large one: one unit per table.
        unit, scale = ("GiB", 2**30) if rows["num_params"] > 1e9 else ("MiB", 2**20)

        def fmt(b: int, scale=scale) -> str:
            return f"{b / scale:,.0f}" if b >= 100 * scale else f"{b / scale:.3g}"

        lines += [
            f"**{model}** ({rows['num_params'] / 1e6:,.0f}M parameters, float32 weights, "
            f"AdamW): {unit} per device, params / grads / Adam state = total",
            "",
            "| strategy | " + " | ".join(f"{n} devices" for n in DEVICE_COUNTS) + " |",
            "|---|" + "---|" * len(DEVICE_COUNTS),
        ]
        for name in STRATEGIES:
            cells = []
            for n in DEVICE_COUNTS:
                r = rows[f"{name}/{n}"]
                cells.append(
                    f"{fmt(r['params'])} / {fmt(r['grads'])} / {fmt(r['opt_state'])} "
                    f"= **{fmt(r['total'])}**"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_doc(table: str, doc: pathlib.Path = DOC) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} markers for the table")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "experiments/results/sharding_memory.json"))
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/parallelism.md")
    args = parser.parse_args()
    results = run()
    table = markdown(results)
    print(table)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_doc:
        write_doc(table)


if __name__ == "__main__":
    main()

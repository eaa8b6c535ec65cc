"""The peer of train_throughput.py: nanoGPT's CPU "baby GPT" training loop, re-written in PyTorch.

Self-contained (torch and numpy only, nothing from this project) so it runs in any interpreter
with torch; train_throughput.py runs it as a subprocess on the same token streams as our run:
  PYTHON_WITH_TORCH experiments/benchmarks/nanogpt_peer.py \
      --train train.npy --val val.npy --steps 2000 --eval-every 500

What matches nanoGPT (karpathy/nanoGPT, config/train_shakespeare_char.py with its CPU overrides):
pre-LN GPT-2 blocks, LayerNorm and Linear without biases (bias=False), one fused qkv Linear,
causal F.scaled_dot_product_attention, exact GELU, tied token embedding / LM head, normal(0.02)
init with residual projections at 0.02/sqrt(2L), AdamW betas (0.9, 0.99) with weight decay on
>=2-D parameters only, gradient clipping at 1.0, and training batches of random 64-token windows
of the training stream (nanoGPT's get_batch).
What follows our trainer instead, so that the two runs can be compared number for number:
  * learning rate: optax's warmup_cosine_decay_schedule (0 -> lr linearly over `warmup` steps,
    cosine to min_lr at `decay_steps`); nanoGPT's differs by one step in the warmup.
  * validation: the windows our input pipeline evaluates (train/input_pipeline.py,
    make_eval_batches): the val stream cut into non-overlapping windows of block_size + 1 tokens
    (inputs = first block_size, targets = shifted by one), in order, whole batches of
    `eval_batch_size` only, the first `eval_batches` of them (0 = every whole batch, i.e. the
    whole held-out split). nanoGPT instead
    averages 200 random batches; ours is deterministic, so the two losses are directly comparable.
  * evaluation at every `eval_every` steps and after the last one (not at step 0).

Prints progress to stderr and one JSON line to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(embed_dim, bias=False)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.attn_out = nn.Linear(embed_dim, embed_dim, bias=False)
        self.ln_2 = nn.LayerNorm(embed_dim, bias=False)
        self.mlp_up = nn.Linear(embed_dim, 4 * embed_dim, bias=False)
        self.mlp_down = nn.Linear(4 * embed_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        # [B, T, D] -> [B, N, T, H]
        q, k, v = (
            z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for z in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_down(F.gelu(self.mlp_up(self.ln_2(x))))


class GPT(nn.Module):
    """GPT-2 with learned positions and the LM head tied to the token embedding."""

    def __init__(
        self, vocab_size: int, block_size: int, num_layers: int, num_heads: int, embed_dim: int
    ):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Embedding(block_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(embed_dim, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # Residual-stream projections at 0.02/sqrt(2L) (GPT-2 paper, section 2.3).
                residual = name.endswith(("attn_out.weight", "mlp_down.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * num_layers) if residual else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: [B, T] -> logits [B, T, V]
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_embed(idx) + self.pos_embed(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok_embed.weight.T


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, decay_steps, min_lr) at `step`."""
    if step < warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """Random windows of the token stream: inputs [B, T] and next-token targets [B, T]."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


def eval_windows(
    val: np.ndarray, block_size: int, batch_size: int, eval_batches: int
) -> torch.Tensor:
    """The validation rows our pipeline uses: [num_batches, B, block_size + 1]."""
    num_rows = len(val) // (block_size + 1)
    num_batches = num_rows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"{len(val)} val tokens do not fill one batch of {batch_size}x{block_size + 1}"
        )
    if eval_batches:
        num_batches = min(num_batches, eval_batches)
    rows = val[: num_batches * batch_size * (block_size + 1)]
    return torch.from_numpy(rows.astype(np.int64)).view(num_batches, batch_size, block_size + 1)


@torch.no_grad()
def evaluate(model: GPT, windows: torch.Tensor) -> float:
    """Token-weighted mean cross entropy over all validation windows."""
    model.eval()
    total = 0.0
    for batch in windows:
        logits = model(batch[:, :-1])
        total += F.cross_entropy(
            logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        ).item()
    model.train()
    return total / windows[:, :, 1:].numel()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help=".npy token ids of the training stream")
    p.add_argument("--val", required=True, help=".npy token ids of the validation stream")
    p.add_argument("--vocab-size", type=int, default=0, help="0: 1 + the largest id in the data")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--decay-steps", type=int, default=0, help="cosine horizon; 0: --steps")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=0, help="0: the whole val split")
    p.add_argument("--eval-batch-size", type=int, default=0, help="0: --batch-size")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: os.cpu_count()")
    args = p.parse_args(argv)

    start = time.perf_counter()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    train_np, val_np = np.load(args.train), np.load(args.val)
    vocab_size = args.vocab_size or int(max(train_np.max(), val_np.max())) + 1
    train = torch.from_numpy(train_np.astype(np.int64))
    eval_batch_size = args.eval_batch_size or args.batch_size
    windows = eval_windows(val_np, args.block_size, eval_batch_size, args.eval_batches)

    model = GPT(vocab_size, args.block_size, args.num_layers, args.num_heads, args.embed_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    decay_steps = args.decay_steps or args.steps

    step_times, eval_time, val_loss, loss = [], 0.0, float("nan"), torch.tensor(float("nan"))
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.min_lr, args.warmup, decay_steps)
        x, y = get_batch(train, args.batch_size, args.block_size, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step_times.append(time.perf_counter() - t0)  # eager CPU: the step is done here
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            t1 = time.perf_counter()
            val_loss = evaluate(model, windows)
            eval_time += time.perf_counter() - t1
            print(
                f"step {done}: train loss {loss.item():.4f}, val loss {val_loss:.4f}",
                file=sys.stderr,
            )

    train_time = sum(step_times)
    result = {
        "steps": args.steps,
        "train_time_s": train_time,
        "total_time_s": time.perf_counter() - start,
        "step_time_ms": 1e3 * statistics.median(step_times),
        "mean_step_time_ms": 1e3 * train_time / args.steps,
        "eval_time_s": eval_time,
        "val_loss": val_loss,
        "train_loss": loss.item(),
        "eval_tokens": windows[:, :, 1:].numel(),
        "num_params": sum(p.numel() for p in params),
        "torch_version": torch.__version__,
        "threads": threads,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""Supervised fine-tuning data: chat JSONL -> template-rendered tokens -> packed rows with masks.

Each line of a JSONL file is one conversation, `{"messages": [{"role": ..., "content": ...}]}`.
It is rendered with the model's chat template; the loss counts only the tokens of assistant
turns (their text and the end-of-turn token the template writes), never the system or user
text. Conversations are packed several to a row with segment ids and per-segment positions, so
packed examples never attend to each other (the causal mask also requires equal segment ids).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Messages = list[dict[str, Any]]


class SFTDataError(ValueError):
    """A malformed chat JSONL file or conversation."""


def load_chat_jsonl(path: str | os.PathLike) -> list[Messages]:
    """Reads conversations from a JSONL file, checking each line's shape.

    Raises:
      SFTDataError: naming the file and line of the first malformed conversation.
    """
    path = pathlib.Path(path)
    conversations = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: not valid JSON ({e.msg})") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise SFTDataError(f'{where}: expected {{"messages": [...]}} with a non-empty list')
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise SFTDataError(f"{where}: message {i} has no string 'role'")
                if not isinstance(m.get("content"), str):
                    raise SFTDataError(f"{where}: message {i} has no string 'content'")
            if not any(m["role"] == "assistant" for m in messages):
                raise SFTDataError(f"{where}: no assistant message, so nothing to learn from")
            conversations.append(messages)
    if not conversations:
        raise SFTDataError(f"{path} holds no conversations")
    return conversations


def write_chat_jsonl(path: str | os.PathLike, conversations: Iterable[Messages]) -> None:
    """Writes conversations as JSONL, atomically (a temporary file renamed into place)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def tokenize_conversation(tokenizer, messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a rendered conversation and a mask of the assistant tokens.

    An assistant turn's tokens are those between the conversation rendered up to it (with the
    generation prompt, i.e. the assistant header) and the conversation rendered through it:
    exactly what the model produces at inference time, its end-of-turn token included.

    Args:
      tokenizer: a `models.tokenizer.Tokenizer` with a chat template.
      messages: the conversation.

    Returns:
      (int32 ids [n], bool mask [n]): mask[i] is True where ids[i] is an assistant token.

    Raises:
      SFTDataError: the template renders an earlier prefix differently from the whole
        conversation (it then cannot be split into turns by rendering prefixes).
    """
    if tokenizer.chat_template is None:
        raise SFTDataError("the tokenizer has no chat template to render conversations with")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    mask = np.zeros(len(ids), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise SFTDataError(
                f"the chat template does not render message {i}'s prefix as a prefix of the "
                "whole conversation, so its assistant tokens cannot be located"
            )
        mask[len(before) : len(through)] = True
    return np.asarray(ids, dtype=np.int32), mask


@dataclasses.dataclass(frozen=True)
class PackedSFT:
    """Packed rows, each [num_rows, seq_len]: next-token inputs and targets, loss weights (1 on
    assistant targets), segment ids (1.. per example, 0 = padding) and per-segment positions."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    num_examples: int
    num_truncated: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "inputs": self.inputs,
            "targets": self.targets,
            "weights": self.weights,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
        }

    def loss_positions(self, multiple: int = 8) -> dict[str, np.ndarray]:
        """The rows with their loss gathered to the P positions that count, [num_rows, P].

        Assistant tokens are a small share of a chat, so the model computes logits only at
        `loss_positions` (models.Decoder's logits_positions): the LM head over a 49k vocabulary
        would otherwise cost about a fifth of a small model's step. `targets` and `weights`
        become [num_rows, P]; P (the most any row needs, rounded up to `multiple`) is the same
        for every row, so one compiled step serves every batch.
        """
        counts = (self.weights > 0).sum(axis=1)
        width = max(multiple, -(-int(counts.max()) // multiple) * multiple)
        shape = (len(self.inputs), width)
        positions = np.zeros(shape, np.int32)
        targets = np.zeros(shape, np.int32)
        weights = np.zeros(shape, np.float32)
        for r in range(len(self.inputs)):
            where = np.flatnonzero(self.weights[r] > 0)
            positions[r, : len(where)] = where
            targets[r, : len(where)] = self.targets[r, where]
            weights[r, : len(where)] = self.weights[r, where]
        rows = {k: v for k, v in self.as_dict().items() if k not in ("targets", "weights")}
        return {**rows, "loss_positions": positions, "targets": targets, "weights": weights}


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0
) -> PackedSFT:
    """Packs (ids, assistant mask) examples into rows of seq_len next-token pairs.

    An example of n tokens gives n - 1 (input, target) pairs, the target weighted 1 when it is
    an assistant token. Examples are placed in order, first-fit into the current row; one
    longer than seq_len + 1 tokens is cut to its first seq_len + 1 (counted in num_truncated).

    Args:
      examples: (int ids [n], bool mask [n]) pairs, e.g. from tokenize_conversation.
      seq_len: the row length T.
      pad_id: the id written into padding slots (they carry segment id 0 and weight 0).

    Returns:
      PackedSFT with arrays [num_rows, seq_len].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    rows: list[list[tuple[np.ndarray, ...]]] = []
    used = seq_len  # forces a new row for the first example
    truncated = 0
    for ids, mask in examples:
        if len(ids) != len(mask):
            raise ValueError(f"ids ({len(ids)}) and mask ({len(mask)}) differ in length")
        if len(ids) < 2:
            continue
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        pairs = (ids[:-1], ids[1:], mask[1:])
        if used + len(pairs[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(pairs)
        used += len(pairs[0])
    if not rows:
        raise ValueError("no example has the two tokens a next-token pair needs")
    shape = (len(rows), seq_len)
    out = {
        "inputs": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "weights": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, (inputs, targets, weights) in enumerate(row, 1):
            span = slice(start, start + len(inputs))
            out["inputs"][r, span] = inputs
            out["targets"][r, span] = targets
            out["weights"][r, span] = weights
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(inputs))
            start += len(inputs)
    return PackedSFT(**out, num_examples=sum(len(r) for r in rows), num_truncated=truncated)


def tokenize_conversations(tokenizer, conversations: Sequence[Messages]):
    """tokenize_conversation over a list, naming the conversation that fails."""
    out = []
    for i, messages in enumerate(conversations):
        try:
            out.append(tokenize_conversation(tokenizer, messages))
        except SFTDataError as e:
            raise SFTDataError(f"conversation {i}: {e}") from None
    return out


# ------------------------------------------------------------------------------------------------
# The trainer's SFT data: train batches and held-out batches from chat JSONL.


def _conversations(source: str, split: str, seed: int) -> list[Messages]:
    if source == "britannica_qa":
        from train.sft_britannica import britannica_qa

        return [messages for messages, _ in britannica_qa(split, seed)]
    if not source:
        raise SFTDataError(f"data.objective='sft' needs a chat JSONL file for the {split} split")
    return load_chat_jsonl(source)


def held_out_conversations(config: Any) -> list[Messages]:
    """The validation conversations of an SFT data config (data.val_source, or the built-in
    set's held-out split)."""
    source = config.get("val_source") or ""
    if not source and config.source == "britannica_qa":
        source = "britannica_qa"
    return _conversations(source, "val", config.seed)


def build_sft_datasets(config: Any, tokenizer, process_index: int = 0, process_count: int = 1):
    """A DataBundle of packed chat rows for the trainer (data.objective = "sft").

    Args:
      config: the `data` ConfigDict: source (a chat JSONL file or "britannica_qa"), val_source
        (JSONL; "" for the built-in set's held-out split), seq_len, batch_size, seed,
        eval_batches, eval_batch_size.
      tokenizer: the pretrained model's `models.tokenizer.Tokenizer` (it has the chat template).
      process_index / process_count: this process's share of the rows.

    Returns:
      A train.input_pipeline.DataBundle whose batches carry inputs, targets, weights,
      segment_ids and positions.
    """
    import grain

    from train.input_pipeline import _READ_OPTIONS, DataBundle, _per_process_batch

    local_batch = _per_process_batch(config.batch_size, process_index, process_count)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_examples = tokenize_conversations(
        tokenizer, _conversations(config.source, "train", config.seed)
    )
    val_examples = tokenize_conversations(tokenizer, held_out_conversations(config))
    train = pack_examples(train_examples, config.seq_len, pad_id)
    val = pack_examples(val_examples, config.seq_len, pad_id)
    for name, packed in (("train", train), ("val", val)):
        if packed.num_truncated:
            print(
                f"sft: {packed.num_truncated} {name} conversations cut to seq_len={config.seq_len}"
            )

    train_rows = train.loss_positions()
    rows = [{k: v[i] for k, v in train_rows.items()} for i in range(len(train.inputs))]
    rows = rows[process_index::process_count]
    if len(rows) < local_batch:
        raise SFTDataError(
            f"{len(rows)} packed training rows (this process) do not fill one batch of "
            f"{local_batch}; lower data.batch_size or data.seq_len"
        )
    train_ds = (
        grain.MapDataset.source(rows)
        .shuffle(seed=config.seed)
        .repeat(None)
        .batch(local_batch, drop_remainder=True)
        .to_iter_dataset(_READ_OPTIONS)
    )

    # Every held-out row counts: the last batch is filled with all-padding (weight 0) rows.
    eval_batch = _per_process_batch(
        config.get("eval_batch_size") or config.batch_size, process_index, process_count
    )
    val_rows = {k: v[process_index::process_count] for k, v in val.loss_positions().items()}
    num_batches = -(-len(val.inputs) // (eval_batch * process_count))  # same on every process
    if config.eval_batches:
        num_batches = min(num_batches, config.eval_batches)
    total = num_batches * eval_batch
    padded = {}
    for k, v in val_rows.items():
        fill = np.zeros((max(total - len(v), 0),) + v.shape[1:], v.dtype)
        padded[k] = np.concatenate([v, fill])[:total]
    eval_batches = [
        {k: v[i * eval_batch : (i + 1) * eval_batch] for k, v in padded.items()}
        for i in range(num_batches)
    ]
    return DataBundle(
        tokenizer=tokenizer,
        train_ds=train_ds,
        eval_batches=eval_batches,
        num_train_tokens=int(train.weights.sum()),
        num_val_tokens=int(val.weights.sum()),
        vocab_size=0,
    )

"""The training input pipeline: corpus -> tokenizer -> packed sequences -> grain batches.

Training batches come from an infinite, per-epoch reshuffled grain dataset whose iterator
state is a small JSON dict, so a resumed run continues at exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from typing import Any

import grain
import numpy as np

from train import corpus as corpus_lib
from train import tokenizers as tokenizers_lib
from train.objectives import BlankInfilling, SpanCorruption

OBJECTIVES = ("causal_lm", "span_corruption", "blank_infilling")

# One background thread assembles the next few batches while the device runs a step:
# a 64x256 batch costs ~2 ms of Python in grain, which a single thread hides; more threads
# only contend for the GIL since the packed array is already in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def pack_documents(
    docs_token_ids: list[list[int]] | list[np.ndarray], seq_len: int, eos_id: int | None
) -> np.ndarray:
    """Concatenates documents and cuts them into non-overlapping windows.

    An eos token follows every document when eos_id is not None, so the model sees where
    one document ends and learns to end its own. Windows are seq_len + 1 tokens long so
    that inputs = window[:-1] and targets = window[1:]; the tokens after the last whole
    window are dropped.

    Args:
      docs_token_ids: token ids of each document, in order.
      seq_len: the model's sequence length T.
      eos_id: the id appended after each document, or None for plain concatenation.

    Returns:
      int32 [num_seqs, seq_len + 1].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive")
    parts = []
    for ids in docs_token_ids:
        parts.append(np.asarray(ids, dtype=np.int64))
        if eos_id is not None:
            parts.append(np.array([eos_id], dtype=np.int64))
    tokens = np.concatenate(parts) if parts else np.zeros([0], np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids span [{tokens.min()}, {tokens.max()}], not int32 ids")
    window = seq_len + 1
    num_seqs = len(tokens) // window
    if num_seqs == 0:
        raise ValueError(
            f"{len(tokens)} tokens do not fill one sequence of seq_len + 1 = {window} tokens"
        )
    return tokens[: num_seqs * window].astype(np.int32).reshape(num_seqs, window)


def _to_example(window: np.ndarray) -> dict[str, np.ndarray]:
    """Splits windows [..., seq_len + 1] into inputs and next-token targets [..., seq_len]."""
    return {
        "inputs": np.ascontiguousarray(window[..., :-1]),
        "targets": np.ascontiguousarray(window[..., 1:]),
    }


def _per_process_batch(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"global batch_size={batch_size} is not a positive multiple of "
            f"process_count={process_count}"
        )
    return batch_size // process_count


def make_train_dataset(
    packed: np.ndarray,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    span_corruption: SpanCorruption | BlankInfilling | None = None,
) -> grain.IterDataset:
    """An infinite dataset of training batches, reshuffled every epoch.

    Each process keeps rows process_index::process_count of `packed` and yields batches of
    batch_size // process_count of them; a batch may straddle two epochs. Iterators are
    checkpointable: `it.get_state()` is a JSON-serialisable dict such as
    `{"next_index": 7}`, and `it.set_state(state)` on a fresh iterator resumes at that batch.

    Args:
      packed: int32 [num_seqs, seq_len + 1] from pack_documents.
      batch_size: the global batch size, summed over processes.
      seed: shuffle seed; the same seed gives the same batches.
      process_index: this process's index (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      span_corruption: turn each row (then [num_seqs, window]) into a T5 (SpanCorruption) or
        GLM (BlankInfilling) example with a fresh random span layout per row and epoch,
        instead of next-token inputs and targets.

    Returns:
      An IterDataset of {"inputs", "targets"}: int32 [batch_size // process_count, seq_len]
      (with span corruption: {"inputs", "decoder_inputs", "targets"}).
    """
    local_batch = _per_process_batch(batch_size, process_index, process_count)
    if packed.ndim != 2 or packed.shape[1] < 2:
        raise ValueError(f"packed must be [num_seqs, seq_len + 1], got shape {packed.shape}")
    rows = grain.MapDataset.source(packed)[process_index::process_count]
    if len(rows) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets none of the {len(packed)} sequences"
        )
    rows = rows.shuffle(seed=seed).repeat(None)  # Infinite; reshuffled every epoch.
    if span_corruption is not None:
        rows = rows.random_map(lambda row, rng: span_corruption.corrupt(row, rng), seed=seed)
        return rows.batch(local_batch, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)
    return (
        rows.batch(local_batch, drop_remainder=True)
        .map(_to_example)  # Once per batch rather than per row: ~20% less grain overhead.
        .to_iter_dataset(_READ_OPTIONS)
    )


def make_eval_batches(
    packed: np.ndarray,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    span_corruption: SpanCorruption | BlankInfilling | None = None,
) -> list[dict[str, np.ndarray]]:
    """Validation batches in order, unshuffled; the last partial batch is dropped.

    Sharded like make_train_dataset, but every process gets the same number of batches
    so that an evaluation loop with collectives cannot hang on a process that ran out.

    Args:
      packed: int32 [num_seqs, seq_len + 1].
      batch_size: the global batch size, summed over processes.
      max_batches: at most this many batches; None or 0 for all of them.
      process_index: this process's index.
      process_count: number of processes.
      span_corruption: as in make_train_dataset; row i always gets the same layout.

    Returns:
      A list of {"inputs", "targets"}: int32 [batch_size // process_count, seq_len].
    """
    local_batch = _per_process_batch(batch_size, process_index, process_count)
    num_batches = (len(packed) // process_count) // local_batch
    if num_batches == 0:
        raise ValueError(
            f"{len(packed)} validation sequences do not fill one batch of {batch_size}; "
            "lower batch_size or seq_len, or hold out more text"
        )
    if max_batches:
        num_batches = min(num_batches, max_batches)
    rows = packed[process_index::process_count][: num_batches * local_batch]
    batches = [rows[i * local_batch : (i + 1) * local_batch] for i in range(num_batches)]
    if span_corruption is None:
        return [_to_example(batch) for batch in batches]
    # Each row's span layout is seeded by its global row index: the same however many
    # processes share the evaluation.
    batches_out = []
    for b, batch in enumerate(batches):
        examples = []
        for j, row in enumerate(batch):
            global_row = process_index + (b * local_batch + j) * process_count
            examples.append(span_corruption.corrupt(row, np.random.default_rng(global_row)))
        batches_out.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
    return batches_out


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Everything the trainer needs from the data layer.

    Attributes:
      tokenizer: the tokenizer, saved in workdir/tokenizer.
      train_ds: infinite training batches (see make_train_dataset).
      eval_batches: validation batches (see make_eval_batches).
      num_train_tokens: tokens in the training documents, eos included, before packing.
      vocab_size: ids the model needs (the tokenizer's, plus span corruption's sentinels).
      span_corruption: the objective's settings when data.objective is "span_corruption" or
        "blank_infilling".
      num_val_tokens: the same for the validation documents.
    """

    tokenizer: tokenizers_lib.Tokenizer
    train_ds: grain.IterDataset
    eval_batches: list[dict[str, np.ndarray]]
    num_train_tokens: int
    num_val_tokens: int
    vocab_size: int = 0
    span_corruption: SpanCorruption | BlankInfilling | None = None


def _model_vocab_size(tokenizer, objective) -> int:
    if isinstance(objective, SpanCorruption):
        return objective.vocab_size
    if isinstance(objective, BlankInfilling):
        return objective.end_id + 1
    return tokenizer.vocab_size


def _encode(tokenizer: tokenizers_lib.Tokenizer, text: str) -> np.ndarray:
    # Whole documents at once: per-line calls would cost far more than the encoding itself.
    if isinstance(tokenizer, tokenizers_lib.CharTokenizer):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def _load_or_build_tokenizer(
    config: Any, train_docs: list[corpus_lib.Document], directory: pathlib.Path
) -> tokenizers_lib.Tokenizer:
    """Loads the run's saved tokenizer so ids stay stable on resume; else builds and saves it."""
    if (directory / tokenizers_lib.MANIFEST).exists():
        tokenizer = tokenizers_lib.load_tokenizer(directory)
        if tokenizer.kind != config.tokenizer:
            raise ValueError(
                f"{directory} holds a {tokenizer.kind!r} tokenizer but the config asks for "
                f"{config.tokenizer!r}; use a fresh workdir or the original config"
            )
        if tokenizer.kind.startswith("sentencepiece") and tokenizer.vocab_size != config.vocab_size:
            raise ValueError(
                f"{directory} holds a tokenizer with vocab_size={tokenizer.vocab_size} but the "
                f"config asks for vocab_size={config.vocab_size}"
            )
        return tokenizer
    tokenizer = tokenizers_lib.build_tokenizer(
        config.tokenizer, (d.text for d in train_docs), config.vocab_size
    )
    # Save beside the target and rename, so a crash never leaves a half-saved tokenizer.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tokenizer-tmp-", dir=directory.parent))
    try:
        tokenizer.save(staging)
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process saved first; use its tokenizer so every process agrees.
            if not (directory / tokenizers_lib.MANIFEST).exists():
                raise
            return tokenizers_lib.load_tokenizer(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def build_datasets(
    config: Any,
    workdir: str | os.PathLike,
    process_index: int = 0,
    process_count: int = 1,
) -> DataBundle:
    """Loads the corpus, gets the tokenizer, packs, and builds train and eval data.

    Args:
      config: an object with attributes source, val_names, tokenizer (a kind from
        tokenizers.TOKENIZER_KINDS), vocab_size, seq_len, batch_size (global), seed and
        eval_batches (most eval batches, 0 for all) and optionally eval_batch_size (0 or
        absent: batch_size); e.g. the config's `data` ConfigDict.
      workdir: the run directory; the tokenizer lives in workdir/tokenizer.
      process_index: this process's index (jax.process_index()).
      process_count: number of processes (jax.process_count()).

    Returns:
      The DataBundle.
    """
    corpus = corpus_lib.load_corpus(config.source, config.val_names)
    tokenizer = _load_or_build_tokenizer(config, corpus.train, pathlib.Path(workdir) / "tokenizer")
    train_ids = [_encode(tokenizer, d.text) for d in corpus.train]
    val_ids = [_encode(tokenizer, d.text) for d in corpus.val]
    extra = 0 if tokenizer.eos_id is None else 1  # The eos after each document.
    objective = config.get("objective") or "causal_lm"
    if objective not in OBJECTIVES:
        raise ValueError(f"data.objective={objective!r} is not one of {OBJECTIVES}")
    span = None
    window = config.seq_len
    if objective == "span_corruption":
        # Windows of seq_len raw tokens (pack_documents adds one for next-token targets).
        window -= 1
        span = SpanCorruption(
            window=config.seq_len,
            sentinel_start=tokenizer.vocab_size,
            noise_density=config.get("noise_density", 0.15),
            mean_span_length=config.get("mean_span_length", 3.0),
        )
    elif objective == "blank_infilling":
        window -= 1
        base = tokenizer.vocab_size  # [MASK], [S] and [E] follow the tokenizer's ids
        span = BlankInfilling(
            window=config.seq_len,
            mask_id=base,
            start_id=base + 1,
            end_id=base + 2,
            noise_density=config.get("noise_density", 0.15),
            mean_span_length=config.get("mean_span_length", 3.0),
        )
    train_packed = pack_documents(train_ids, window, tokenizer.eos_id)
    val_packed = pack_documents(val_ids, window, tokenizer.eos_id)
    return DataBundle(
        tokenizer=tokenizer,
        train_ds=make_train_dataset(
            train_packed, config.batch_size, config.seed, process_index, process_count, span
        ),
        eval_batches=make_eval_batches(
            val_packed,
            config.get("eval_batch_size") or config.batch_size,
            config.eval_batches,
            process_index,
            process_count,
            span,
        ),
        num_train_tokens=sum(len(ids) + extra for ids in train_ids),
        num_val_tokens=sum(len(ids) + extra for ids in val_ids),
        vocab_size=_model_vocab_size(tokenizer, span),
        span_corruption=span,
    )

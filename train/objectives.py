"""Pre-training objectives beyond next-token prediction.

Span corruption (T5; Raffel et al. 2020, section 3.1.4): a fraction `noise_density` of a
window's tokens, in spans of mean length `mean_span_length`, is cut out; each span is replaced
in the encoder input by one sentinel token, and the decoder learns to emit every sentinel
followed by the tokens it stands for:

    window:   The quick brown fox jumps over the lazy dog
    inputs:   The quick <S0> jumps over <S1> dog
    targets:  <S0> brown fox <S1> the lazy

For a window of R tokens the input and target lengths are fixed (R - noise + spans and
noise + spans), so batches have static shapes; the random span layout differs per example and
per epoch, deterministically from the data seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """T5's span corruption over windows of `window` tokens.

    Attributes:
      window: raw tokens per example (R).
      sentinel_start: the id of the first sentinel; sentinel k is sentinel_start + k. Sentinels
        are ids past the tokenizer's vocabulary (T5's "extra ids").
      decoder_start_id: the token the decoder input starts with (T5 uses its pad id); None:
        the id after the last sentinel, so a tokenizer without a pad id needs no new slot.
      noise_density: fraction of tokens corrupted.
      mean_span_length: average corrupted span length.
    """

    window: int
    sentinel_start: int
    decoder_start_id: int | None = None
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __post_init__(self):
        if self.decoder_start_id is None:
            object.__setattr__(self, "decoder_start_id", self.sentinel_start + self.num_sentinels)
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density={self.noise_density} must be in (0, 1)")
        if self.mean_span_length < 1.0:
            raise ValueError(f"mean_span_length={self.mean_span_length} must be >= 1")
        if self.num_spans > self.window - self.num_noise:
            raise ValueError(
                f"window={self.window} is too short for {self.num_spans} spans of noise "
                f"density {self.noise_density}"
            )

    @property
    def num_noise(self) -> int:
        return int(np.clip(round(self.window * self.noise_density), 1, self.window - 1))

    @property
    def num_spans(self) -> int:
        return max(int(round(self.num_noise / self.mean_span_length)), 1)

    @property
    def num_sentinels(self) -> int:
        return self.num_spans

    @property
    def vocab_size(self) -> int:
        """Ids the model needs: the tokenizer's, the sentinels and the decoder start."""
        return max(self.sentinel_start + self.num_sentinels, self.decoder_start_id + 1)

    @property
    def input_length(self) -> int:
        return self.window - self.num_noise + self.num_spans

    @property
    def target_length(self) -> int:
        return self.num_noise + self.num_spans

    def noise_mask(self, rng: np.random.Generator) -> np.ndarray:
        """Bool [window]: alternating kept and corrupted spans, starting with a kept one."""

        def segment(total: int, parts: int) -> np.ndarray:
            # `parts` positive lengths summing to `total`, uniformly over compositions.
            cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
            return np.diff(np.concatenate([[0], cuts, [total]]))

        keep = segment(self.window - self.num_noise, self.num_spans)
        noise = segment(self.num_noise, self.num_spans)
        lengths = np.stack([keep, noise], axis=1).reshape(-1)
        flags = np.tile([False, True], self.num_spans)
        return np.repeat(flags, lengths)

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One window [R] -> {"inputs", "decoder_inputs", "targets"} (int32, fixed lengths)."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.window,):
            raise ValueError(f"expected a window of {self.window} tokens, got {tokens.shape}")
        noise = self.noise_mask(rng)
        span_start = noise & ~np.concatenate([[False], noise[:-1]])
        span_index = np.cumsum(span_start) - 1  # which span each noise token belongs to
        sentinels = self.sentinel_start + span_index
        # Encoder input: kept tokens, and each span's first token replaced by its sentinel.
        inputs = np.where(span_start, sentinels, tokens)[~noise | span_start]
        # Target: each span as its sentinel followed by its tokens.
        targets = np.empty(self.target_length, np.int64)
        # The m-th corrupted token of span s sits after s + 1 sentinels.
        positions = np.arange(self.num_noise) + span_index[noise] + 1
        targets[positions] = tokens[noise]
        targets[positions[span_start[noise]] - 1] = sentinels[span_start]
        decoder_inputs = np.concatenate([[self.decoder_start_id], targets[:-1]])
        return {
            "inputs": inputs.astype(np.int32),
            "decoder_inputs": decoder_inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
        }

    def reconstruct(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The original window from a corrupted input and its target (the inverse of corrupt)."""
        spans: dict[int, list[int]] = {}
        current = None
        for token in np.asarray(targets).tolist():
            if self.is_sentinel(token):
                current = token
                spans[current] = []
            elif current is not None:
                spans[current].append(token)
        out: list[int] = []
        for token in np.asarray(inputs).tolist():
            out.extend(spans.get(token, []) if self.is_sentinel(token) else [token])
        return np.asarray(out, np.int32)

    def is_sentinel(self, token: int) -> bool:
        return self.sentinel_start <= token < self.sentinel_start + self.num_sentinels


@dataclasses.dataclass(frozen=True)
class BlankInfilling:
    """GLM's autoregressive blank infilling (Du et al. 2022, section 2.1).

    Spans of the window (laid out as in SpanCorruption) are replaced by one [MASK] each; the
    corrupted text is part A. Part B holds the spans in random order, each as [S] + span,
    predicting span + [E]. The model is one decoder with a prefix-LM mask: part A attends to
    itself both ways, part B causally to A and to the spans before it. Positions are 2D: the
    first is the position in part A (a span's tokens all take their [MASK]'s), the second the
    position inside the span (0 in part A, 1.. in B). Only part B's tokens carry loss.

    Every example is `length = window + 2 * num_spans` tokens, with keys inputs, targets,
    weights, positions, block_positions and prefix_len (the length of part A).
    """

    window: int
    mask_id: int
    start_id: int
    end_id: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    @property
    def layout(self) -> SpanCorruption:
        return SpanCorruption(
            self.window, sentinel_start=0, decoder_start_id=0,
            noise_density=self.noise_density, mean_span_length=self.mean_span_length,
        )  # fmt: skip

    @property
    def num_spans(self) -> int:
        return self.layout.num_spans

    @property
    def length(self) -> int:
        return self.window + 2 * self.num_spans

    @property
    def prefix_length(self) -> int:
        return self.window - self.layout.num_noise + self.num_spans

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens)
        if tokens.shape != (self.window,):
            raise ValueError(f"expected a window of {self.window} tokens, got {tokens.shape}")
        noise = self.layout.noise_mask(rng)
        span_start = noise & ~np.concatenate([[False], noise[:-1]])
        keep = ~noise | span_start
        part_a = np.where(span_start, self.mask_id, tokens)[keep]
        mask_positions = np.flatnonzero(part_a == self.mask_id)
        if len(mask_positions) != self.num_spans:  # a real token equal to mask_id
            raise ValueError(f"token id {self.mask_id} ([MASK]) occurs in the text")
        span_id = np.cumsum(span_start) - 1
        spans = [tokens[noise & (span_id == s)] for s in range(self.num_spans)]
        inputs, targets, positions, blocks = [part_a], [np.zeros_like(part_a)], [], []
        positions.append(np.arange(len(part_a)))
        blocks.append(np.zeros(len(part_a), np.int64))
        for s in rng.permutation(self.num_spans):
            span = spans[s]
            inputs.append(np.concatenate([[self.start_id], span]))
            targets.append(np.concatenate([span, [self.end_id]]))
            positions.append(np.full(len(span) + 1, mask_positions[s]))
            blocks.append(np.arange(1, len(span) + 2))
        weights = np.zeros(self.length, np.float32)
        weights[len(part_a) :] = 1.0
        return {
            "inputs": np.concatenate(inputs).astype(np.int32),
            "targets": np.concatenate(targets).astype(np.int32),
            "weights": weights,
            "positions": np.concatenate(positions).astype(np.int32),
            "block_positions": np.concatenate(blocks).astype(np.int32),
            "prefix_len": np.int32(len(part_a)),
        }

    def reconstruct(self, example: dict[str, np.ndarray]) -> np.ndarray:
        """The original window from an example (its inputs, positions and prefix_len)."""
        n = int(example["prefix_len"])
        part_a = np.asarray(example["inputs"][:n]).tolist()
        fills: dict[int, list[int]] = {}
        for token, position in zip(example["inputs"][n:], example["positions"][n:], strict=True):
            if token == self.start_id:
                fills[int(position)] = []
            else:
                fills[int(position)].append(int(token))
        out: list[int] = []
        for i, token in enumerate(part_a):
            out.extend(fills[i] if token == self.mask_id else [token])
        return np.asarray(out, np.int32)

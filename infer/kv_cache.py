"""The paged KV cache: a block allocator with prefix caching, and the device page arrays.

Every sequence owns a list of fixed-size blocks (its block table); a block of a prompt that is
full and written is registered under a hash of its tokens and of everything before it, so a
later prompt with the same prefix reuses it (reference counted) instead of recomputing it.
Block 0 is never handed out: writes of padding and of idle batch rows land there.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from models.layers import PagedKVCache


def block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """A chained hash per full block of tokens: block i's depends on blocks 0..i."""
    out, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = ",".join(map(str, tokens[start : start + block_size])).encode()
        parent = hashlib.blake2b(parent + b"|" + chunk, digest_size=16).digest()
        out.append(parent)
    return out


class BlockAllocator:
    """Hands out blocks 1..num_blocks-1, reference counted, with a prefix cache.

    A free block may still hold a registered prefix: it is reused on a cache hit, and evicted
    (least recently freed first) only when a fresh block is needed. `used` counts blocks that
    some sequence holds, so it drops to 0 when every sequence has finished.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (i, None) for i in range(1, num_blocks)
        )
        self.cached: dict[bytes, int] = {}  # prefix hash -> block
        self.hash_of: dict[int, bytes] = {}
        self.hits = 0  # blocks served from the prefix cache

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest registered prefix of `hashes` (not yet taken)."""
        blocks = []
        for h in hashes:
            if (block := self.cached.get(h)) is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> bool:
        hit = self.cached_prefix(hashes)
        needed = self.blocks_for(num_tokens) - len(hit)
        return needed <= len(self.free) - sum(1 for b in hit if b in self.free)

    def allocate(self, num_tokens: int, hashes: Sequence[bytes] = ()) -> tuple[list[int], int]:
        """Blocks for num_tokens: the cached prefix of `hashes` first, then fresh ones.

        Returns (block table, number of leading blocks that came from the cache).
        """
        if not self.can_allocate(num_tokens, hashes):
            raise MemoryError(f"{self.blocks_for(num_tokens)} blocks asked, {len(self.free)} free")
        table = self.cached_prefix(hashes)
        for block in table:
            self.free.pop(block, None)
            self.refs[block] += 1
        self.hits += len(table)
        hit = len(table)
        self.grow(table, self.blocks_for(num_tokens) - hit)
        return table, hit

    def grow(self, table: list[int], num_blocks: int) -> None:
        """Appends num_blocks fresh blocks to a sequence's table."""
        if num_blocks > len(self.free):
            raise MemoryError(f"{num_blocks} blocks asked, {len(self.free)} free")
        for _ in range(num_blocks):
            block, _ = self.free.popitem(last=False)  # the least recently freed
            if (old := self.hash_of.pop(block, None)) is not None:
                del self.cached[old]  # evict its prefix: the block gets new contents
            self.refs[block] = 1
            table.append(block)

    def register(self, table: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Publishes written full prompt blocks (table[i] holds the block of hashes[i])."""
        for block, h in zip(table, hashes, strict=False):
            if h not in self.cached and block not in self.hash_of:
                self.cached[h], self.hash_of[block] = block, h

    def release(self, table: Sequence[int]) -> None:
        for block in table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The shape of the paged cache; `capacity()` is what the server states at start-up."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_seq_len: int
    dtype: str = "float32"  # or "int8" (symmetric per slot and head, float32 scales)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.block_size)

    def bytes(self) -> int:
        per_slot = self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize
        if self.dtype == "int8":
            per_slot += self.num_kv_heads * 4
        return 2 * self.num_layers * self.num_blocks * self.block_size * per_slot

    def capacity(self) -> dict[str, int]:
        usable = self.num_blocks - 1
        return {
            "blocks": usable,
            "block_size": self.block_size,
            "tokens": usable * self.block_size,
            "bytes": self.bytes(),
            "max_seqs_at_full_context": usable // self.max_blocks_per_seq,
        }

    def check(self) -> None:
        """Refuses a cache that cannot hold one sequence of the model's whole context."""
        if (self.num_blocks - 1) < self.max_blocks_per_seq:
            raise ValueError(
                f"a KV cache of {self.num_blocks - 1} usable blocks x {self.block_size} tokens "
                f"cannot hold one sequence of the model's context ({self.max_seq_len} tokens = "
                f"{self.max_blocks_per_seq} blocks): raise num_blocks to at least "
                f"{self.max_blocks_per_seq + 1}"
            )

    def init(self) -> PagedKVCache:
        """Zeroed pages [L, P, C, K, H] (+ scales [L, P, C, K] for int8); tables left empty."""
        shape = (self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads)
        # Separate buffers for keys and values: the engine's steps donate them.
        key, value = (jnp.zeros(shape + (self.head_dim,), self.dtype) for _ in range(2))
        scales = [jnp.ones(shape, jnp.float32) if self.dtype == "int8" else None for _ in "kv"]
        empty = jnp.zeros((0,), jnp.int32)
        return PagedKVCache(key, value, empty, empty, empty, *scales)


def with_rows(
    cache: PagedKVCache, block_tables: jax.Array, lengths: jax.Array, num_new: jax.Array
) -> PagedKVCache:
    """The cache with this call's per-row tables [B, M], lengths [B] and new-token counts [B]."""
    return cache._replace(block_tables=block_tables, lengths=lengths, num_new=num_new)

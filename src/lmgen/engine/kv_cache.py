"""The paged KV cache: fixed-size blocks of K/V slots, a BlockManager that hands them out, and a prefix cache.

Memory is split into `num_blocks` blocks of `block_size` token slots (vLLM's PagedAttention, Kwon et al.,
2023). A request owns a block table; a full block is hashed by (hash of the previous block, its token ids),
so requests sharing a prefix (a system prompt, the earlier turns of a chat) share those blocks and skip
their prefill. Each block is hashed once, when it fills (SHA-256 chained with its parent's hash, as vLLM's
`sha256` prefix hashing: Python's `hash` of int tuples is not randomised, so colliding prompts could be crafted),
and a hit is verified against the block's stored parent hash and token ids before it is reused. Freed blocks keep their hash until they are reused, so a later request can still hit them;
blocks with nothing cached are reused first, so resident memory follows the tokens in use, not the reservation.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from lmgen.engine.request import Request
from lmgen.errors import InvalidOptionError


# kv_cache_dtype values; "auto": float16 for a float32 model on the CPU (half the bytes the attention reads per
# token, checked against the float32 cache in tests/test_kv_cache_dtype.py), else the model's dtype; "int8": rows
# of int8 values with a float16 scale per 32 (llama.cpp's q8_0 cache: 0.53 of float16's bytes)
KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int8": torch.int8}


def cache_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one cached K or V row: head_dim, or for int8 head_dim values then head_dim / 32 float16 scales
    (2 bytes each).  InvalidOptionError where int8 cannot hold the head (head_dim not a multiple of 32)."""
    if dtype != torch.int8:
        return head_dim
    if head_dim % 32:
        raise InvalidOptionError(f"kv_cache_dtype 'int8' needs a head_dim that is a multiple of 32; this model's is "
                                 f"{head_dim}", param="kv_cache_dtype", value="int8")
    return head_dim + head_dim // 16


def resolve_kv_cache_dtype(value: object, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """A kv_cache_dtype option -> the cache's torch dtype; InvalidOptionError (naming the value) for anything else."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise InvalidOptionError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {value!r}",
                                 param="kv_cache_dtype", value=value, choices=tuple(KV_CACHE_DTYPES))
    chosen = KV_CACHE_DTYPES[value]
    if chosen is not None:
        return chosen
    return torch.float16 if torch.device(device).type == "cpu" and model_dtype == torch.float32 else model_dtype


class KVCache:
    """Per layer, K and V tensors of (num_blocks + 1, n_kv_heads, block_size, row) (row: `cache_row_width`, the
    head_dim but for int8): a flat cache slot s is
    row s % block_size of block s // block_size, so one block's rows of one KV head are contiguous (what the
    attention kernel reads, csrc/attention.h).

    Block 0 is the null block: zeros, never handed out. Padding in the attention gather reads it, so every
    other block can start uninitialised (torch.empty): the OS maps its pages in only when a request writes
    them, and an idle cache costs no resident memory.  `dtype` may be narrower than the model's (float16, int8):
    K/V are rounded when written and widened to float32 when read (lmgen.layers.attention).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.layers = []
        row = cache_row_width(head_dim, dtype)
        for _ in range(num_layers):
            # K, V: (blocks, kv_heads, block_size, row)
            k = torch.empty(num_blocks + 1, num_kv_heads, block_size, row, dtype=dtype, device=device)
            v = torch.empty(num_blocks + 1, num_kv_heads, block_size, row, dtype=dtype, device=device)
            k[0].zero_()
            v[0].zero_()
            self.layers.append((k, v))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write for a forked beam: its partial last block gets a private copy."""
        for k, v in self.layers:
            k[dst] = k[src]
            v[dst] = v[src]

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)


class BlockManager:
    """Allocates cache blocks 1..num_blocks to requests (0 is KVCache's null block), with reference counts
    and a hash-keyed prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * (num_blocks + 1)
        self.block_hash: list[bytes | None] = [None] * (num_blocks + 1)
        # what a cached block holds, checked on every hit: (parent block's hash, this block's token ids)
        self.block_key: list[tuple[bytes, tuple[int, ...]] | None] = [None] * (num_blocks + 1)
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks, in the order `_take` hands them out:
        #  1. freed blocks holding no cached prefix, most recently freed first (their pages are resident already);
        #  2. never-used blocks (the OS maps their pages in on first write, so the cache's resident memory grows
        #     only when the blocks in use do);
        #  3. freed blocks holding a cached prefix, least recently freed first (evicting its hash).
        self.free_plain: OrderedDict[int, None] = OrderedDict()
        self.fresh: list[int] = list(range(num_blocks, 0, -1))  # popped from the end: lowest index first
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.prefix_hits = 0  # blocks served from the prefix cache, for metrics
        self.prefix_queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.fresh) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def _take(self) -> int:
        """A free block for a new owner (ref count 1); a cached prefix in it is forgotten."""
        if self.free_plain:
            block, _ = self.free_plain.popitem(last=True)
        elif self.fresh:
            block = self.fresh.pop()
        else:
            block, _ = self.free_cached.popitem(last=False)
            self.hash_to_block.pop(self.block_hash[block], None)
            self.block_hash[block] = self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def hash_block(parent: bytes, tokens: tuple[int, ...]) -> bytes:
        """A full block's key: SHA-256 of its parent's key and its token ids (the chain makes it name the whole prefix)."""
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()

    def block_hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        """The request's first `num_full_blocks` block keys; each is computed once and kept on the request."""
        hashes, bs = req.block_hashes, self.block_size
        while len(hashes) < num_full_blocks:
            b = len(hashes)
            hashes.append(self.hash_block(hashes[-1] if hashes else b"", req.token_slice(b * bs, (b + 1) * bs)))
        return hashes[:num_full_blocks]

    def allocate_prefix(self, req: Request) -> int:
        """At admission: reuse cached blocks for the longest matching prefix; returns tokens served.
        At least one token is always left to compute, since its logits are needed to sample."""
        if not self.enable_prefix_caching or req.block_table or req.params.prompt_logprobs is not None:
            return 0  # prompt_logprobs need every prompt position computed (vLLM skips the cache for them too)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits, parent, bs = [], b"", self.block_size
        for b, h in enumerate(self.block_hashes(req, max_blocks)):
            block = self.hash_to_block.get(h)
            # a hash collision must never serve another prompt's KV: the block must hold exactly these tokens
            if block is None or self.block_key[block] != (parent, req.token_slice(b * bs, (b + 1) * bs)):
                break
            hits.append(block)
            parent = h
        self.prefix_queries += max_blocks
        self.prefix_hits += len(hits)
        for block in hits:
            self._ref(block)
        req.block_table = hits
        req.num_hashed_blocks = len(hits)
        req.num_computed_tokens = len(hits) * self.block_size
        return req.num_computed_tokens

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        return need <= self.num_free_blocks

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Makes room for `num_new_tokens` more tokens in `req`'s block table; False if blocks ran out."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(max(need, 0)):
            req.block_table.append(self._take())
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """After a step: register every block whose slots are all computed under its prefix hash."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(req.num_computed_tokens, req.num_tokens) // bs
        start = req.num_hashed_blocks  # blocks before it were registered (or found cached) already
        if full <= start:
            return
        hashes = self.block_hashes(req, full)
        for b in range(start, full):
            block, h = req.block_table[b], hashes[b]
            if block and self.block_hash[block] is None and h not in self.hash_to_block:  # 0: released
                self.block_hash[block] = h
                self.block_key[block] = (hashes[b - 1] if b else b"", req.token_slice(b * bs, (b + 1) * bs))
                self.hash_to_block[h] = block
        req.num_hashed_blocks = full

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Shares the parent's blocks with a child (a forked beam). Returns (src, dst) when the partial last block
        needs a private copy (the caller copies the K/V); with no free block for it the child gets no blocks."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            if block:  # 0: a block released out of the sliding window
                self._ref(block)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_released_blocks = parent.num_released_blocks
        child.block_hashes, child.num_hashed_blocks = list(parent.block_hashes), parent.num_hashed_blocks
        if parent.num_computed_tokens % self.block_size == 0:
            return None
        src = child.block_table.pop()
        self._unref(src)
        if not self.num_free_blocks:
            self.free_request(child)
            return None
        dst = self._take()
        child.block_table.append(dst)
        return src, dst

    def free_request(self, req: Request) -> None:
        """Returns a finished/preempted/aborted request's blocks; hashed ones stay findable until reused."""
        for block in reversed(req.block_table):
            if block:  # 0: released out of the sliding window already
                self._unref(block)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_released_blocks = 0
        req.num_hashed_blocks = 0

    def trim(self, req: Request, num_tokens: int) -> None:
        """Speculative decoding's rollback: gives back the trailing blocks past the first `num_tokens` slots (they
        held only rejected proposals; never hashed, since only blocks of accepted tokens are)."""
        keep = self.blocks_needed(num_tokens)
        while len(req.block_table) > keep:
            block = req.block_table.pop()
            if block:
                self._unref(block)

    def release_out_of_window(self, req: Request, window: int) -> None:
        """Sliding-window attention: gives back the leading blocks that no later query can see (the next
        position p = num_computed_tokens sees positions > p - window, so blocks wholly at or below p - window
        are dead); their table entries become the null block 0, keeping positions where they were."""
        dead = min((req.num_computed_tokens - window + 1) // self.block_size, len(req.block_table))
        for b in range(req.num_released_blocks, dead):
            self._unref(req.block_table[b])
            req.block_table[b] = 0
        req.num_released_blocks = max(req.num_released_blocks, dead)

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # a prefix-cache hit on a freed block
            self.free_cached.pop(block, None)
        self.ref_counts[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            (self.free_plain if self.block_hash[block] is None else self.free_cached)[block] = None

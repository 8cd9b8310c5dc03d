"""Positions, attention and the KV cache: what both model families build the same way.

A graph is one of three kinds:
- a forward (`generation=None`): the prompt's tokens at positions 0 .. S-1, logits of
  every row;
- a prefill (`Generation(capacity, decode=False)`): the same, and every layer that computes
  K/V also writes them into its cache; only the last row's logits, the row-slice placed
  before the lm_head where the e-graph sees it;
- a step (`Generation(capacity, decode=True)`): rows at positions given on the device,
  their K/V written into the caches, attention over the caches. One row is a decode step;
  up to `reach` rows of one sequence at consecutive positions are a prefill chunk (any
  prompt is a few chunks of a few sizes: inference/generation.py); with several
  `sequences`, row i is the next token of sequence i (a batched decode step).

A layer's cache is persistent state, `cache.{layer}.k` / `.v`, [sequences * slots, kv heads *
head dim], a block of slots per sequence: a slot per position up to `capacity` on
full-attention layers, a ring of `window + reach - 1` slots on sliding-window ones (a
chunk's rows then never overwrite a position a row of the chunk still attends to).
KV-shared layers attend to their producer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.graph import Graph
from ..errors import ConfigError


@dataclass(frozen=True)
class Generation:
    capacity: int  # positions a sequence's caches hold: prompt + new tokens
    decode: bool  # rows at device-given positions over the caches (else the prompt, from 0)
    sequences: int = 1  # sequences the caches hold; a step over several takes a row each
    reach: int = 1  # the most rows of one sequence a step takes (a ring keeps window + reach - 1)
    # the logits of the "last" row, of "all" rows, or of the "row" a device input names
    # (a prefill chunk's last prompt token: the rows after it are padding)
    logits: str = "last"


def check(seq_len: int, generation: Generation | None) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if generation is None:
        return
    gen = generation
    if gen.logits not in ("last", "all", "row"):
        raise ConfigError(f"logits must be 'last', 'all' or 'row', got {gen.logits!r}")
    if gen.sequences < 1 or gen.reach < 1:
        raise ConfigError(f"sequences and reach must be >= 1, got {gen.sequences}, {gen.reach}")
    if gen.sequences > 1 and not (gen.decode and seq_len == gen.sequences and
                                  gen.logits == "all"):
        raise ConfigError(f"a step over {gen.sequences} sequences takes one row each and gives "
                          f"every row's logits, got {seq_len} rows")
    if gen.decode and gen.sequences == 1 and seq_len > gen.reach:
        raise ConfigError(f"a step of {seq_len} rows exceeds its reach of {gen.reach}")
    if gen.capacity < seq_len:
        raise ConfigError(f"cache capacity {gen.capacity} is below the {seq_len} tokens")


def positions(g: Graph, seq_len: int, generation: Generation | None) -> tuple[int, int]:
    """(the positions node, the bound below them): 0 .. S-1 made at load time, or a step's
    positions, a device input."""
    if generation is not None and generation.decode:
        return g.input_u32("positions", (seq_len,)), generation.capacity
    return g.arange(seq_len), seq_len


@dataclass
class KV:
    """A layer's keys and values as attention reads them: fresh (a forward, a prefill) or
    the updated caches (a decode step)."""

    k: int
    v: int
    writes: tuple[int, ...] = ()  # cache writes the graph runs for their effect


def store(g: Graph, layer: int, k: int, v: int, pos: int, slots: int,
          generation: Generation | None) -> KV:
    """k, v of a layer that computes its own: written into its cache when generating."""
    if generation is None:
        return KV(k, v)
    width, b = g[k].shape[1], generation.sequences
    kc = g.cache_write(g.state(f"cache.{layer}.k", (b * slots, width)), k, pos, sequences=b)
    vc = g.cache_write(g.state(f"cache.{layer}.v", (b * slots, width)), v, pos, sequences=b)
    return KV(kc, vc, (kc, vc)) if generation.decode else KV(k, v, (kc, vc))


def slots(window: int | None, generation: Generation | None) -> int:
    """Cache rows of a layer a sequence: every position, or a ring of the window and the
    rows a step may add beyond it."""
    if generation is None:
        return 0  # (a forward writes no cache)
    cap = generation.capacity
    return cap if window is None else min(window + generation.reach - 1, cap)


def attend(g: Graph, q: int, kv: KV, pos: int, heads: int, kv_heads: int, head_dim: int,
           window: int | None, scale: float, generation: Generation | None) -> int:
    """Causal (window None) or sliding-window attention of q over k, v; in a step, of the
    rows over the caches."""
    if generation is not None and generation.decode:
        return g.cache_attention(q, kv.k, kv.v, pos, heads, kv_heads, head_dim, scale,
                                 window=window or 0, sequences=generation.sequences)
    if window is None:
        return g.causal_attention(q, kv.k, kv.v, heads, kv_heads, head_dim, scale)
    return g.sliding_window_attention(q, kv.k, kv.v, heads, kv_heads, head_dim, window, scale)


def last_row(g: Graph, h: int, seq_len: int, generation: Generation | None) -> int:
    """A prefill computes the logits of its last row only, unless asked for all: the slice
    before the lm_head. A chunk's row is a device input (`logit_row`, [1]), gathered."""
    if generation is not None and generation.logits == "row":
        return g.embedding(g.input_u32("logit_row", (1,)), h)
    if generation is not None and generation.logits == "last" and seq_len > 1:
        return g.slice_rows(h, seq_len - 1, 1)
    return h

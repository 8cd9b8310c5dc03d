"""Positions, attention and the KV cache: what both model families build the same way.

A graph is one of three kinds:
- a forward (`generation=None`): the prompt's tokens at positions 0 .. S-1, logits of
  every row;
- a prefill (`Generation(capacity, decode=False)`): the same, and every layer that computes
  K/V also writes them into its cache; only the last row's logits, the row-slice placed
  before the lm_head where the e-graph sees it;
- a decode step (`Generation(capacity, decode=True)`): one token at a position given on the
  device, its K/V written into the caches, attention over the caches.

A layer's cache is persistent state, `cache.{layer}.k` / `.v`, [slots, kv heads * head dim]:
a slot per position up to `capacity` on full-attention layers, a ring of `window` slots on
sliding-window ones. KV-shared layers attend to their producer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.graph import Graph
from ..errors import ConfigError


@dataclass(frozen=True)
class Generation:
    capacity: int  # positions the caches hold: prompt + new tokens
    decode: bool  # one token at a device-given position (else the prompt, from position 0)


def check(seq_len: int, generation: Generation | None) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    if generation is None:
        return
    if generation.decode and seq_len != 1:
        raise ConfigError(f"a decode step takes one token, got seq_len {seq_len}")
    if generation.capacity < seq_len:
        raise ConfigError(f"cache capacity {generation.capacity} is below the {seq_len} tokens")


def positions(g: Graph, seq_len: int, generation: Generation | None) -> tuple[int, int]:
    """(the positions node, the bound below them): 0 .. S-1 made at load time, or a decode
    step's position, a device input."""
    if generation is not None and generation.decode:
        return g.input_u32("positions", (1,)), generation.capacity
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
    width = g[k].shape[1]
    kc = g.cache_write(g.state(f"cache.{layer}.k", (slots, width)), k, pos)
    vc = g.cache_write(g.state(f"cache.{layer}.v", (slots, width)), v, pos)
    return KV(kc, vc, (kc, vc)) if generation.decode else KV(k, v, (kc, vc))


def slots(window: int | None, generation: Generation | None) -> int:
    """Cache rows of a layer: every position, or a ring of the window."""
    cap = generation.capacity if generation else 0
    return cap if window is None else min(window, cap)


def attend(g: Graph, q: int, kv: KV, pos: int, heads: int, kv_heads: int, head_dim: int,
           window: int | None, scale: float, generation: Generation | None) -> int:
    """Causal (window None) or sliding-window attention of q over k, v; in a decode step, of
    the one query over the caches."""
    if generation is not None and generation.decode:
        return g.cache_attention(q, kv.k, kv.v, pos, heads, kv_heads, head_dim, scale)
    if window is None:
        return g.causal_attention(q, kv.k, kv.v, heads, kv_heads, head_dim, scale)
    return g.sliding_window_attention(q, kv.k, kv.v, heads, kv_heads, head_dim, window, scale)


def last_row(g: Graph, h: int, seq_len: int, generation: Generation | None) -> int:
    """A prefill computes the logits of its last row only: the slice before the lm_head."""
    if generation is not None and not generation.decode and seq_len > 1:
        return g.slice_rows(h, seq_len - 1, 1)
    return h

"""Rows normalized straight into the KV cache: a decode step's k (norm + RoPE) and v (norm)
rows are written by the row kernel that makes them.

cache_write(c, norm_rope(x, w, pos), pos) reads x once and writes the cache slot, instead
of writing the row, launching the copy, and reading it back. Only where the cache is the
row's sole reader does this save anything (a decode step: attention reads the cache). A
prefill's attention reads the fresh rows too, so their row kernel runs anyway: there the
fused write of a weighted, rotated row costs more than the copy (it reads the norm weight
again) and extraction keeps the copy; the unweighted norm's costs the
same bytes as the copy, and either may be chosen.
"""

from egglog import f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor

cache_rows = ruleset(name="cache_rows")


@cache_rows.register
def _(c: Tensor, x: Tensor, w: Tensor, pos: Tensor, m: Tensor, eps: f64, theta: f64, hd: i64,
      rot: i64, limit: i64):
    yield rule(m == c.cache_write(x.norm_rope(w, pos, eps, theta, hd, rot, limit), pos),
               name="norm + rope written into the cache by the row kernel").then(
        union(m).with_(c.norm_rope_write(x, w, pos, eps, theta, hd, rot, limit)))
    yield rule(m == c.cache_write(x.head_norm_rope(w, pos, eps, hd, theta, rot, limit), pos),
               name="per-head norm + rope written into the cache by the row kernel").then(
        union(m).with_(c.head_norm_rope_write(x, w, pos, eps, hd, theta, rot, limit)))
    yield rule(m == c.cache_write(x.unit_rms_norm(eps, hd), pos),
               name="unweighted per-head norm written into the cache by the row kernel").then(
        union(m).with_(c.unit_norm_write(x, pos, eps, hd)))

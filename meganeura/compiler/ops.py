"""The op vocabulary: one declaration per op, from which the rest of the pipeline follows.

A declaration gives the op's tensor operands, its literal attributes (with their types and
defaults), its shape rule, its reference formula (plain PyTorch, `formulas.py`), a one-line
doc, the kernel archetype that runs it, and what the cost model needs (vector FLOPs per
output element, whether its output belongs to the fp32 residual stream); and, for an op
that may run inside another kernel, its locality ("element" or "row") and the operands the
kernel's running value may take. From the table:
- `Graph` builds any op by name (`g.head_rms_norm(x, w, eps, head_dim)`), checked by the rule;
- `compiler/egraph.py` generates the egglog constructor (`Tensor.head_rms_norm`), and, for
  an op with a locality, its stage constructors (`Stage.head_rms_norm_0`);
- `rewrites/epilogue.py` generates the rules that fuse it into every archetype taking it;
- `runtime/reference.py` runs the formula; `compiler/cost.py` prices it.
A new element op touches this file, its expression in `codegen/elementwise.py` and its
case in `tests/op_cases.py` (docs/extending.md).

Each differentiable op also declares its gradient (`grad`): the vector-Jacobian product
built from ops of this table, so that `compiler/autodiff.py` writes the backward of any
graph in the same IR, where the e-graph sees forward and backward together. The backward
ops (`*_grad`, `matmul_tn`, `place_cols`, `cross_entropy`) are ops of the table like the
others: a formula, a cost, a kernel (codegen/).

Fused kernels are not ops of their own: they are the archetype ops (`product`, `rows`,
`pointwise`, `gather`, declared in `compiler/kernels.py`) with stages as attributes.

A shape rule takes the input shapes, input dtypes and attributes and returns the output
shape, or raises _Mismatch with what is wrong; Graph turns that into a GraphError that
names the node. The e-graph extractor runs the same rules over e-classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import formulas as fm

FLOAT, U32 = "f32", "u32"
Shape = tuple[int, ...]


class _Mismatch(Exception):
    """Raised by shape rules; `Graph._node` turns it into a GraphError naming the node."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise _Mismatch(msg)


def _rank(s: Shape, r: int, what: str) -> None:
    _need(len(s) == r, f"{what} must have rank {r}, got shape {list(s)}")


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]  # tensor operands, in order
    attrs: tuple[tuple[str, type], ...]  # literal attributes (float, int or str), in order
    shape: Callable | None  # (shapes, dtypes, attrs) -> shape
    reference: Callable | None  # (attrs, *tensors) -> tensor
    doc: str
    kind: str = "compute"  # leaf | constant | compute | layout (weights only, load time) | view
    # the kernel archetype that runs it (codegen/): product, rows, pointwise, gather,
    # attention, decode_attention, kv_cache; None for what launches nothing
    archetype: str | None = None
    vector_flops: float = 0.0  # per output element (elementwise and row ops)
    stream: bool = False  # output held in fp32 (the residual stream) whatever the plan dtype
    defaults: dict = field(default_factory=dict)  # attr -> f(attrs), or a constant, when omitted
    inplace: bool = False  # the kernel updates operand 0's buffer (state) and returns it
    out_dtype: str = FLOAT
    rows: tuple[int, ...] = ()  # operands whose row i alone makes the output's row i
    locality: str | None = None  # element | row: it may run as a stage of another kernel
    through: tuple[int, ...] = (0,)  # operands a kernel's running value may be, as a stage
    pairs: bool = False  # a binary op that may combine a product's two column halves
    commutative: bool = False  # a binary op whose operands may swap
    indices: tuple[str, ...] = ()  # operands holding integer indices (token ids, positions)
    variadic: bool = False  # an archetype op: its stages' operands follow `inputs`
    # its gradient: (graph, node, d output, wanted input ids) -> [(input id, d input)], the
    # backward built with the graph's own ops (compiler/autodiff.py); None: not differentiable
    grad: Callable | None = None

    @property
    def arity(self) -> int:
        return len(self.inputs)

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.attrs)


OPS: dict[str, OpSpec] = {}


def _op(name, inputs, attrs, shape, reference, doc, **kw) -> None:
    OPS[name] = OpSpec(name, tuple(inputs), tuple(attrs), shape, reference, doc, **kw)


# ---- shape rules: (input shapes, input dtypes, attrs) -> output shape ---------------------


def _embedding(s, d, a):
    ids, table = s
    _rank(ids, 1, "token ids")
    _rank(table, 2, "embedding table")
    _need(d[0] == U32, f"token ids must be u32, got {d[0]}")
    return (ids[0], table[1])


def _matmul(s, d, a):
    x, w = s[:2]
    _rank(x, 2, "left operand")
    _rank(w, 2, "right operand")
    _need(x[1] == w[0], f"inner dims differ: left is {list(x)}, right is {list(w)}")
    return (x[0], w[1])


def _same(s, d, a):
    _need(s[0] == s[1], f"shapes differ: {list(s[0])} vs {list(s[1])}")
    return s[0]


def _eps(a):
    _need(a["eps"] > 0, f"eps must be > 0, got {a['eps']}")


def _heads(width: int, hd: int, what: str = "width") -> None:
    _need(hd > 0, f"head_dim must be > 0, got {hd}")
    _need(width % hd == 0, f"{what} {width} is not a multiple of head_dim {hd}")


def _rms_norm(s, d, a):
    x, w = s[:2]
    _rank(x, 2, "normalized input")
    _need(w == (x[1],), f"norm weight must be [{x[1]}] to match input {list(x)}, got {list(w)}")
    _eps(a)
    return x


def _head_rms_norm(s, d, a):
    x = s[0]
    _rank(x, 2, "normalized input")
    _heads(x[1], a["head_dim"])
    if len(s) > 1:
        _need(s[1] == (a["head_dim"],), f"per-head norm weight must be [{a['head_dim']}], "
                                       f"got {list(s[1])}")
    _eps(a)
    return x


def _rope(s, d, a):
    x = s[0]
    _rank(x, 2, "rotated input")
    _positions(x, s[-1], d[-1])
    _need(a["limit"] > 0, f"limit (positions are below it) must be > 0, got {a['limit']}")
    hd = a["head_dim"]
    _need(hd > 0 and hd % 2 == 0, f"head_dim must be even and > 0, got {hd}")
    _heads(x[1], hd)
    _need(a["theta"] > 0, f"theta must be > 0, got {a['theta']}")
    _need(0 <= a["rotary"] <= hd // 2, f"rotary must be in [0, {hd // 2}], got {a['rotary']}")
    if a.get("scale_factor", 1.0) != 1.0:
        _need(a["scale_factor"] > 0 and 0 < a["low_freq_factor"] < a["high_freq_factor"]
              and a["original_limit"] > 0, "llama3 scaling needs scale_factor > 0, "
              "0 < low_freq_factor < high_freq_factor and original_limit > 0")
    return x


def _attention(s, d, a):
    q, k, v = s
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        _rank(t, 2, what)
    h, kvh, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    _need(h > 0 and kvh > 0 and hd > 0, f"heads {h}, kv heads {kvh}, head_dim {hd} must be > 0")
    _need(h % kvh == 0, f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    _need(q[1] == h * hd, f"q is {list(q)}, expected width num_heads*head_dim = {h * hd}")
    _need(k[1] == kvh * hd, f"k is {list(k)}, expected width num_kv_heads*head_dim = {kvh * hd}")
    _need(v == k, f"v is {list(v)}, k is {list(k)}: they must match")
    _need(q[0] == k[0], f"q has {q[0]} rows, k has {k[0]}")
    _need(a.get("window", 1) > 0, f"window must be > 0, got {a.get('window')}")
    _need(a["scale"] > 0, f"scale must be > 0, got {a['scale']}")
    return q


def _glu(s, d, a):
    _need(a["act"] in fm.ACTIVATIONS, f"act must be one of {', '.join(fm.ACTIVATIONS)}, "
                                      f"got {a['act']!r}")
    return _same(s, d, a)


def _scale(s, d, a):
    _need(a["factor"] > 0, f"factor must be > 0, got {a['factor']}")
    return s[0]


def _scale_by(s, d, a):
    _need(s[1] == (1,), f"the scalar must have shape [1], got {list(s[1])}")
    return s[0]


def _softcap(s, d, a):
    _need(a["cap"] > 0, f"cap must be > 0, got {a['cap']}")
    return s[0]


def _transpose(s, d, a):
    _rank(s[0], 2, "transposed input")
    return (s[0][1], s[0][0])


def _concat_cols(s, d, a):
    x, y = s
    _rank(x, 2, "left block")
    _rank(y, 2, "right block")
    _need(x[0] == y[0], f"row counts differ: {list(x)} vs {list(y)}")
    return (x[0], x[1] + y[1])


def _span(x: Shape, axis: int, start: int, n: int) -> None:
    """[start, start + n) lies inside axis `axis` (0: rows, 1: columns) of a 2-D x."""
    _rank(x, 2, "sliced input")
    _need(start >= 0 and n > 0 and start + n <= x[axis],
          f"{('rows', 'columns')[axis]} [{start}, {start + n}) out of range for {list(x)}")


def _slice_cols(s, d, a):
    _span(s[0], 1, a["start"], a["width"])
    return (s[0][0], a["width"])


def _positions(x: Shape, pos: Shape, dtype: str) -> None:
    _need(pos == (x[0],), f"positions must be [{x[0]}], one per row, got {list(pos)}")
    _need(dtype == U32, f"positions must be u32, got {dtype}")


def _arange(s, d, a):
    _need(a["length"] > 0, f"length must be > 0, got {a['length']}")
    return (a["length"],)


def _slice_rows(s, d, a):
    _span(s[0], 0, a["start"], a["count"])
    return (a["count"], s[0][1])


def _sequences(cache: Shape, rows: int, a: dict) -> None:
    """A cache of `sequences` blocks of equal rows; with several, one written row each."""
    b = a.get("sequences", 1)
    _need(b >= 1 and cache[0] % b == 0,
          f"a cache of {cache[0]} rows does not hold {b} sequences of equal rows")
    _need(b == 1 or rows == b, f"a step over {b} sequences takes one row each, got {rows}")


def _cache_write(s, d, a):
    cache, x, pos = s
    _rank(cache, 2, "cache")
    _rank(x, 2, "written rows")
    _need(x[1] == cache[1], f"rows of width {x[1]} do not fit a cache of width {cache[1]}")
    _positions(x, pos, d[2])
    _sequences(cache, x[0], a)
    return cache


def _cache_attention(s, d, a):
    q, k, v, pos = s
    _need(a.get("window", 0) >= 0, f"window must be >= 0 (0: none), got {a.get('window')}")
    # head widths, as a one-key attention
    _attention([q, (q[0], k[1]), (q[0], v[1])], d, {**a, "window": 1})
    _need(k == v, f"k cache is {list(k)}, v cache is {list(v)}: they must match")
    _positions(q, pos, d[3])
    _sequences(k, q[0], a)
    return q


def _moe_route(s, d, a):
    z, scale = s
    _rank(z, 2, "router logits")
    _need(scale == (z[1],), f"the per-expert scale must be [{z[1]}], got {list(scale)}")
    _need(0 < a["top_k"] <= z[1], f"top_k must be in [1, {z[1]}], got {a['top_k']}")
    return (z[0], 2 * a["top_k"])


def _route(rows: int, route: Shape) -> int:
    """The route's k; rows (an operand's) must be its tokens or its (token, slot) pairs."""
    _rank(route, 2, "route")
    _need(route[1] >= 2 and route[1] % 2 == 0,
          f"a route is [tokens, 2 k] (weights, then experts), got {list(route)}")
    k = route[1] // 2
    _need(rows in (route[0], route[0] * k), f"{rows} rows are neither the route's "
                                            f"{route[0]} tokens nor its {route[0] * k} pairs")
    return k


def _expert_matmul(s, d, a):
    x, route, w = s
    _rank(x, 2, "expert input")
    _rank(w, 3, "expert weights [experts, out, in]")
    k = _route(x[0], route)
    _need(x[1] == w[2], f"rows of width {x[1]} do not fit expert weights {list(w)} "
                        f"([experts, out, in])")
    return (route[0] * k, w[1])


def _expert_glu(s, d, a):
    rows, n = _expert_matmul(s, d, a)
    _need(n % 2 == 0, f"expert weights of {n} rows do not split into gate and up halves")
    _glu([(rows, n // 2)] * 2, d, a)
    return (rows, n // 2)


def _expert_combine(s, d, a):
    y, route = s
    _rank(y, 2, "expert outputs")
    k = _route(y[0], route)
    _need(y[0] == route[0] * k, f"{y[0]} rows are not the route's {route[0] * k} pairs")
    return (route[0], y[1])


def _expert_matmul_combine(s, d, a):
    return (s[1][0], _expert_matmul(s, d, a)[1])


def _experts_of(z: Shape, w: Shape) -> None:
    _rank(w, 3, "expert weights [experts, out, in]")
    _need(w[0] == z[1], f"{w[0]} experts' weights for router logits over {z[1]} experts")


def _expert_glu_routed(s, d, a):
    x, nw, z, scale, w = s
    _rms_norm([x, nw], d, a)
    route = _moe_route([z, scale], d, a)  # the route it makes itself
    _experts_of(z, w)
    return _expert_glu([x, route, w], d, a)


def _expert_matmul_combine_routed(s, d, a):
    x, z, scale, w = s
    route = _moe_route([z, scale], d, a)  # the route it makes itself
    _experts_of(z, w)
    return _expert_matmul_combine([x, route, w], d, a)


# ---- gradients: vector-Jacobian products in the graph's own ops ----------------------------
# (g, node, dy, wanted) -> [(input id, gradient node)], for the inputs in `wanted` (those a
# trained weight depends on). g is the graph the backward is built into.


def _vjp_matmul(g, n, dy, wanted):
    a, b = n.inputs
    bn = g[b]
    out = []
    if a in wanted:  # dA = dY B^T; B = W^T (a checkpoint's linear weight) is W as stored
        if bn.op == "transpose":
            out.append((a, g.matmul(dy, bn.inputs[0])))
        elif g.load_time(b):
            out.append((a, g.matmul(dy, g.transpose(b))))
        else:
            raise _Mismatch("the gradient of a product whose right operand is computed at run "
                            "time is not declared")
    if b in wanted:  # dB = A^T dY; dW = (A^T dY)^T = dY^T A for B = W^T
        if bn.op == "transpose":
            out.append((bn.inputs[0], g.matmul_tn(dy, a)))
        else:
            out.append((b, g.matmul_tn(a, dy)))
    return out


def _vjp_embedding(g, n, dy, wanted):
    # g.padding: table name -> the token whose rows add nothing (nn.Embedding's padding_idx)
    ids, table = n.inputs
    pad = getattr(g, "padding", {}).get(g[table].name, -1)
    return [(table, g.embedding_grad(ids, dy, g[table].shape[0], pad))] if table in wanted else []


def _vjp_norm(head: bool):
    def vjp(g, n, dy, wanted):
        x, w = n.inputs
        eps, hd = n.attrs["eps"], n.attrs["head_dim"] if head else g[x].shape[1]
        out = [(x, g.norm_grad(dy, x, w, eps, hd))] if x in wanted else []
        return out + ([(w, g.norm_wgrad(dy, x, eps, hd))] if w in wanted else [])
    return vjp


def _vjp_unit_norm(g, n, dy, wanted):
    (x,) = n.inputs
    return [(x, g.unit_norm_grad(dy, x, n.attrs["eps"], n.attrs["head_dim"]))]


def _vjp_rope(g, n, dy, wanted):
    x, pos = n.inputs
    return [(x, g.rope_grad(dy, pos, **n.attrs))]


def _vjp_attention(g, n, dy, wanted):
    q, k, v = n.inputs
    a = n.attrs
    both = g.attention_grad(q, k, v, dy, a["num_heads"], a["num_kv_heads"], a["head_dim"],
                            a["scale"], a.get("window", 0))
    qw, kw = g[q].shape[1], g[k].shape[1]
    parts = ((q, 0, qw), (k, qw, kw), (v, qw + kw, kw))
    return [(i, g.slice_cols(both, at, w)) for i, at, w in parts if i in wanted]


def _vjp_add(g, n, dy, wanted):
    return [(i, dy) for i in n.inputs if i in wanted]


def _vjp_glu(g, n, dy, wanted):
    gate, up = n.inputs
    act = n.attrs["act"]
    out = [(gate, g.glu_grad_gate(dy, gate, up, act))] if gate in wanted else []
    return out + ([(up, g.glu_grad_up(dy, gate, act))] if up in wanted else [])


def _vjp_scale(g, n, dy, wanted):
    return [(n.inputs[0], g.scale(dy, n.attrs["factor"]))]


def _vjp_scale_by(g, n, dy, wanted):
    x, s = n.inputs
    _need(s not in wanted, "the scalar of scale_by is not trained (transformers holds it as a "
                           "buffer): its gradient is not declared")
    return [(x, g.scale_by(dy, s))]


def _vjp_softcap(g, n, dy, wanted):
    return [(n.inputs[0], g.softcap_grad(dy, n.inputs[0], n.attrs["cap"]))]


def _vjp_slice_cols(g, n, dy, wanted):
    x = n.inputs[0]
    return [(x, g.place_cols(dy, n.attrs["start"], g[x].shape[1]))]


def _vjp_linear_cross_entropy(g, n, dy, wanted):
    h, w, labels = n.inputs
    cap = n.attrs["cap"]
    lse = g.slice_cols(g.linear_cross_entropy_stats(h, w, labels, cap), 1, 1)
    out = [(h, g.linear_cross_entropy_grad_h(h, w, labels, dy, lse, cap))] if h in wanted else []
    return out + ([(w, g.linear_cross_entropy_grad_w(h, w, labels, dy, lse, cap))]
                  if w in wanted else [])


def _vjp_cross_entropy(g, n, dy, wanted):
    logits, labels = n.inputs
    return [(logits, g.cross_entropy_grad(logits, labels, dy, cap=n.attrs["cap"]))]


# ---- shape rules of the backward ops --------------------------------------------------------


def _norm_grad(s, d, a):
    _need(s[0] == s[1], f"the gradient {list(s[0])} and the input {list(s[1])} differ")
    return _head_rms_norm(s[1:], d[1:], a)


def _norm_wgrad(s, d, a):
    _norm_grad(s, d, a)
    return (a["head_dim"],)


def _rope_grad(s, d, a):
    return _rope(s, d, a)


def _attention_grad(s, d, a):
    q, k, v, dy = s
    _need(a.get("window", 0) >= 0, f"window must be >= 0 (0: none), got {a.get('window')}")
    _attention([q, k, v], d, {**a, "window": a.get("window") or 1})
    _need(dy == q, f"the output's gradient is {list(dy)}, q is {list(q)}: they must match")
    return (q[0], q[1] + 2 * k[1])


def _embedding_grad(s, d, a):
    ids, dy = s
    _rank(ids, 1, "token ids")
    _rank(dy, 2, "gradient of the gathered rows")
    _need(d[0] == U32, f"token ids must be u32, got {d[0]}")
    _need(dy[0] == ids[0], f"{ids[0]} token ids but {dy[0]} gradient rows")
    _need(a["vocab"] > 0, f"vocab must be > 0, got {a['vocab']}")
    return (a["vocab"], dy[1])


def _matmul_tn(s, d, a):
    x, y = s
    _rank(x, 2, "left operand")
    _rank(y, 2, "right operand")
    _need(x[0] == y[0], f"row counts differ: left is {list(x)}, right is {list(y)}")
    return (x[1], y[1])


def _place_cols(s, d, a):
    x = s[0]
    _rank(x, 2, "placed block")
    _need(a["start"] >= 0 and a["start"] + x[1] <= a["width"],
          f"columns [{a['start']}, {a['start'] + x[1]}) do not fit a width of {a['width']}")
    return (x[0], a["width"])


def _place_add_cols(s, d, a):
    acc, x = s
    _rank(acc, 2, "sum")
    _need(acc[0] == x[0], f"the block's rows {x[0]} and the sum's {acc[0]} differ")
    return _place_cols([x], d[1:], {**a, "width": acc[1]})


def _cross_entropy(s, d, a):
    logits, labels = s[:2]
    _rank(logits, 2, "logits")
    _need(labels == (logits[0],), f"labels must be [{logits[0]}], one per row, got {list(labels)}")
    _need(d[1] == U32, f"labels must be integers (u32), got {d[1]}")
    if len(s) > 2:
        _need(s[2] == (logits[0], 1), f"the losses' gradient must have shape [{logits[0]}, 1], "
                                      f"got {list(s[2])}")
    return (logits[0], 1)


def _linear_cross_entropy(s, d, a):
    h, w, labels = s[:3]
    _rank(h, 2, "hidden rows")
    _rank(w, 2, "lm_head weight [vocab, width]")
    _need(h[1] == w[1], f"hidden rows {list(h)} and the weight {list(w)} differ in width")
    _need(a["cap"] >= 0, f"cap must be >= 0 (0: none), got {a['cap']}")
    return _cross_entropy([(h[0], w[0]), labels] + list(s[3:]), d[1:], a)


def _linear_ce_stats(s, d, a):
    return (_linear_cross_entropy(s, d, a)[0], 2)


def _linear_ce_grad(which: int):
    def rule(s, d, a):
        loss = _linear_cross_entropy(s[:4], d[:4], a)
        _need(s[3] == loss, f"d {list(s[3])} must be {list(loss)}, one per row")
        _need(s[4] == loss, f"lse {list(s[4])} must be {list(loss)}, one per row")
        return s[which]
    return rule


def _linear_ce_dh(s, d, a):
    loss = _linear_cross_entropy(s, d, a)
    _need(s[3] == loss, f"d {list(s[3])} must be {list(loss)}, one per row")
    return (s[0][0], s[0][1] + 2)


def _cross_entropy_grad(s, d, a):
    _cross_entropy(s, d, a)
    return s[0]


def _glu_grad_gate(s, d, a):
    _need(s[0] == s[1] == s[2], f"shapes differ: {', '.join(str(list(x)) for x in s)}")
    return _glu(s[1:], d[1:], a)


def _softcap_grad(s, d, a):
    _softcap(s, d, a)
    return _same(s, d, a)


# ---- the vocabulary -------------------------------------------------------------------------

_HEAD_ROPE = {"rotary": lambda a: a["head_dim"] // 2}  # default: every frequency rotates
_SCALING = ("scale_factor", "low_freq_factor", "high_freq_factor", "original_limit")
_NO_SCALING = dict(zip(_SCALING, fm.NO_SCALING))  # constants: the e-graph's defaults too


def rope_scaling(attrs: dict) -> tuple:
    """A rope's llama3 frequency scaling, as formulas.inv_freq takes it."""
    return tuple(attrs.get(k, v) for k, v in _NO_SCALING.items())


_SCALE = {"scale": lambda a: a["head_dim"] ** -0.5}  # default attention scale

# leaves
_op("input", (), (), None, None, "a run-time input tensor (token ids, or floats)", kind="leaf")
_op("parameter", (), (), None, None, "a named weight tensor", kind="leaf")
_op("state", (), (), None, None, "persistent run-time state (a KV cache), an external buffer",
    kind="leaf")
_op("arange", (), (("length", int),), _arange, lambda a: torch.arange(a["length"]),
    "the positions 0 .. length-1 (a constant made at load time)", kind="constant", out_dtype=U32)

# the seed's ops, generalized
_op("embedding", ("ids", "table"), (), _embedding, lambda a, ids, t: t[ids.long()],
    "rows of table gathered by token id", archetype="gather", stream=True, indices=("ids",))
_op("matmul", ("a", "b"), (), _matmul, lambda a, x, b: x @ b, "a @ b", archetype="product")
_op("rms_norm", ("x", "w"), (("eps", float),), _rms_norm,
    lambda a, x, w: fm.rms_norm(x, w, a["eps"]), "x * rsqrt(mean(x^2) + eps) * w over the row, fp32",
    archetype="rows", vector_flops=4, rows=(0,), locality="row")
_op("rope", ("x", "pos"), (("theta", float), ("head_dim", int), ("rotary", int), ("limit", int),
                          ("scale_factor", float), ("low_freq_factor", float),
                          ("high_freq_factor", float), ("original_limit", int)),
    _rope, lambda a, x, pos: fm.rope(x, a["theta"], a["head_dim"], a["rotary"], pos,
                                     rope_scaling(a)),
    "half-split rotary embedding per head at positions pos (< limit); frequencies past "
    "`rotary` do not rotate, the others scaled as llama3 does (scale_factor 1: not at all)",
    archetype="rows", vector_flops=6, defaults={**_HEAD_ROPE, **_NO_SCALING}, locality="row",
    indices=("pos",))
_op("causal_attention", ("q", "k", "v"),
    (("num_heads", int), ("num_kv_heads", int), ("head_dim", int), ("scale", float)), _attention,
    lambda a, q, k, v: fm.attention(q, k, v, a["num_heads"], a["num_kv_heads"], a["head_dim"],
                                    a["scale"]),
    "softmax(scale * q k^T) v, causal, GQA", archetype="attention", defaults=_SCALE)
_op("sliding_window_attention", ("q", "k", "v"),
    (("num_heads", int), ("num_kv_heads", int), ("head_dim", int), ("window", int),
     ("scale", float)), _attention,
    lambda a, q, k, v: fm.attention(q, k, v, a["num_heads"], a["num_kv_heads"], a["head_dim"],
                                    a["scale"], a["window"]),
    "causal attention to the last `window` keys", archetype="attention", defaults=_SCALE)
_op("add", ("a", "b"), (), _same, lambda a, x, y: x + y, "a + b", archetype="pointwise",
    vector_flops=1, stream=True, rows=(0, 1), locality="element", through=(0, 1),
    commutative=True)
_op("glu", ("gate", "up"), (("act", str),), _glu, lambda a, g, u: fm.glu(g, u, a["act"]),
    "act(gate) * up (SwiGLU: silu, GeGLU: gelu_tanh)", archetype="pointwise", vector_flops=8,
    locality="element", through=(0, 1), pairs=True)

# the published Gemma-4's ops
_op("head_rms_norm", ("x", "w"), (("eps", float), ("head_dim", int)), _head_rms_norm,
    lambda a, x, w: fm.head_rms_norm(x, w, a["eps"], a["head_dim"]),
    "RMSNorm of each head, one weight of head_dim shared by the heads", archetype="rows",
    vector_flops=4, rows=(0,), locality="row")
_op("unit_rms_norm", ("x",), (("eps", float), ("head_dim", int)), _head_rms_norm,
    lambda a, x: fm.head_rms_norm(x, None, a["eps"], a["head_dim"]),
    "RMSNorm of each head without a weight", archetype="rows", vector_flops=3, locality="row")
_op("scale", ("x",), (("factor", float),), _scale, lambda a, x: fm.scale(x, a["factor"]),
    "x * factor, a constant", archetype="pointwise", vector_flops=1, stream=True,
    locality="element")
_op("scale_by", ("x", "s"), (), _scale_by, lambda a, x, s: fm.scale_by(x, s),
    "x * s[0], a scalar read from the weights", archetype="pointwise", vector_flops=1,
    stream=True, rows=(0,), locality="element")
_op("softcap", ("x",), (("cap", float),), _softcap, lambda a, x: fm.softcap(x, a["cap"]),
    "cap * tanh(x / cap)", archetype="pointwise", vector_flops=6, locality="element")
_op("transpose", ("w",), (), _transpose, lambda a, w: w.T,
    "w^T of a weight: read in place (linear weights are stored [out, in])", kind="layout")

# layout ops the rewrites introduce
_op("concat_cols", ("a", "b"), (), _concat_cols, lambda a, x, y: torch.cat([x, y], 1),
    "[a | b] along columns, of weights (load time)", kind="layout")
_op("slice_cols", ("x",), (("start", int), ("width", int)), _slice_cols,
    lambda a, x: x[:, a["start"]:a["start"] + a["width"]], "x[:, start:start+width], a view",
    kind="view")
_op("slice_rows", ("x",), (("start", int), ("count", int)), _slice_rows,
    lambda a, x: x[a["start"]:a["start"] + a["count"]], "x[start:start+count], a view",
    kind="view")

# the KV cache (generation)
_op("cache_write", ("cache", "x", "pos"), (("sequences", int),), _cache_write,
    lambda a, cache, x, pos: fm.cache_write(cache, x, pos, a["sequences"]),
    "the cache with row i of x at slot pos[i] % rows (the rows a ring of that size keeps); "
    "a cache of several sequences' blocks takes row i into block i",
    archetype="kv_cache", inplace=True, locality="row", through=(1,), indices=("pos",),
    defaults={"sequences": 1})
_op("cache_attention", ("q", "k", "v", "pos"),
    (("num_heads", int), ("num_kv_heads", int), ("head_dim", int), ("scale", float),
     ("window", int), ("sequences", int)),
    _cache_attention,
    lambda a, q, k, v, pos: fm.cache_attention(q, k, v, pos, a["num_heads"], a["num_kv_heads"],
                                               a["head_dim"], a["scale"], a["window"],
                                               a["sequences"]),
    "each query row at position pos[i] attending to its last min(window, rows) cached "
    "positions (window 0: rows) down to 0, position p at slot p % rows of its sequence's "
    "block of rows (one block: every row's; several: row i's is block i), GQA",
    archetype="decode_attention", defaults={**_SCALE, "window": 0, "sequences": 1},
    indices=("pos",))

# mixture of experts (a route: [tokens, 2 k] fp32, the k weights then the k expert indices)
_op("moe_route", ("logits", "expert_scale"), (("top_k", int),), _moe_route,
    lambda a, z, scale: fm.moe_route(z, scale, a["top_k"]),
    "each row's route: softmax over the experts in fp32, the top_k (ties: the lower index) "
    "renormalized to sum 1, times their expert_scale; [rows, 2 top_k] fp32, weights then "
    "indices", archetype="moe_route", vector_flops=12, stream=True)
_op("expert_matmul", ("x", "route", "w"), (), _expert_matmul,
    lambda a, x, route, w: fm.expert_matmul(x, route, w),
    "row (t, j): x's row of token t (or of the pair) @ w[expert j of t]^T, w [E, out, in] "
    "read in place: [tokens * k, out]", archetype="experts")
_op("expert_glu", ("x", "route", "w"), (("act", str),), _expert_glu,
    lambda a, x, route, w: fm.expert_glu(x, route, w, a["act"]),
    "act(gate) * up of expert_matmul's two column halves, neither stored", archetype="experts",
    vector_flops=8)
_op("expert_combine", ("y", "route"), (), _expert_combine,
    lambda a, y, route: fm.expert_combine(y, route),
    "each token's k rows of y summed with their route weights: [tokens, width]",
    archetype="experts", vector_flops=2)
_op("expert_matmul_combine", ("x", "route", "w"), (), _expert_matmul_combine,
    lambda a, x, route, w: fm.expert_matmul_combine(x, route, w),
    "expert_combine(expert_matmul(x, route, w), route): each token's k products summed in "
    "fp32, none stored (x: the tokens' rows or the pairs')", archetype="experts", vector_flops=2)
# a token's route recomputed by each program that reads it (the router's logits are one row
# of a few hundred values), its input's RMSNorm folded into the product (rewrites/experts.py)
_op("expert_glu_routed", ("x", "norm", "logits", "expert_scale", "w"),
    (("eps", float), ("top_k", int), ("act", str)), _expert_glu_routed,
    lambda a, x, nw, z, scale, w: fm.expert_glu(fm.rms_norm(x, nw, a["eps"]),
                                                fm.moe_route(z, scale, a["top_k"]), w, a["act"]),
    "expert_glu(rms_norm(x, norm), moe_route(logits, expert_scale, top_k), w): each program "
    "routes its token and normalizes its row itself", archetype="experts", vector_flops=8)
_op("expert_matmul_combine_routed", ("x", "logits", "expert_scale", "w"), (("top_k", int),),
    _expert_matmul_combine_routed,
    lambda a, x, z, scale, w: fm.expert_matmul_combine(x, fm.moe_route(z, scale, a["top_k"]), w),
    "expert_matmul_combine(x, moe_route(logits, expert_scale, top_k), w): each program routes "
    "its token itself", archetype="experts", vector_flops=2)

# gradients of the ops above (compiler/autodiff.py builds backward graphs from them)
_ROPE_ATTRS = OPS["rope"].attrs
_op("norm_grad", ("dy", "x", "w"), (("eps", float), ("head_dim", int)), _norm_grad,
    lambda a, dy, x, w: fm.norm_grad(dy, x, w, a["eps"], a["head_dim"]),
    "d x of an RMSNorm of each head (head_dim: the row for rms_norm) with weight w",
    archetype="norm_grad", vector_flops=8)
_op("unit_norm_grad", ("dy", "x"), (("eps", float), ("head_dim", int)), _norm_grad,
    lambda a, dy, x: fm.norm_grad(dy, x, None, a["eps"], a["head_dim"]),
    "d x of an RMSNorm of each head without a weight", archetype="norm_grad", vector_flops=7)
_op("norm_wgrad", ("dy", "x"), (("eps", float), ("head_dim", int)), _norm_wgrad,
    lambda a, dy, x: fm.norm_wgrad(dy, x, a["eps"], a["head_dim"]),
    "d w of an RMSNorm of each head: dy * normalized x summed over rows and heads, fp32",
    archetype="norm_grad", vector_flops=5, stream=True)
_op("rope_grad", ("dy", "pos"), _ROPE_ATTRS, _rope_grad,
    lambda a, dy, pos: fm.rope_grad(dy, a["theta"], a["head_dim"], a["rotary"], pos,
                                    rope_scaling(a)),
    "d x of rope: dy rotated back by the same angles", archetype="rows", vector_flops=6,
    defaults={**_HEAD_ROPE, **_NO_SCALING}, locality="row", indices=("pos",))
_op("attention_grad", ("q", "k", "v", "dy"),
    (("num_heads", int), ("num_kv_heads", int), ("head_dim", int), ("scale", float),
     ("window", int)), _attention_grad,
    lambda a, q, k, v, dy: fm.attention_grad(q, k, v, dy, a["num_heads"], a["num_kv_heads"],
                                             a["head_dim"], a["scale"], a["window"]),
    "[dq | dk | dv] of causal attention (window 0) or of the last `window` keys, GQA",
    archetype="attention_grad", defaults={**_SCALE, "window": 0})
_op("embedding_grad", ("tokens", "dy"), (("vocab", int), ("padding", int)), _embedding_grad,
    lambda a, ids, dy: fm.embedding_grad(ids, dy, a["vocab"], a["padding"]),
    "d table of a gather: each row's gradient added into its token's row, but the `padding` "
    "token's (-1: none), fp32", defaults={"padding": -1}, archetype="embedding_grad",
    stream=True,
    indices=("tokens",))
_op("matmul_tn", ("a", "b"), (), _matmul_tn, lambda a, x, y: fm.matmul_tn(x, y),
    "a^T @ b, a reduction over the rows (weights' gradients), fp32", archetype="product_tn",
    stream=True)
_op("place_cols", ("x",), (("start", int), ("width", int)), _place_cols,
    lambda a, x: fm.place_cols(x, a["start"], a["width"]),
    "x at columns [start, start + its width) of zeros [rows, width] (d x of slice_cols)",
    archetype="place")
_op("place_add_cols", ("acc", "x"), (("start", int),), _place_add_cols,
    lambda a, acc, x: fm.place_add_cols(acc, x, a["start"]),
    "acc with x added at columns [start, start + its width) (slice_cols's gradients of one "
    "tensor summed as they come: one sum alive, not one placed block each; fp32, as "
    "gradients' sums are)", archetype="place", stream=True)
_op("glu_grad_gate", ("dy", "gate", "up"), (("act", str),), _glu_grad_gate,
    lambda a, dy, g, u: fm.glu_grad_gate(dy, g, u, a["act"]), "dy * up * act'(gate)",
    archetype="pointwise", vector_flops=12, locality="element")
_op("glu_grad_up", ("dy", "gate"), (("act", str),), _glu,
    lambda a, dy, g: fm.glu_grad_up(dy, g, a["act"]), "dy * act(gate)", archetype="pointwise",
    vector_flops=9, locality="element")
_op("softcap_grad", ("dy", "x"), (("cap", float),), _softcap_grad,
    lambda a, dy, x: fm.softcap_grad(dy, x, a["cap"]), "dy * (1 - tanh(x / cap)^2)",
    archetype="pointwise", vector_flops=7, locality="element")
_op("cross_entropy", ("logits", "labels"), (("cap", float),), _cross_entropy,
    lambda a, z, labels: fm.cross_entropy(z, labels, a["cap"]),
    "[rows, 1]: logsumexp(row) - row[label] for each row, 0 for rows labelled -100, fp32; "
    "cap > 0: of the rows soft-capped as read, cap * tanh(z / cap)",
    archetype="row_loss", stream=True, indices=("labels",), defaults={"cap": 0.0})
_op("cross_entropy_grad", ("logits", "labels", "d"), (("cap", float),), _cross_entropy_grad,
    lambda a, z, labels, d: fm.cross_entropy_grad(z, labels, d, a["cap"]),
    "d logits of cross_entropy, d [rows, 1]: d (softmax(row) - onehot(label)), 0 on rows "
    "labelled -100; cap > 0: of the soft-capped rows, times the soft-cap's derivative "
    "(d of the logits before the cap)", archetype="row_loss", indices=("labels",),
    defaults={"cap": 0.0})

_op("linear_cross_entropy", ("h", "w", "labels"), (("cap", float),), _linear_cross_entropy,
    lambda a, h, w, labels: fm.linear_cross_entropy(h, w, labels, a["cap"]),
    "cross_entropy(softcap(h @ w^T)) with the logits never stored (cap 0: no soft-cap), [rows, "
    "1] fp32", archetype="linear_loss", stream=True, indices=("labels",), defaults={"cap": 0.0})
_op("linear_cross_entropy_stats", ("h", "w", "labels"), (("cap", float),), _linear_ce_stats,
    lambda a, h, w, labels: fm.linear_cross_entropy_stats(h, w, labels, a["cap"]),
    "[rows, 2] fp32: linear_cross_entropy's loss and the logits' logsumexp of each row (what "
    "its gradients read)", archetype="linear_loss", stream=True, indices=("labels",),
    defaults={"cap": 0.0})
_op("linear_cross_entropy_grad_h", ("h", "w", "labels", "d", "lse"), (("cap", float),),
    _linear_ce_grad(0),
    lambda a, h, w, labels, d, lse: fm.linear_cross_entropy_grad_h(h, w, labels, d, lse, a["cap"]),
    "d h of linear_cross_entropy times d [rows, 1], given each row's logsumexp lse [rows, 1], "
    "fp32", archetype="linear_loss", stream=True, indices=("labels",), defaults={"cap": 0.0})
_op("linear_cross_entropy_grad_w", ("h", "w", "labels", "d", "lse"), (("cap", float),),
    _linear_ce_grad(1),
    lambda a, h, w, labels, d, lse: fm.linear_cross_entropy_grad_w(h, w, labels, d, lse, a["cap"]),
    "d w of linear_cross_entropy times d [rows, 1], given each row's logsumexp lse [rows, 1], "
    "fp32", archetype="linear_loss", stream=True, indices=("labels",), defaults={"cap": 0.0})

_op("linear_cross_entropy_dh", ("h", "w", "labels", "d"), (("cap", float),), _linear_ce_dh,
    lambda a, h, w, labels, d: fm.linear_cross_entropy_dh(h, w, labels, d, a["cap"]),
    "[rows, width + 2] fp32: columns [0, width) d h of linear_cross_entropy times d [rows, 1], "
    "column width each row's loss, width + 1 its logits' logsumexp: the loss and d h in one "
    "pass over the logits (d known before the loss, as a training step's row weights are)",
    archetype="linear_loss", stream=True, indices=("labels",), defaults={"cap": 0.0})

# each differentiable op's gradient (ops without one: cache ops, layouts, positions)
for _name, _vjp in {"matmul": _vjp_matmul, "embedding": _vjp_embedding,
                    "rms_norm": _vjp_norm(False), "head_rms_norm": _vjp_norm(True),
                    "unit_rms_norm": _vjp_unit_norm, "rope": _vjp_rope,
                    "causal_attention": _vjp_attention, "sliding_window_attention": _vjp_attention,
                    "add": _vjp_add, "glu": _vjp_glu, "scale": _vjp_scale,
                    "scale_by": _vjp_scale_by, "softcap": _vjp_softcap,
                    "slice_cols": _vjp_slice_cols, "cross_entropy": _vjp_cross_entropy,
                    "linear_cross_entropy": _vjp_linear_cross_entropy}.items():
    OPS[_name] = replace(OPS[_name], grad=_vjp)

# the archetype ops, fused kernels as structure, are declared by compiler/kernels.py from the
# declarations above (which ops each archetype takes as stages); it adds them to OPS
from . import kernels  # noqa: E402,F401

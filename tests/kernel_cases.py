"""One-kernel graphs for every archetype, shared by the CPU (interpreter) and GPU tests.

Each case builds a plan graph holding one op (fused ops included) on odd shapes,
with fresh random inputs, and returns (graph, weights, inputs).
"""

import torch

from meganeura.compiler.graph import Graph


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _input_x(g, gen, rows, cols, strided, pad):
    """Input "x" of [rows, cols]; strided: a column slice of a wider input (row stride != cols)."""
    if not strided:
        return g.input_f32("x", (rows, cols)), [_rand(gen, rows, cols)]
    wide = g.input_f32("x", (rows, cols + pad))
    return g.slice_cols(wide, pad // 2, cols), [_rand(gen, rows, cols + pad)]


def _weight_b(g, gen, k, width, transposed):
    """Weight "b" of a product to `width` columns: stored [K, width], or [width, K] (a
    checkpoint's linear layout) and transposed; with its values."""
    if transposed:
        b = g.transpose(g.parameter("b", (width, k)))
        return b, {"b": _rand(gen, width, k, scale=k ** -0.5)}
    return g.parameter("b", (k, width)), {"b": _rand(gen, k, width, scale=k ** -0.5)}


# the matmul archetype's ops, with their attributes (the gated ones with both activations)
MATMUL_OPS = ["matmul", "norm_matmul", "matmul_add", "matmul_gate-gelu_tanh", "matmul_gate-silu",
              "matmul_glu-silu", "matmul_glu-gelu_tanh", "norm_matmul_glu-silu",
              "norm_matmul_glu-gelu_tanh", "matmul_softcap"]


def matmul_case(op, m, k, n, seed=0, strided=False, transposed=False):
    """One matmul-archetype node; `op` may carry an activation ("matmul_glu-gelu_tanh").
    transposed: B is a weight stored [N, K] (a checkpoint's linear layout), read in place."""
    gen = torch.Generator().manual_seed(seed)
    op, _, act = op.partition("-")
    g = Graph()
    x, inputs = _input_x(g, gen, m, k, strided, pad=9)
    b, w = _weight_b(g, gen, k, 2 * n if "glu" in op else n, transposed)
    attrs = {"act": act} if act else {}
    if op.startswith("norm_"):
        w["nw"] = 1.0 + 0.3 * _rand(gen, k)
        out = getattr(g, op)(x, b, g.parameter("nw", (k,)), 1e-6, **attrs)
    elif op == "matmul_add":
        r = g.input_f32("r", (m, n))
        inputs.append(_rand(gen, m, n))
        out = g.matmul_add(x, b, r)
    elif op == "matmul_gate":
        u = g.input_f32("u", (m, n))
        inputs.append(_rand(gen, m, n))
        out = g.matmul_gate(x, b, u, act)
    elif op == "matmul_softcap":  # a small cap: the tanh really bends
        out = g.matmul_softcap(x, b, 1.5)
    else:
        out = getattr(g, op)(x, b, **attrs)
    g.set_outputs([out])
    return g, w, inputs


# one-row products whose epilogue is the row's post-norm (+ residual, + layer scalar)
ROW_NORM_MATMUL_OPS = ["matmul_norm_add", "matmul_norm_add_scale"]


def row_norm_matmul_case(op, m, k, n, seed=0, transposed=False):
    """r + rms_norm(x @ b, w) (times s[0] for the _scale form) over [m, n]."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    x, inputs = _input_x(g, gen, m, k, False, 0)
    b, w = _weight_b(g, gen, k, n, transposed)
    w["w"] = 1.0 + 0.3 * _rand(gen, n)
    r = g.input_f32("r", (m, n))
    inputs.append(_rand(gen, m, n))
    if op == "matmul_norm_add":
        out = g.matmul_norm_add(x, b, g.parameter("w", (n,)), r, 1e-6)
    else:
        w["s"] = torch.tensor([0.63])
        out = g.matmul_norm_add_scale(x, b, g.parameter("w", (n,)), r, g.parameter("s", (1,)), 1e-6)
    g.set_outputs([out])
    return g, w, inputs


ROW_OPS = ["rms_norm", "rope", "rope-partial", "rope-llama3", "norm_rope", "head_rms_norm", "unit_rms_norm",
           "head_norm_rope", "head_norm_rope-partial", "norm_add", "norm_add_scale"]


def row_case(op, s, heads, head_dim, seed=0, strided=False, limit=None):
    """One row-archetype node over [s, heads * head_dim]; "-partial" rotates a quarter of the
    frequencies (the published model's full-attention layers, theta 1e6), "-llama3" scales
    them as Llama-3 does. limit: positions
    are drawn below it (default 3 s + 5)."""
    gen = torch.Generator().manual_seed(seed)
    op, _, partial = op.partition("-")
    g = Graph()
    d = heads * head_dim
    x, inputs = _input_x(g, gen, s, d, strided, pad=6)
    # positions given at run time, scattered below the table's end (a decode step's are)
    limit = limit or 3 * s + 5
    if "rope" in op:
        pos = g.input_u32("positions", (s,))
        inputs.append(torch.randperm(limit, generator=gen)[:s])
    rope = (1e6, head_dim, head_dim // 8, limit) if partial == "partial" else (
        10000.0, head_dim, head_dim // 2, limit)
    # llama3 frequency scaling, its three bands inside the head (wavelengths 2 pi / f from
    # 6 to ~1.4e4 positions at head_dim 16, theta 1e4)
    scaling = dict(scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_limit=512) if partial == "llama3" else {}
    if op in ("rms_norm", "norm_rope", "norm_add", "norm_add_scale"):
        w = {"w": 1.0 + 0.1 * _rand(gen, d)}
        nw = g.parameter("w", (d,))
    elif op in ("head_rms_norm", "head_norm_rope"):
        w = {"w": 1.0 + 0.1 * _rand(gen, head_dim)}
        nw = g.parameter("w", (head_dim,))
    else:
        w = {}
    if op == "rms_norm":
        out = g.rms_norm(x, nw, 1e-6)
    elif op == "rope":
        out = g.rope(x, pos, *rope, **scaling)
    elif op == "norm_rope":
        out = g.norm_rope(x, nw, pos, 1e-6, *rope)
    elif op == "head_rms_norm":
        out = g.head_rms_norm(x, nw, 1e-6, head_dim)
    elif op == "unit_rms_norm":
        out = g.unit_rms_norm(x, 1e-6, head_dim)
    elif op == "head_norm_rope":
        out = g.head_norm_rope(x, nw, pos, 1e-6, head_dim, rope[0], *rope[2:])
    else:
        r = g.input_f32("r", (s, d))
        inputs.append(_rand(gen, s, d))
        if op == "norm_add":
            out = g.norm_add(x, nw, r, 1e-6)
        else:
            w["s"] = torch.tensor([0.63])
            out = g.norm_add_scale(x, nw, r, g.parameter("s", (1,)), 1e-6)
    g.set_outputs([out])
    return g, w, inputs


def attention_case(s, heads, kv_heads, head_dim, window=None, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    qkv = g.input_f32("qkv", (s, (heads + 2 * kv_heads) * head_dim))  # a merged product
    q = g.slice_cols(qkv, 0, heads * head_dim)
    k = g.slice_cols(qkv, heads * head_dim, kv_heads * head_dim)
    v = g.slice_cols(qkv, (heads + kv_heads) * head_dim, kv_heads * head_dim)
    attrs = {} if scale is None else {"scale": scale}
    if window is None:
        out = g.causal_attention(q, k, v, heads, kv_heads, head_dim, **attrs)
    else:
        out = g.sliding_window_attention(q, k, v, heads, kv_heads, head_dim, window, **attrs)
    g.set_outputs([out])
    # with a given scale (1.0: the published model's, on normalized q and k) the inputs keep
    # the scores O(1) as normalized q and k do; N(0, 1) rows would give scores of std
    # sqrt(head_dim), a softmax decided by rounding
    spread = 1.0 if scale is None else head_dim ** -0.25
    return g, {}, [_rand(gen, s, (heads + 2 * kv_heads) * head_dim, scale=spread)]


def embedding_case(s, vocab, d, seed=0, factor=None):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    ids = g.input_u32("token_ids", (s,))
    table = g.parameter("table", (vocab, d))
    out = g.embedding(ids, table) if factor is None else g.embedding_scale(ids, table, factor)
    g.set_outputs([out])
    return g, {"table": _rand(gen, vocab, d)}, [torch.randint(0, vocab, (s,), generator=gen)]


POINTWISE_OPS = ["add", "glu-silu", "glu-gelu_tanh", "scale", "scale_by", "softcap"]


def pointwise_case(op, m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    op, _, act = op.partition("-")
    g = Graph()
    a, b = g.input_f32("a", (m, n + 3)), g.input_f32("b", (m, n))
    x = g.slice_cols(a, 3, n)
    weights = {}
    if op == "add":
        out = g.add(x, b)
    elif op == "glu":
        out = g.glu(x, b, act)
    elif op == "scale":
        out = g.scale(x, 0.37)
    elif op == "scale_by":
        out = g.scale_by(x, g.parameter("s", (1,)))
        weights = {"s": torch.tensor([1.7])}
    else:
        out = g.softcap(x, 2.5)
    g.set_outputs([out])
    return g, weights, [3 * _rand(gen, m, n + 3), _rand(gen, m, n)]


def cache_attention_case(slots, pos, heads, kv_heads, head_dim, seed=0):
    """One decode step's attention over caches of `slots` rows, random contents, at `pos`
    (a ring that has wrapped when pos >= slots). Inputs: q and the position; the caches are
    state, given as (weights-like) "state" by name."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    q = g.input_f32("q", (1, heads * head_dim))
    p = g.input_u32("positions", (1,))
    width = kv_heads * head_dim
    k, v = g.state("cache.k", (slots, width)), g.state("cache.v", (slots, width))
    g.set_outputs([g.cache_attention(q, k, v, p, heads, kv_heads, head_dim, head_dim ** -0.5)])
    state = {"cache.k": _rand(gen, slots, width), "cache.v": _rand(gen, slots, width)}
    return g, state, [_rand(gen, 1, heads * head_dim), torch.tensor([pos])]


CACHE_ROW_OPS = ["norm_rope_write", "head_norm_rope_write", "unit_norm_write"]


def cache_rows_case(op, s, slots, last, heads, head_dim, seed=0, positions=None):
    """One row kernel writing s new k or v rows (positions last-s+1 .. last, the given
    increasing ones ending at last, or "arange": 0 .. s-1 made at load, as a forward's)
    normalized straight into a cache of `slots` rows holding random older rows (a ring that wraps when last >= slots; rows it no longer
    keeps are skipped). Output: the updated cache."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(positions, str):  # "arange": the rows' positions are their indices
        last = s - 1
    positions = torch.arange(last - s + 1, last + 1) if positions is None else positions
    g = Graph()
    d = heads * head_dim
    x = g.input_f32("x", (s, d))
    iota = isinstance(positions, str) and positions == "arange"  # a forward's 0 .. S-1
    pos = g.arange(s) if iota else g.input_u32("positions", (s,))
    cache = g.state("cache.k", (slots, d))
    rope = (10000.0, head_dim, head_dim // 2, last + 1)
    w = {}
    if op == "norm_rope_write":
        w["w"] = 1.0 + 0.1 * _rand(gen, d)
        out = g.norm_rope_write(cache, x, g.parameter("w", (d,)), pos, 1e-6, *rope)
    elif op == "head_norm_rope_write":
        w["w"] = 1.0 + 0.1 * _rand(gen, head_dim)
        out = g.head_norm_rope_write(cache, x, g.parameter("w", (head_dim,)), pos, 1e-6,
                                     head_dim, rope[0], *rope[2:])
    else:
        out = g.unit_norm_write(cache, x, pos, 1e-6, head_dim)
    g.set_outputs([out])
    inputs = {"x": 3 * _rand(gen, s, d)} if iota else {"x": 3 * _rand(gen, s, d),
                                                        "positions": positions}
    return g, w, {"cache.k": _rand(gen, slots, d)}, inputs


def check_cache_rows(case, device, dtype, cache_dir, kind):
    """The cache after the fused row kernel against the reference's, every slot (the rows
    not written keep their values)."""
    from meganeura.runtime.reference import run_reference
    from numerics import assert_close

    g, w, state, inputs = case
    dev_state = {k: v.to(device, dtype) for k, v in state.items()}
    # the cache as it was (a copy: on the CPU in fp32 these conversions return the tensor
    # the kernel then updates in place)
    ref_state = {k: v.float().cpu().clone() for k, v in dev_state.items()}
    model = compile_plan(g, {k: v.to(device) for k, v in w.items()}, device, dtype, cache_dir,
                         state=dev_state)
    out = model(inputs["x"].to(device, dtype),
                *([inputs["positions"].to(device)] if "positions" in inputs else []))
    assert out.data_ptr() == dev_state["cache.k"].data_ptr()  # updated in place
    (ref,) = run_reference(g, w, {**inputs, **ref_state})
    assert_close(out.float().cpu(), ref, kind)
    return model


def compile_plan(g, weights, device, dtype, cache_dir, state=None, sms=None):
    """Runs the graph's own ops as kernels (no optimizer): the archetype under test.
    sms: the SM count tiles are weighed against (the device's when None)."""
    from meganeura.codegen import Target
    from meganeura.codegen.cache import KernelCache
    from meganeura.compiler.cost import CPU_INTERPRETER, CostModel
    from meganeura.compiler.plan import make_plan
    from meganeura.runtime.compiled import CompiledModel

    plan = make_plan(g, CostModel(CPU_INTERPRETER, "fp32"))
    return CompiledModel(plan, weights, Target(torch.device(device), dtype, sms=sms),
                         KernelCache(cache_dir), state=state)


def check_case(case, device, dtype, cache_dir, kind, sms=None):
    from meganeura.runtime.reference import run_reference
    from numerics import assert_close

    g, weights, inputs = case
    model = compile_plan(g, weights, device, dtype, cache_dir, sms=sms)
    dev_inputs = [x.to(device) if not x.is_floating_point() else x.to(device, dtype)
                  for x in inputs]
    for o in model.outputs:  # poison: every element must be written by the kernel
        o.fill_(float("nan"))
    out = model(*dev_inputs)
    names = [n.name for n in g.inputs()]
    (ref,) = run_reference(g, weights, dict(zip(names, inputs)))
    assert_close(out.float().cpu(), ref, kind)
    return model


def check_cache_attention(case, device, dtype, cache_dir, kind):
    """The decode attention kernel against the reference; the caches held in `dtype` on the
    device, the reference reading the same rounded values."""
    from meganeura.runtime.reference import run_reference
    from numerics import assert_close

    g, state, (q, pos) = case
    dev_state = {k: v.to(device, dtype) for k, v in state.items()}
    model = compile_plan(g, {}, device, dtype, cache_dir, state=dev_state)
    model.outputs[0].fill_(float("nan"))
    out = model(q.to(device, dtype), pos.to(device))
    ref_inputs = {"q": q, "positions": pos, **{k: v.float().cpu() for k, v in dev_state.items()}}
    (ref,) = run_reference(g, {}, ref_inputs)
    assert_close(out.float().cpu(), ref, kind)
    return model


def parts_case(op, m, k, widths, seed=0, transposed=False):
    """A matmul whose B is the load-time column concatenation of several weights (stored
    [K, n_i], or [n_i, K] and transposed)."""
    gen = torch.Generator().manual_seed(seed)
    op, _, act = op.partition("-")
    g = Graph()
    x = g.input_f32("x", (m, k))
    names = [f"w{i}" for i in range(len(widths))]

    def weight(name, w):
        return g.transpose(g.parameter(name, (w, k))) if transposed else g.parameter(name, (k, w))

    b = weight(names[0], widths[0])
    for name, w in zip(names[1:], widths[1:]):
        b = g.concat_cols(b, weight(name, w))
    weights = {name: _rand(gen, *((w, k) if transposed else (k, w)), scale=k ** -0.5)
               for name, w in zip(names, widths)}
    attrs = {"act": act} if act else {}
    if op.startswith("norm_"):  # the RMSNorm prologue (a decode step's q | k | v)
        weights["nw"] = 1.0 + 0.3 * _rand(gen, k)
        out = getattr(g, op)(x, b, g.parameter("nw", (k,)), 1e-6, **attrs)
    else:
        out = getattr(g, op)(x, b, **attrs)
    g.set_outputs([out])
    return g, weights, [_rand(gen, m, k)]

"""One-kernel graphs for every archetype, shared by the CPU (interpreter) and GPU tests.

Each case builds a plan graph holding one kernel (a base op, or an archetype with stages)
on odd shapes, with fresh random inputs, and returns (graph, weights, inputs). A fused
kernel's case is named by its stages, `prologue|epilogue` for a product, each a comma list
of op_cases names (`rms_norm|glu.pair-silu`: the RMSNorm prologue and the paired GeGLU of
gate | up; `|add`: a residual epilogue; `plain`: no stage). The lists of cases are derived
from the op table (op_cases.stage_cases); the few chains the models fuse are added by name.
"""

import torch

from meganeura.compiler.graph import Graph
from meganeura.compiler.kernels import ARCHETYPES, stage
from meganeura.compiler.ops import OPS
from op_cases import SAMPLES, Case, stage_cases, stage_of


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _input_x(c: Case, rows, cols, strided, pad):
    """Input "x" of [rows, cols]; strided: a column slice of a wider input (row stride != cols)."""
    if not strided:
        return c.input("x", (rows, cols))
    wide = c.input("x", (rows, cols + pad))
    return c.g.slice_cols(wide, pad // 2, cols)


def _weight_b(c: Case, k, width, transposed):
    """Weight "b" of a product to `width` columns: stored [K, width], or [width, K] (a
    checkpoint's linear layout) and transposed."""
    if transposed:
        return c.g.transpose(c.weight("b", c.rand(width, k, scale=k ** -0.5)))
    return c.weight("b", c.rand(k, width, scale=k ** -0.5))


def _split(name: str) -> tuple[list[str], list[str]]:
    pro, _, epi = name.rpartition("|") if "|" in name else ("", "", name)
    parts = [] if epi == "plain" else [x for x in epi.split(",") if x]
    return [x for x in pro.split(",") if x], parts


# every stage a product's epilogue takes (paired forms too), with and without the RMSNorm
# prologue where it pairs; plain; the one-row post-norm chains the models fuse
PRODUCT_CASES = (["plain"] + [f"|{s}" for s in stage_cases("product", pairs=True)]
                 + [f"{p}|" for p in sorted(ARCHETYPES["product"].prologue)]
                 + [f"{p}|{s}" for p in sorted(ARCHETYPES["product"].prologue)
                    for s in stage_cases("product", pairs=True) if ".pair" in s])
ROW_NORM_PRODUCT_CASES = ["|rms_norm,add", "|rms_norm,add,scale_by"]
# the cases the schedule tests (strided, transposed, descriptors, halves, splits) run
PRODUCT_SAMPLE = ["plain", "rms_norm|", "|add", "|glu-gelu_tanh", "|glu.pair-silu",
                  "rms_norm|glu.pair-gelu_tanh", "|softcap"]


def product_case(name, m, k, n, seed=0, strided=False, transposed=False):
    """One product (`name`: its stages) of x [m, k] and b [k, n] (2n for a paired epilogue).
    transposed: b is a weight stored [n, k] (a checkpoint's linear layout), read in place."""
    c = Case(seed)
    pro, epi = _split(name)
    x = _input_x(c, m, k, strided, pad=9)
    paired = any(".pair" in s for s in epi)
    b = _weight_b(c, k, 2 * n if paired else n, transposed)
    if not pro and not epi:
        return c.case(c.g.matmul(x, b))
    prologue = [stage_of(c, s, (m, k)) for s in pro]
    shape = (m, 2 * n) if paired else (m, n)
    epilogue = []
    for s in epi:
        epilogue.append(stage_of(c, s, shape))
        shape = (m, n)
    return c.case(c.g.kernel("product", (x, b), prologue, epilogue))


# every stage a row kernel takes (cache writes: ROW_WRITE_CASES), and the chains the
# models fuse: q/k norm + RoPE, post-norm + residual (+ layer scalar)
ROW_CASES = stage_cases("rows") + ["rms_norm,rope", "head_rms_norm,rope",
                                   "head_rms_norm,rope-partial", "rms_norm,add",
                                   "rms_norm,add,scale_by"]


def row_case(name, s, heads, head_dim, seed=0, strided=False, limit=None):
    """One row kernel (`name`: its stages) over x [s, heads * head_dim]; positions are drawn
    below `limit` (default 3 s + 5). A single stage runs as its base op."""
    c = Case(seed, head_dim, limit)
    d = heads * head_dim
    x = _input_x(c, s, d, strided, pad=6)
    stages = [stage_of(c, st, (s, d)) for st in name.split(",")]
    if len(stages) == 1 and not stages[0].at and OPS[stages[0].op].archetype == "rows":
        st = stages[0]  # the base op itself: rms_norm(x, w, eps)
        return c.case(getattr(c.g, st.op)(x, *st.operands, **st.attrs))
    return c.case(c.g.kernel("rows", (x,), (), stages))


POINTWISE_CASES = stage_cases("pointwise") + ["add,scale"]


def pointwise_case(name, m, n, seed=0):
    """Element stages on a strided view x [m, n] (a single one as its base op)."""
    c = Case(seed)
    wide = c.input("a", (m, n + 3), 3 * c.rand(m, n + 3))
    x = c.g.slice_cols(wide, 3, n)
    stages = [stage_of(c, st, (m, n)) for st in name.split(",")]
    if len(stages) == 1 and not stages[0].at:
        st = stages[0]
        return c.case(getattr(c.g, st.op)(x, *st.operands, **st.attrs))
    return c.case(c.g.kernel("pointwise", (x,), (), stages))


GATHER_CASES = ["plain"] + stage_cases("gather") + ["scale,add,scale"]


def gather_case(name, s, vocab, d, seed=0):
    """Embedding rows of a [vocab, d] table gathered by s ids, then the stages."""
    c = Case(seed)
    ids = c.ids("token_ids", torch.randint(0, vocab, (s,), generator=c.gen))
    table = c.weight("table", c.rand(vocab, d))
    if name == "plain":
        return c.case(c.g.embedding(ids, table))
    stages = [stage_of(c, st, (s, d)) for st in name.split(",")]
    return c.case(c.g.kernel("gather", (ids, table), (), stages))


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


def product_tn_case(t, m, n, seed=0, strided=False):
    """A reduction product a^T b of a [t, m] and b [t, n] (a weight's gradient); strided: a
    is a column slice of a wider input."""
    c = Case(seed)
    a = _input_x(c, t, m, strided, pad=5)
    b = c.input("b", (t, n))
    return c.case(c.g.matmul_tn(a, b))


def norm_grad_case(op, s, width, head_dim, seed=0, strided=False):
    """An RMSNorm gradient (norm_grad, unit_norm_grad, norm_wgrad) of rows x [s, width] in
    heads of head_dim (width: a row norm), dy its output's gradient."""
    c = Case(seed)
    x = _input_x(c, s, width, strided, pad=3)
    dy = c.input("dy", (s, width))
    if op == "norm_grad":
        w = c.weight("w", 1.0 + 0.1 * c.rand(head_dim))
        return c.case(c.g.norm_grad(dy, x, w, 1e-6, head_dim))
    return c.case(getattr(c.g, op)(dy, x, 1e-6, head_dim))


def loss_case(op, s, v, seed=0, cap=0.0):
    """cross_entropy (or its gradient, with d [s, 1]) of logits [s, v] whose labels hold a
    -100 or two; cap: the logits soft-capped inside the loss's kernel."""
    c = Case(seed)
    z = c.input("z", (s, v), c.rand(s, v) * 3.0)
    labels = torch.randint(0, v, (s,), generator=c.gen)
    labels[::3] = -100
    lab = c.ids("labels", labels)
    if op == "cross_entropy":
        return c.case(c.g.cross_entropy(z, lab, cap=cap))
    return c.case(c.g.cross_entropy_grad(z, lab, c.input("d", (s, 1)), cap=cap))


def attention_grad_case(s, heads, kv_heads, head_dim, window=0, seed=0, dy_fp32=False):
    """attention_grad of q, k, v (views of one merged input, as a product gives them) and
    dy, scores O(1); dy_fp32: dy held in fp32 whatever the plan's type."""
    c = Case(seed)
    qkv = c.input("qkv", (s, (heads + 2 * kv_heads) * head_dim),
                  c.rand(s, (heads + 2 * kv_heads) * head_dim) * head_dim ** -0.25)
    q = c.g.slice_cols(qkv, 0, heads * head_dim)
    k = c.g.slice_cols(qkv, heads * head_dim, kv_heads * head_dim)
    v = c.g.slice_cols(qkv, (heads + kv_heads) * head_dim, kv_heads * head_dim)
    dy = c.input("dy", (s, heads * head_dim), fp32=dy_fp32)
    return c.case(c.g.attention_grad(q, k, v, dy, heads, kv_heads, head_dim, 1.0, window))


def embedding_grad_case(t, v, d, padding=-1, seed=0):
    """A gather's gradient: dy [t, d] added into the rows of a [v, d] table its token ids
    (repeated ones among them) name."""
    c = Case(seed)
    ids = torch.randint(0, v, (t,), generator=c.gen)
    ids[1] = ids[0]
    return c.case(c.g.embedding_grad(c.ids("tokens", ids), c.input("dy", (t, d)), v, padding))


def linear_loss_case(op, t, h, v, cap=0.0, seed=0):
    """The fused lm_head + soft-cap + loss (its statistics, or a gradient, with d [t, 1]) of
    rows [t, h] and a weight [v, h]; a label or two of -100."""
    c = Case(seed)
    x = c.input("h", (t, h))
    w = c.weight("w", c.rand(v, h) * h ** -0.5 * 3.0)
    labels = torch.randint(0, v, (t,), generator=c.gen)
    labels[::4] = -100
    lab = c.ids("labels", labels)
    if op in ("linear_cross_entropy", "linear_cross_entropy_stats"):
        return c.case(getattr(c.g, op)(x, w, lab, cap))
    if op == "linear_cross_entropy_dh":  # the loss and d h together, d given
        return c.case(c.g.linear_cross_entropy_dh(x, w, lab, c.input("d", (t, 1)), cap))
    # a gradient reads the logsumexp column of the statistics (a strided view)
    lse = c.g.slice_cols(c.g.linear_cross_entropy_stats(x, w, lab, cap), 1, 1)
    return c.case(getattr(c.g, op)(x, w, lab, c.input("d", (t, 1)), lse, cap))


def place_case(s, w, start, width, seed=0, add=False):
    """x [s, w] placed at columns start.. of zeros [s, width]; add: added there into a sum
    [s, width] (place_add_cols)."""
    c = Case(seed)
    x = c.input("x", (s, w))
    if add:
        return c.case(c.g.place_add_cols(c.input("acc", (s, width)), x, start))
    return c.case(c.g.place_cols(x, start, width))


def cache_attention_case(slots, pos, heads, kv_heads, head_dim, seed=0, window=0,
                         sequences=1):
    """Attention over caches of `slots` rows a sequence, random contents: one decode step's
    row at `pos` (an int: a ring that has wrapped when pos >= slots), or the rows at the
    positions of a list (one sequence: a prefill chunk's consecutive positions; with several
    sequences, row i is sequence i's at pos[i]), each attending to its last `window`
    positions (0: all the cache holds). Inputs: q and the positions; the caches are state,
    given as (weights-like) "state" by name."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.tensor(pos if isinstance(pos, list) else [pos])
    rows = positions.numel()
    g = Graph()
    q = g.input_f32("q", (rows, heads * head_dim))
    p = g.input_u32("positions", (rows,))
    width, n = kv_heads * head_dim, sequences * slots
    k, v = g.state("cache.k", (n, width)), g.state("cache.v", (n, width))
    g.set_outputs([g.cache_attention(q, k, v, p, heads, kv_heads, head_dim, head_dim ** -0.5,
                                     window=window, sequences=sequences)])
    state = {"cache.k": _rand(gen, n, width), "cache.v": _rand(gen, n, width)}
    return g, state, [_rand(gen, rows, heads * head_dim), positions]


# rows written into a cache: the decode step's k (norm + RoPE) and v (unweighted norm)
# rows; and the plain write, a copy kernel of its own
ROW_WRITE_CASES = ["rms_norm,rope", "head_rms_norm,rope", "unit_rms_norm", "copy"]


def cache_rows_case(name, s, slots, last, heads, head_dim, seed=0, positions=None,
                    sequences=1):
    """s new k or v rows (the stages of `name`, then written; "copy": cache_write alone) at
    positions last-s+1 .. last, the given increasing ones ending at last, or "arange":
    0 .. s-1 made at load, as a forward's, into a cache of `slots` rows holding random older
    rows (a ring that wraps when last >= slots; rows it no longer keeps are skipped). With
    several sequences (s of them, at the given positions), row i goes into sequence i's
    block of `slots` rows. Output: the updated cache."""
    c = Case(seed, head_dim)
    if isinstance(positions, str):  # "arange": the rows' positions are their indices
        last = s - 1
    d = heads * head_dim
    x = c.input("x", (s, d), 3 * c.rand(s, d))
    iota = isinstance(positions, str) and positions == "arange"
    positions = torch.arange(last - s + 1, last + 1) if positions is None or iota else positions
    pos = c.g.arange(s) if iota else c.ids("positions", positions)
    cache = c.cache("cache.k", (sequences * slots, d))
    c.limit, c.positions = int(positions.max()) + 1, pos  # RoPE at the rows' own positions
    stages = [] if name == "copy" else [stage_of(c, st, (s, d)) for st in name.split(",")]
    if name == "copy":
        out = c.g.cache_write(cache, x, pos, sequences=sequences)
    else:
        out = c.g.kernel("rows", (x,), (), stages + [stage("cache_write", cache, pos, at=1,
                                                           sequences=sequences)])
    g, w, _ = c.case(out)
    return g, w, c.state, {n.name: c.inputs[n.name] for n in g.inputs()}


def check_cache_rows(case, device, dtype, cache_dir, kind):
    """The cache after the row kernel against the reference's, every slot (the rows not
    written keep their values)."""
    from meganeura.runtime.reference import run_reference
    from numerics import assert_close

    g, w, state, inputs = case
    dev_state = {k: v.to(device, dtype) for k, v in state.items()}
    # the cache as it was (a copy: on the CPU in fp32 these conversions return the tensor
    # the kernel then updates in place)
    ref_state = {k: v.float().cpu().clone() for k, v in dev_state.items()}
    model = compile_plan(g, {k: v.to(device) for k, v in w.items()}, device, dtype, cache_dir,
                         state=dev_state)
    out = model(*[x.to(device, dtype) if x.is_floating_point() else x.to(device)
                  for x in inputs.values()], copy=False)  # the output itself: the cache
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
    target = Target(torch.device(device), dtype, sms=sms, interpreter_splits=True)
    return CompiledModel(plan, weights, target, KernelCache(cache_dir), state=state)


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


def parts_case(name, m, k, widths, seed=0, transposed=False):
    """A product (`name`: its stages) whose B is the load-time column concatenation of
    several weights (stored [K, n_i], or [n_i, K] and transposed)."""
    c = Case(seed)
    pro, epi = _split(name)
    x = c.input("x", (m, k))

    def weight(i, w):
        if transposed:
            return c.g.transpose(c.weight(f"w{i}", c.rand(w, k, scale=k ** -0.5)))
        return c.weight(f"w{i}", c.rand(k, w, scale=k ** -0.5))

    b = weight(0, widths[0])
    for i, w in enumerate(widths[1:], 1):
        b = c.g.concat_cols(b, weight(i, w))
    if not pro and not epi:
        return c.case(c.g.matmul(x, b))
    prologue = [stage_of(c, s, (m, k)) for s in pro]
    epilogue = [stage_of(c, s, (m, sum(widths))) for s in epi]
    return c.case(c.g.kernel("product", (x, b), prologue, epilogue))


__all__ = ["GATHER_CASES", "POINTWISE_CASES", "PRODUCT_CASES", "PRODUCT_SAMPLE",
           "ROW_CASES", "ROW_NORM_PRODUCT_CASES", "ROW_WRITE_CASES", "SAMPLES",
           "attention_case", "cache_attention_case", "cache_rows_case", "check_cache_attention",
           "check_cache_rows", "check_case", "compile_plan", "gather_case", "parts_case",
           "pointwise_case", "product_case", "row_case"]


def moe_case(op, tokens, width, experts, k, out, per_token=True, act="gelu_tanh", seed=0,
             ties=False):
    """An expert op on a route the graph makes from random router logits (moe_route of
    [tokens, experts] logits and a per-expert scale): expert_matmul / expert_glu of x
    (the tokens' rows, or per_token=False the pairs'), expert_combine of pair rows,
    expert_matmul_combine of pair rows, moe_route alone, or the routed ops (which route from
    the logits themselves: expert_glu_routed with its RMSNorm of x, and
    expert_matmul_combine_routed). ties: every logit row holds
    exact ties (values drawn from a few levels)."""
    c = Case(seed)
    logits = c.rand(tokens, experts).bfloat16().float()  # as a bf16 plan reads them
    if ties:
        logits = torch.randint(0, 3, (tokens, experts), generator=c.gen).float()
    z = c.input("logits", (tokens, experts), logits)
    scale = c.weight("expert_scale", 1 + 0.1 * c.rand(experts))
    route = c.g.moe_route(z, scale, k)
    if op == "moe_route":
        return c.case(route)
    if op.endswith("_routed"):  # the route made by each program from the logits
        x = c.input("x", (tokens if per_token else tokens * k, width))
        rows = 2 * out if op == "expert_glu_routed" else out
        w = c.weight("w", c.rand(experts, rows, width, scale=width ** -0.5))
        if op == "expert_glu_routed":
            nw = c.weight("norm", 1 + 0.1 * c.rand(width))
            return c.case(c.g.expert_glu_routed(x, nw, z, scale, w, 1e-6, k, act))
        return c.case(c.g.expert_matmul_combine_routed(x, z, scale, w, k))
    pairs = tokens * k
    if op == "expert_combine":
        return c.case(c.g.expert_combine(c.input("y", (pairs, out)), route))
    x = c.input("x", (tokens if per_token else pairs, width))
    rows = 2 * out if op == "expert_glu" else out
    w = c.weight("w", c.rand(experts, rows, width, scale=width ** -0.5))
    if op == "expert_glu":
        return c.case(c.g.expert_glu(x, route, w, act))
    return c.case(getattr(c.g, op)(x, route, w))

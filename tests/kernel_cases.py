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


def matmul_case(op, m, k, n, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    x, inputs = _input_x(g, gen, m, k, strided, pad=9)
    width = 2 * n if "swiglu" in op else n
    b = g.parameter("b", (k, width))
    w = {"b": _rand(gen, k, width, scale=k ** -0.5)}
    if op == "matmul_add":
        r = g.input_f32("r", (m, n))
        inputs.append(_rand(gen, m, n))
        out = g.matmul_add(x, b, r)
    elif op.startswith("norm_"):
        out = getattr(g, op)(x, b, 1e-6)
    else:
        out = getattr(g, op)(x, b)
    g.set_outputs([out])
    return g, w, inputs


def row_case(op, s, heads, head_dim, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    d = heads * head_dim
    x, inputs = _input_x(g, gen, s, d, strided, pad=6)
    w = {"w": 1.0 + 0.1 * _rand(gen, d)}
    if op == "rms_norm":
        out = g.rms_norm(x, g.parameter("w", (d,)), 1e-6)
    elif op == "rope":
        w = {}
        out = g.rope(x, 10000.0, head_dim)
    else:
        out = g.norm_rope(x, g.parameter("w", (d,)), 1e-6, 10000.0, head_dim)
    g.set_outputs([out])
    return g, w, inputs


def attention_case(s, heads, kv_heads, head_dim, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    qkv = g.input_f32("qkv", (s, (heads + 2 * kv_heads) * head_dim))  # a merged product
    q = g.slice_cols(qkv, 0, heads * head_dim)
    k = g.slice_cols(qkv, heads * head_dim, kv_heads * head_dim)
    v = g.slice_cols(qkv, (heads + kv_heads) * head_dim, kv_heads * head_dim)
    if window is None:
        out = g.causal_attention(q, k, v, heads, kv_heads, head_dim)
    else:
        out = g.sliding_window_attention(q, k, v, heads, kv_heads, head_dim, window)
    g.set_outputs([out])
    return g, {}, [_rand(gen, s, (heads + 2 * kv_heads) * head_dim)]


def embedding_case(s, vocab, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    ids = g.input_u32("token_ids", (s,))
    out = g.embedding(ids, g.parameter("table", (vocab, d)))
    g.set_outputs([out])
    return g, {"table": _rand(gen, vocab, d)}, [torch.randint(0, vocab, (s,), generator=gen)]


def pointwise_case(op, m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    a, b = g.input_f32("a", (m, n + 3)), g.input_f32("b", (m, n))
    out = getattr(g, op)(g.slice_cols(a, 3, n), b)
    g.set_outputs([out])
    return g, {}, [_rand(gen, m, n + 3), _rand(gen, m, n)]


def compile_plan(g, weights, device, dtype, cache_dir):
    """Runs the graph's own ops as kernels (no optimizer): the archetype under test."""
    from meganeura.codegen import Target
    from meganeura.codegen.cache import KernelCache
    from meganeura.compiler.cost import CPU_INTERPRETER, CostModel
    from meganeura.compiler.plan import make_plan
    from meganeura.runtime.compiled import CompiledModel

    plan = make_plan(g, CostModel(CPU_INTERPRETER, "fp32"))
    return CompiledModel(plan, weights, Target(torch.device(device), dtype), KernelCache(cache_dir))


def check_case(case, device, dtype, cache_dir, kind):
    from meganeura.runtime.reference import run_reference
    from numerics import assert_close

    g, weights, inputs = case
    model = compile_plan(g, weights, device, dtype, cache_dir)
    dev_inputs = [x.to(device) if not x.is_floating_point() else x.to(device, dtype)
                  for x in inputs]
    for o in model.outputs:  # poison: every element must be written by the kernel
        o.fill_(float("nan"))
    out = model(*dev_inputs)
    names = [n.name for n in g.inputs()]
    (ref,) = run_reference(g, weights, dict(zip(names, inputs)))
    assert_close(out.float().cpu(), ref, kind)
    return model


def parts_case(op, m, k, widths, seed=0):
    """A matmul whose B is the load-time column concatenation of several weights."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    x = g.input_f32("x", (m, k))
    names = [f"w{i}" for i in range(len(widths))]
    b = g.parameter(names[0], (k, widths[0]))
    for name, w in zip(names[1:], widths[1:]):
        b = g.concat_cols(b, g.parameter(name, (k, w)))
    g.set_outputs([getattr(g, op)(x, b)])
    weights = {name: _rand(gen, k, w, scale=k ** -0.5) for name, w in zip(names, widths)}
    return g, weights, [_rand(gen, m, k)]

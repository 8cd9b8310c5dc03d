import pytest

from meganeura.compiler.graph import Graph, Node
from meganeura.errors import GraphError


@pytest.fixture
def g():
    return Graph()


def leaves(g):
    ids = g.input_u32("ids", (7,))
    x = g.parameter("x", (7, 12))
    w = g.parameter("w", (12, 5))
    return ids, x, w


def test_builders_infer_shapes(g):
    ids, x, w = leaves(g)
    table = g.parameter("table", (30, 12))
    e = g.embedding(ids, table)
    assert g[e].shape == (7, 12)
    assert g[g.matmul(x, w)].shape == (7, 5)
    assert g[g.rms_norm(x, g.parameter("nw", (12,)), 1e-6)].shape == (7, 12)
    assert g[g.rope(x, g.arange(7), 10000.0, 6, limit=7)].shape == (7, 12)
    q = g.parameter("q", (7, 24))
    kv = g.parameter("kv", (7, 12))
    assert g[g.causal_attention(q, kv, kv, 4, 2, 6)].shape == (7, 24)
    assert g[g.sliding_window_attention(q, kv, kv, 4, 2, 6, 3)].shape == (7, 24)
    assert g[g.add(x, e)].shape == (7, 12)
    assert g[g.swiglu(x, e)].shape == (7, 12)
    g.set_outputs([e])
    g.validate()


@pytest.mark.parametrize("build, message", [
    (lambda g, ids, x, w: g.matmul(w, x), "inner dims differ: left is [12, 5], right is [7, 12]"),
    (lambda g, ids, x, w: g.embedding(x, w), "token ids must have rank 1"),
    (lambda g, ids, x, w: g.embedding(ids, ids), "embedding table must have rank 2"),
    (lambda g, ids, x, w: g.rms_norm(x, w, 1e-6), "norm weight must be [12]"),
    (lambda g, ids, x, w: g.rms_norm(x, g.parameter("n", (12,)), 0.0), "eps must be > 0"),
    (lambda g, ids, x, w: g.rope(x, g.arange(7), 10000.0, 5, limit=7), "head_dim must be even"),
    (lambda g, ids, x, w: g.rope(x, g.arange(7), 10000.0, 8, limit=7),
     "width 12 is not a multiple of head_dim 8"),
    (lambda g, ids, x, w: g.rope(x, g.arange(6), 10000.0, 6, limit=7), "positions must be [7]"),
    (lambda g, ids, x, w: g.causal_attention(x, x, x, 3, 2, 4), "not a multiple of num_kv_heads"),
    (lambda g, ids, x, w: g.causal_attention(x, x, x, 2, 2, 4), "expected width num_heads*head_dim"),
    (lambda g, ids, x, w: g.sliding_window_attention(x, x, x, 2, 2, 6, 0), "window must be > 0"),
    (lambda g, ids, x, w: g.add(x, w), "shapes differ: [7, 12] vs [12, 5]"),
    (lambda g, ids, x, w: g.swiglu(x, w), "shapes differ"),
    (lambda g, ids, x, w: g.add(ids, ids), "only valid as token ids or positions"),
    (lambda g, ids, x, w: g.matmul(x, 99), "input %99 does not exist"),
    (lambda g, ids, x, w: g.parameter("x", (3,)), "name already used"),
    (lambda g, ids, x, w: g.parameter("z", (3, 0)), "every dimension must be > 0"),
    (lambda g, ids, x, w: g.set_outputs([42]), "node %42 does not exist"),
])
def test_builder_errors_name_node_and_mismatch(g, build, message):
    ids, x, w = leaves(g)
    with pytest.raises(GraphError) as e:
        build(g, ids, x, w)
    assert message in str(e.value)


def test_error_names_the_inputs(g):
    ids, x, w = leaves(g)
    with pytest.raises(GraphError, match=r"matmul\(%2 parameter 'w', %1 parameter 'x'\)"):
        g.matmul(w, x)


def test_attention_checks_k_v_and_rows(g):
    q = g.parameter("q", (7, 24))
    k = g.parameter("k", (7, 12))
    v = g.parameter("v", (7, 6))
    k8 = g.parameter("k8", (8, 12))
    with pytest.raises(GraphError, match="v is .* they must match"):
        g.causal_attention(q, k, v, 4, 2, 6)
    with pytest.raises(GraphError, match="q has 7 rows, k has 8"):
        g.causal_attention(q, k8, k8, 4, 2, 6)


def _raw(nodes, outputs):
    return Graph(nodes, outputs)


def test_validate_rejects_dangling_input():
    p = Node(0, "parameter", (), (3, 3), "f32", {}, "p")
    m = Node(1, "matmul", (0, 5), (3, 3), "f32", {})
    with pytest.raises(GraphError, match="input %5 does not exist"):
        _raw([p, m], [1]).validate()


def test_validate_rejects_cycle():
    p = Node(0, "parameter", (), (3, 3), "f32", {}, "p")
    a = Node(1, "add", (0, 2), (3, 3), "f32", {})
    b = Node(2, "add", (1, 0), (3, 3), "f32", {})
    with pytest.raises(GraphError, match="cycle"):
        _raw([p, a, b], [2]).validate()


def test_validate_rejects_unknown_op_and_wrong_shape():
    p = Node(0, "parameter", (), (3, 3), "f32", {}, "p")
    with pytest.raises(GraphError, match="unknown op 'conv'"):
        _raw([p, Node(1, "conv", (0,), (3, 3), "f32", {})], [1]).validate()
    with pytest.raises(GraphError, match="recorded shape \\[3, 4\\] but inputs give \\[3, 3\\]"):
        _raw([p, Node(1, "add", (0, 0), (3, 4), "f32", {})], [1]).validate()
    with pytest.raises(GraphError, match="no outputs"):
        _raw([p], []).validate()


def test_kernels_validate_their_stages(g):
    from meganeura.compiler.kernels import stage
    x = g.parameter("x", (7, 12))
    b = g.parameter("b", (12, 10))
    r = g.parameter("r", (7, 10))
    nw = g.parameter("nw", (12,))
    assert g[g.kernel("product", (x, b), (), [stage("glu", pair=True, act="silu")])].shape == (7, 5)
    assert g[g.product((x, b), epilogue=[stage("add", r)])].shape == (7, 10)
    assert g[g.kernel("product", (x, b), [stage("rms_norm", nw, eps=1e-6)])].shape == (7, 10)
    with pytest.raises(GraphError, match="act must be one of silu, gelu_tanh, got 'relu'"):
        g.kernel("product", (x, b), (), [stage("glu", pair=True, act="relu")])
    with pytest.raises(GraphError, match="shapes differ: \\[7, 10\\] vs \\[7, 12\\]"):
        g.kernel("product", (x, b), (), [stage("add", x)])  # the residual is [7, 12]
    with pytest.raises(GraphError, match="does not take 'rope'"):  # a product takes no RoPE
        g.kernel("product", (x, b), (), [stage("rope", g.input_u32("p", (7,)), theta=1e4,
                                               head_dim=2, limit=7)])
    with pytest.raises(GraphError, match="attributes \\['eps'\\] missing"):
        g.kernel("rows", (x,), (), [stage("rms_norm", nw)])
    cache = g.state("cache", (9, 12))
    with pytest.raises(GraphError, match="can only be the last stage"):
        g.kernel("rows", (x,), (), [stage("cache_write", cache, g.input_u32("q", (7,)), at=1),
                                    stage("scale", factor=2.0)])
    assert g[g.slice_cols(b, 4, 6)].shape == (12, 6)
    with pytest.raises(GraphError, match=r"columns \[4, 11\) out of range"):
        g.slice_cols(b, 4, 7)
    with pytest.raises(GraphError, match="unknown op"):
        g.op("conv", (x,))

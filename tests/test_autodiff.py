"""Autodiff on the IR: every op's declared gradient against torch autograd, in fp64.

The cases are derived from the op table: each op that declares a gradient (OpSpec.grad)
must have a case here, and its vector-Jacobian product, built by `compiler.autodiff.grad`
in the graph's own ops and run by the reference executor, must equal torch.autograd's
through the op's reference formula, on fresh random operands of odd sizes.
"""

import math

import pytest
import torch

from meganeura.compiler.autodiff import SEED, grad
from meganeura.compiler.graph import Graph
from meganeura.compiler.ops import OPS
from meganeura.errors import GraphError
from meganeura.runtime.reference import run_reference

ROPE = dict(theta=1e4, head_dim=8, limit=40)


class Case:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.g = Graph()
        self.weights, self.inputs, self.trained = {}, {}, []

    def param(self, shape, trained=True, scale=1.0):
        name = f"p{len(self.weights)}"
        self.weights[name] = torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale
        if trained:
            self.trained.append(name)
        return self.g.parameter(name, tuple(shape))

    def ids(self, values):
        name = f"i{len(self.inputs)}"
        self.inputs[name] = values
        return self.g.input_u32(name, tuple(values.shape))

    def randint(self, high, n):
        return torch.randint(0, high, (n,), generator=self.gen)


def _attention(window):
    def build(c):
        q, k, v = c.param((7, 16)), c.param((7, 8)), c.param((7, 8))
        if window:
            return c.g.sliding_window_attention(q, k, v, 4, 2, 4, window, 0.7)
        return c.g.causal_attention(q, k, v, 4, 2, 4, 0.7)
    return build


def _labels(c):
    lab = c.randint(11, 6)
    lab[[1, 4]] = -100
    return c.ids(lab)


# op -> {variant: build(case) -> output node}
CASES = {
    "matmul": {"": lambda c: c.g.matmul(c.param((5, 7)), c.param((7, 3))),
               "stored": lambda c: c.g.matmul(c.param((5, 7)), c.g.transpose(c.param((3, 7))))},
    "embedding": {"": lambda c: c.g.embedding(c.ids(c.randint(9, 13)), c.param((9, 5)))},
    "rms_norm": {"": lambda c: c.g.rms_norm(c.param((5, 13)), c.param((13,)), 1e-5)},
    "head_rms_norm": {"": lambda c: c.g.head_rms_norm(c.param((5, 12)), c.param((4,)), 1e-5, 4)},
    "unit_rms_norm": {"": lambda c: c.g.unit_rms_norm(c.param((5, 12)), 1e-5, 4)},
    "rope": {"": lambda c: c.g.rope(c.param((5, 16)), c.ids(torch.randperm(40)[:5]), **ROPE),
             "partial": lambda c: c.g.rope(c.param((5, 16)), c.ids(torch.randperm(40)[:5]),
                                           rotary=3, **ROPE),
             "llama3": lambda c: c.g.rope(c.param((5, 16)), c.ids(torch.randperm(40)[:5]),
                                          scale_factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_limit=16, **ROPE)},
    "causal_attention": {"": _attention(None)},
    "sliding_window_attention": {"": _attention(3)},
    "add": {"": lambda c: c.g.add(c.param((5, 7)), c.param((5, 7)))},
    "glu": {act: (lambda c, act=act: c.g.glu(c.param((5, 7)), c.param((5, 7)), act))
            for act in ("silu", "gelu_tanh")},
    "scale": {"": lambda c: c.g.scale(c.param((5, 7)), 0.37)},
    "scale_by": {"": lambda c: c.g.scale_by(c.param((5, 7)), c.param((1,), trained=False))},
    "softcap": {"": lambda c: c.g.softcap(c.param((5, 7), scale=20.0), 15.0)},
    "slice_cols": {"": lambda c: c.g.slice_cols(c.param((5, 12)), 4, 5)},
    "cross_entropy": {"": lambda c: c.g.cross_entropy(c.param((6, 11), scale=3.0), _labels(c)),
                      "capped": lambda c: c.g.cross_entropy(c.param((6, 11), scale=3.0),
                                                            _labels(c), cap=2.5)},
    "linear_cross_entropy": {
        "": lambda c: c.g.linear_cross_entropy(c.param((6, 5)), c.param((11, 5)), _labels(c)),
        "capped": lambda c: c.g.linear_cross_entropy(c.param((6, 5), scale=2.0),
                                                     c.param((11, 5)), _labels(c), 2.5)},
}
DIFFERENTIABLE = sorted(n for n, s in OPS.items() if s.grad is not None)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_differentiable_op_has_a_case(name):
    assert (OPS[name].grad is not None) == (name in CASES), \
        f"{name}: a gradient case (tests/test_autodiff.py CASES)"


@pytest.mark.parametrize("name, variant", [(n, v) for n in DIFFERENTIABLE for v in CASES[n]])
def test_each_ops_gradient_equals_autograd_in_fp64(name, variant):
    c = Case(seed=sum(map(ord, name + variant)))
    out = CASES[name][variant](c)
    assert c.g[out].op == name
    node = c.g[out]
    cot = torch.randn(*node.shape, generator=c.gen, dtype=torch.float64)
    joint = grad(c.g, out, c.trained)
    joint.validate()
    loss, *grads = run_reference(joint, c.weights, {**c.inputs, SEED: cot}, torch.float64)

    # torch autograd through the reference formulas of the forward graph
    leaves = {n: w.clone().requires_grad_(n in c.trained) for n, w in c.weights.items()}
    vals = {}
    for n in c.g.nodes[:out + 1]:
        if n.op == "parameter":
            vals[n.id] = leaves[n.name]
        elif n.op == "input":
            vals[n.id] = c.inputs[n.name]
        else:
            vals[n.id] = OPS[n.op].reference(n.attrs, *[vals[i] for i in n.inputs])
    assert torch.allclose(loss, vals[out].detach(), rtol=1e-12, atol=0)
    expect = torch.autograd.grad(vals[out], [leaves[n] for n in c.trained], cot)
    for n, got, want in zip(c.trained, grads, expect):
        assert got.dtype == torch.float64 and got.shape == want.shape, n
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-12, f"{name}{variant} d{n}: relative error {err:.2e}"


def test_a_node_read_twice_gets_both_contributions():
    # x feeds the product and the residual: dx = dy W + dy
    c = Case(seed=3)
    x, w = c.param((4, 6)), c.param((6, 6))
    y = c.g.add(c.g.matmul(x, w), x)
    joint = grad(c.g, y, c.trained)
    cot = torch.randn(4, 6, generator=c.gen, dtype=torch.float64)
    _, dx, dw = run_reference(joint, c.weights, {SEED: cot}, torch.float64)
    xv, wv = c.weights["p0"], c.weights["p1"]
    assert torch.allclose(dx, cot @ wv.T + cot)
    assert torch.allclose(dw, xv.T @ cot)


def test_only_what_reaches_a_trained_weight_is_differentiated():
    c = Case(seed=4)
    x, frozen, w = c.param((4, 6), trained=False), c.param((6, 6), trained=False), c.param((6, 5))
    y = c.g.matmul(c.g.rms_norm(c.g.matmul(x, frozen), c.param((6,), trained=False), 1e-6), w)
    joint = grad(c.g, y, ["p2"])
    added = {n.op for n in joint.nodes[len(c.g.nodes):]}
    assert added == {"input", "matmul_tn"}, added  # the seed and dW alone


def test_what_cannot_be_differentiated_is_named():
    c = Case(seed=5)
    x = c.param((4, 6))
    y = c.g.scale_by(x, c.param((1,)))
    with pytest.raises(GraphError, match="scalar of scale_by is not trained"):
        grad(c.g, y, ["p1"])
    with pytest.raises(GraphError, match="no parameter named 'nope'"):
        grad(c.g, y, ["nope"])
    other = c.param((3,))
    with pytest.raises(GraphError, match="does not depend on"):
        grad(c.g, y, [other])


def _mlp_block(c, rows, post_norm):
    """An MLP block on an input x [rows, 24]: norm, gate | up, GeGLU, down (its post-norm),
    residual. (the GeGLU's node, the block's output)"""
    x = c.g.input_f32("x", (rows, 24))
    with c.g.block("layer.0"):
        h = c.g.rms_norm(x, c.param((24,), scale=0.2), 1e-6)
        gate = c.g.matmul(h, c.g.transpose(c.param((40, 24), scale=0.3)))
        up = c.g.matmul(h, c.g.transpose(c.param((40, 24), scale=0.3)))
        act = c.g.geglu(gate, up)
        m = c.g.matmul(act, c.g.transpose(c.param((24, 40), scale=0.3)))
        y = c.g.add(x, c.g.rms_norm(m, c.param((24,), scale=0.2), 1e-6) if post_norm else m)
    return act, y


def test_a_layers_forward_and_backward_compile_as_one_plan(tmp_path):
    # an MLP block (norm, gate | up, GeGLU, down, post-norm, residual) and its backward in
    # one graph: the e-graph optimizes both, the generated kernels agree with the reference
    from meganeura.pipeline import compile_graph, setup
    from numerics import assert_close

    c = Case(seed=7)
    _, y = _mlp_block(c, 13, post_norm=True)
    joint = grad(c.g, y, c.trained)
    weights = {n: (w + (1.0 if w.dim() == 1 else 0.0)).float() for n, w in c.weights.items()}
    gen = torch.Generator().manual_seed(8)
    inputs = {"x": torch.randn(13, 24, generator=gen), SEED: torch.randn(13, 24, generator=gen)}
    fn = compile_graph(joint, weights, setup("cpu", cache_dir=tmp_path))
    out = fn(inputs["x"], inputs[SEED])
    ref = run_reference(joint, weights, inputs)
    assert len(out) == len(ref) == 6
    for a, b in zip(out, ref):
        assert_close(a.float(), b, "fp32")
    plan = fn.plan.graph
    fused = {st.op for n in plan.nodes if n.op == "product" for st in n.attrs["epilogue"]}
    assert {"glu_grad_gate", "glu_grad_up"} <= fused, fused  # GeGLU's backward in products
    assert any(n.op == "matmul_tn" for n in plan.nodes)


def test_a_recomputed_glu_is_read_by_the_backward_in_place_of_the_forwards(tmp_path):
    # grad(recompute=("glu",)): the down product's weight gradient reads a GLU computed again
    # in the backward's block from the same gate and up (the forward's is read by the forward
    # product alone); the gradients are the same values, compiled and on the reference
    from meganeura.pipeline import compile_graph, setup
    from numerics import assert_close

    c = Case(seed=9)
    act, y = _mlp_block(c, 11, post_norm=False)
    plain = grad(c.g, y, c.trained)
    joint = grad(c.g, y, c.trained, recompute=("glu",))
    glus = [n for n in joint.nodes if n.op == "glu"]
    assert [n.block for n in glus] == ["layer.0", "layer.0.grad"]
    assert glus[1].inputs == glus[0].inputs
    readers = [n for n in joint.nodes if act in n.inputs]
    assert [n.op for n in readers] == ["matmul"]  # the forward product alone
    assert any(n.op == "matmul_tn" and glus[1].id in n.inputs for n in joint.nodes)
    weights = {n: (w + (1.0 if w.dim() == 1 else 0.0)).float() for n, w in c.weights.items()}
    gen = torch.Generator().manual_seed(10)
    inputs = {"x": torch.randn(11, 24, generator=gen), SEED: torch.randn(11, 24, generator=gen)}
    want = run_reference(plain, weights, inputs)
    for a, b in zip(run_reference(joint, weights, inputs), want):
        assert_close(a, b, "fp32")
    fn = compile_graph(joint, weights, setup("cpu", cache_dir=tmp_path))
    for a, b in zip(fn(inputs["x"], inputs[SEED]), want):
        assert_close(a.float(), b, "fp32")


def test_a_recomputed_chain_is_computed_again_in_order():
    # rope(head_rms_norm(x)) read by a product's weight gradient: both computed again in the
    # backward (the copy of rope reads the copy of the norm), the same gradients
    c = Case(seed=11)
    x = c.g.input_f32("x", (7, 16))
    pos = c.ids(torch.randperm(40)[:7])
    with c.g.block("layer.0"):
        q = c.g.matmul(x, c.param((16, 16), scale=0.3))
        r = c.g.rope(c.g.head_rms_norm(q, c.param((8,)), 1e-6, 8), pos, **{**ROPE, "head_dim": 8})
        y = c.g.matmul(r, c.param((16, 5), scale=0.3))
    plain = grad(c.g, y, c.trained)
    joint = grad(c.g, y, c.trained, recompute=("rope", "head_rms_norm"))
    read = {i for n in joint.nodes for i in n.inputs}  # (a copy no gradient reads is dead:
    # rope's own gradient does not read its input, and the plan drops what no root reaches)
    norm, rope = ([n for n in joint.nodes if n.op == op and n.id in read]
                  for op in ("head_rms_norm", "rope"))
    assert len(norm) == len(rope) == 2 and rope[1].inputs[0] == norm[1].id
    assert [n.op for n in joint.nodes if r in n.inputs] == ["matmul"]
    assert any(n.op == "matmul_tn" and rope[1].id in n.inputs for n in joint.nodes)
    gen = torch.Generator().manual_seed(12)
    inputs = {"x": torch.randn(7, 16, generator=gen), **c.inputs,
              SEED: torch.randn(7, 5, generator=gen)}
    weights = {n: (w + (1.0 if w.dim() == 1 else 0.0)).float() for n, w in c.weights.items()}
    got, want = run_reference(joint, weights, inputs), run_reference(plain, weights, inputs)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_gradients_of_a_tensors_slices_add_into_one_sum():
    # three column slices of one trained weight: each slice's gradient is added into the sum
    # where its columns lie as it comes (place_add_cols), equal to torch autograd
    c = Case(seed=13)
    w = c.param((5, 12))
    x = c.param((5, 4))
    y = c.g.add(c.g.add(c.g.slice_cols(w, 0, 4), c.g.glu(c.g.slice_cols(w, 4, 4), x, "silu")),
                c.g.slice_cols(w, 8, 4))
    joint = grad(c.g, y, ["p0"])
    assert [n.op for n in joint.nodes if n.op.startswith("place")].count("place_add_cols") == 2
    dy = torch.randn(5, 4, generator=c.gen, dtype=torch.float64)
    (_, got) = run_reference(joint, c.weights, {SEED: dy}, torch.float64)
    wt = c.weights["p0"].clone().requires_grad_(True)
    xs = c.weights["p1"]
    ref = wt[:, :4] + torch.nn.functional.silu(wt[:, 4:8]) * xs + wt[:, 8:]
    (want,) = torch.autograd.grad(ref, wt, dy)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_the_seed_is_held_in_fp32_in_a_bf16_plan():
    # 1/255 in bf16 is 1/256: every gradient would be 0.4 % small. The seed input is
    # declared fp32; the extracted plan keeps it so and places its buffer at 4 bytes a row
    from meganeura.pipeline import optimize_graph, setup
    from meganeura.runtime.buffers import plan_buffers

    c = Case(seed=3)
    x = c.g.input_f32("x", (255, 24))
    with c.g.block("layer.0"):
        y = c.g.matmul(c.g.rms_norm(x, c.param((24,)), 1e-6),
                       c.g.transpose(c.param((16, 24))))
    joint = grad(c.g, y, c.trained)
    plan, _ = optimize_graph(joint, setup("cuda", torch.bfloat16, run=False))
    seed, other = (next(n for n in plan.graph.inputs() if n.name == name) for name in (SEED, "x"))
    assert seed.attrs.get("fp32") and seed.id in plan.fp32_stream
    assert other.id not in plan.fp32_stream
    buffers = plan_buffers(plan, 2, inputs=True)
    assert buffers.nbytes_of[seed.id] >= 255 * 16 * 4  # fp32
    assert buffers.nbytes_of[other.id] < 255 * 24 * 4  # the plan dtype


def test_a_training_plan_may_hold_the_forward_products_outputs_in_fp32():
    # asked, a bf16 training plan holds in fp32 the forward products that only row and
    # pointwise kernels or fused stages read (norms, GeGLU, residual adds, their gradients),
    # in a layer or outside one. Not: a product whose slices are products' main operands
    # (x A of a LoRA), nor any product of the backward
    import dataclasses

    from meganeura.pipeline import optimize_graph, setup

    c = Case(seed=4)
    x = c.g.input_f32("x", (37, 24))
    with c.g.block("layer.0"):
        xn = c.g.rms_norm(x, c.param((24,)), 1e-6)
        h = c.g.matmul(xn, c.g.transpose(c.param((40, 24))))
        both = c.g.matmul(c.g.rms_norm(x, c.param((24,)), 1e-5),  # [37, 12]: sliced below
                          c.g.transpose(c.param((12, 24))))
        y = c.g.matmul(c.g.rms_norm(h, c.param((40,)), 1e-6), c.g.transpose(c.param((16, 40))))
        y = c.g.add(y, c.g.matmul(c.g.slice_cols(both, 0, 6), c.g.transpose(c.param((16, 6)))))
        y = c.g.add(y, c.g.matmul(c.g.slice_cols(both, 6, 6), c.g.transpose(c.param((16, 6)))))
        # GeGLU's gate and up: read by the GeGLU and by its gradient, which rides in the
        # epilogue of the down product's backward (read element by element there)
        yn = c.g.rms_norm(y, c.param((16,)), 1e-6)
        gate = c.g.matmul(yn, c.g.transpose(c.param((20, 16))))
        up = c.g.matmul(yn, c.g.transpose(c.param((20, 16))))
        y = c.g.add(y, c.g.matmul(c.g.geglu(gate, up), c.g.transpose(c.param((16, 20)))))
    top = c.g.matmul(c.g.geglu(y, y), c.g.transpose(c.param((16, 16))))  # outside a layer
    out = c.g.rms_norm(top, c.param((16,)), 1e-6)
    joint = grad(c.g, out, c.trained)
    s = setup("cuda", torch.bfloat16, run=False)
    for on in (False, True):
        plan, _ = optimize_graph(joint, dataclasses.replace(s, fp32_products=on))
        g = plan.graph
        seeded = {n.id for n in g.inputs() if n.name == SEED}
        for n in g.nodes:
            if any(i in seeded for i in n.inputs):
                seeded.add(n.id)
        wide = g.wide  # the products held in fp32 beyond the residual stream's
        assert wide <= plan.fp32_stream and not wide & seeded
        if on:
            # h [37, 40] and top [37, 16], read by their norms and the norms' gradients; the
            # gate | up product [37, 40] (GeGLU, and its gradient in a product's epilogue);
            # the two [37, 16] products of both's slices, added in a product's epilogue.
            # Not both [37, 12] itself, whose slices are products' main operands
            assert sorted(g[i].shape for i in wide) == [(37, 16)] * 3 + [(37, 40)] * 2, [
                (g[i].shape, g[i].block) for i in wide]
            assert (37, 12) not in {g[i].shape for i in plan.launches if i in wide}
        else:
            assert wide == frozenset()


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("cap", [0.0, 3.0])
def test_the_plain_loss_and_its_gradient_become_the_fused_lm_head_loss(cap, trained, tmp_path):
    # the loss written plainly (logits, soft-cap, cross_entropy) and differentiated by
    # autodiff: the fused_loss rules offer the lm_head, soft-cap and loss as one op forward
    # and backward, extraction takes it (no [rows, vocab] tensor in the plan); without the
    # family the plan keeps the logits; both equal the reference
    from meganeura.pipeline import compile_graph, setup
    from meganeura.rewrites import FUSIONS
    from numerics import assert_close

    c = Case(seed=11)
    x = c.g.input_f32("x", (13, 24))
    # [vocab, width], as an embedding is stored; frozen (tied to a frozen embedding): only
    # d rows wanted of the loss, and the loss and d rows become one op
    table = c.param((37, 24), trained=trained, scale=0.3)
    h = c.g.rms_norm(c.g.matmul(x, c.g.transpose(c.param((24, 24), scale=0.3))),
                     c.param((24,), scale=0.2), 1e-6)
    logits = c.g.matmul(h, c.g.transpose(table))
    if cap:
        logits = c.g.softcap(logits, cap)
    lab = c.randint(37, 13)
    lab[[2, 9]] = -100
    loss = c.g.cross_entropy(logits, c.ids(lab))
    joint = grad(c.g, loss, c.trained)
    weights = {n: (w + (1.0 if w.dim() == 1 else 0.0)).float() for n, w in c.weights.items()}
    gen = torch.Generator().manual_seed(12)
    inputs = {"x": torch.randn(13, 24, generator=gen), "i0": lab,
              SEED: torch.rand(13, 1, generator=gen) + 0.5}
    ref = run_reference(joint, weights, inputs)
    plans = {}
    for fused, families in ((True, None), (False, [f for f in FUSIONS if f != "fused_loss"])):
        fn = compile_graph(joint, weights, setup("cpu", cache_dir=tmp_path), families=families)
        out = fn(inputs["x"], inputs["i0"], inputs[SEED])
        assert len(out) == len(ref) == 3 + trained
        for a, b in zip(out, ref):
            assert_close(a.float(), b, "fp32")
        plans[fused] = {n.op for n in fn.plan.graph.nodes}
        wide = [n for n in fn.plan.graph.nodes if len(n.shape) == 2 and n.shape[1] == 37]
        assert bool(wide) != fused  # the logits exist only in the plain plan
    one_op = ({"linear_cross_entropy_stats", "linear_cross_entropy_grad_h",
               "linear_cross_entropy_grad_w"} if trained else {"linear_cross_entropy_dh"})
    assert one_op <= plans[True]
    assert not {"cross_entropy", "cross_entropy_grad"} & plans[True]
    assert {"cross_entropy", "cross_entropy_grad"} <= plans[False]
    # where the logits are stored, the soft-cap runs inside the loss's kernels
    assert not {"softcap", "softcap_grad"} & plans[False]


def test_the_memory_price_decides_whether_the_logits_are_stored():
    # e2b's lm_head at 2048 tokens, priced for the H200 (shapes only, nothing runs).
    # Trained (its d weight wanted): by time alone the plain plan wins, the fused d weight
    # recomputing the logits block by block (about 0.3 s of the step, as measured on an
    # H100); at the Trainer's exchange rate too. At a hundred times that rate, storing the
    # [2048, 262144] logits and their gradient costs more than the fused kernels' time.
    # Frozen (tied to a frozen embedding, as the benchmarks train e2b and e4b): the loss and
    # d rows in one op, chunk by chunk, at every price, even by time alone (one logits
    # product, no [rows, vocab] tensor written and read whole)
    from meganeura.compiler.cost import MEMORY_PRICE, PROFILES, CostModel
    from meganeura.pipeline import optimize_graph

    def fused(price, trained):
        g = Graph()
        x = g.matmul(g.input_f32("x", (2048, 1536)), g.transpose(g.parameter("p", (1536, 1536))))
        logits = g.softcap(g.matmul(x, g.transpose(g.parameter("table", (262144, 1536)))), 30.0)
        joint = grad(g, g.cross_entropy(logits, g.input_u32("labels", (2048,))),
                     ["p", "table"] if trained else ["p"])
        plan, _ = optimize_graph(joint, CostModel(PROFILES["h200"], "bf16", memory_price=price))
        ops = {plan.graph[i].op for i in plan.launches}
        wide = [i for i in plan.launches if 262144 * 2048 <= math.prod(plan.graph[i].shape)]
        if not wide:
            assert not {"cross_entropy", "cross_entropy_grad"} & ops
            assert "linear_cross_entropy_dh" in ops  # the loss and d rows: one kernel's
            assert ("linear_cross_entropy_grad_w" in ops) == trained
            return True
        assert {"cross_entropy", "cross_entropy_grad"} <= ops and not any(
            op.startswith("linear_cross_entropy") for op in ops)  # not both (logits twice)
        return False

    assert [fused(p * MEMORY_PRICE, True) for p in (0, 1, 100)] == [False, False, True]
    assert [fused(p * MEMORY_PRICE, False) for p in (0, 1, 100)] == [True, True, True]

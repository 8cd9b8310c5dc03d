"""The op table is complete: every op has what each stage of the pipeline needs of it.

Each check enumerates compiler/ops.py's table, so a new op that misses a piece fails here,
naming the op and where the piece goes (docs/extending.md walks through adding one):
its declaration (doc, shape rule, reference formula), a cost, a kernel that runs it, its
element expression if it may run inside other kernels, and a test case.
"""

import math

import pytest
import torch

from kernel_cases import (GATHER_CASES, POINTWISE_CASES, PRODUCT_CASES, ROW_CASES,
                          ROW_WRITE_CASES, attention_case, cache_attention_case, check_case,
                          attention_grad_case, embedding_grad_case, linear_loss_case,
                          loss_case, moe_case,
                          norm_grad_case, place_case,
                          product_tn_case,
                          gather_case, pointwise_case, product_case, row_case)
from meganeura.codegen import ARCHETYPES as KERNELS
from meganeura.codegen.elementwise import EXPRESSIONS
from meganeura.compiler.cost import H200, CostModel
from meganeura.compiler.kernels import ARCHETYPES, STRUCTURED
from meganeura.compiler.ops import OPS
from op_cases import SAMPLES

# ops that run only as their own kernel: a case each (kernel_cases.py); ops with a locality
# have theirs derived from op_cases.SAMPLES, archetype ops from their stage lists
OWN_CASES = {
    "matmul": lambda: product_case("plain", 7, 45, 70),
    "embedding": lambda: gather_case("plain", 7, 61, 45),
    "causal_attention": lambda: attention_case(37, 4, 2, 16),
    "sliding_window_attention": lambda: attention_case(37, 4, 2, 16, window=5),
    "cache_attention": lambda: cache_attention_case(20, 6, 4, 2, 24),
    "matmul_tn": lambda: product_tn_case(37, 45, 70),
    "norm_grad": lambda: norm_grad_case("norm_grad", 7, 24, 8),
    "unit_norm_grad": lambda: norm_grad_case("unit_norm_grad", 7, 24, 8),
    "norm_wgrad": lambda: norm_grad_case("norm_wgrad", 7, 24, 8),
    "place_cols": lambda: place_case(7, 5, 4, 12),
    "place_add_cols": lambda: place_case(7, 5, 4, 12, add=True),
    "embedding_grad": lambda: embedding_grad_case(7, 9, 45),
    "attention_grad": lambda: attention_grad_case(37, 4, 2, 16),
    "linear_cross_entropy": lambda: linear_loss_case("linear_cross_entropy", 7, 24, 45),
    "linear_cross_entropy_stats": lambda: linear_loss_case("linear_cross_entropy_stats", 7,
                                                           24, 45),
    "linear_cross_entropy_grad_h": lambda: linear_loss_case("linear_cross_entropy_grad_h", 7,
                                                            24, 45),
    "linear_cross_entropy_grad_w": lambda: linear_loss_case("linear_cross_entropy_grad_w", 7,
                                                            24, 45),
    "linear_cross_entropy_dh": lambda: linear_loss_case("linear_cross_entropy_dh", 7, 24, 45),
    "cross_entropy": lambda: loss_case("cross_entropy", 7, 45),
    "cross_entropy_grad": lambda: loss_case("cross_entropy_grad", 7, 45),
    "moe_route": lambda: moe_case("moe_route", 7, 0, 13, 3, 0),
    "expert_matmul": lambda: moe_case("expert_matmul", 7, 24, 13, 3, 21),
    "expert_glu": lambda: moe_case("expert_glu", 7, 24, 13, 3, 21),
    "expert_combine": lambda: moe_case("expert_combine", 7, 0, 13, 3, 21),
    "expert_matmul_combine": lambda: moe_case("expert_matmul_combine", 7, 24, 13, 3, 21),
    "expert_glu_routed": lambda: moe_case("expert_glu_routed", 1, 24, 13, 3, 21),
    "expert_matmul_combine_routed": lambda: moe_case("expert_matmul_combine_routed", 1, 24, 13,
                                                     3, 21, per_token=False),
}
ARCHETYPE_CASES = {"product": PRODUCT_CASES, "rows": ROW_CASES + ROW_WRITE_CASES,
                   "pointwise": POINTWISE_CASES, "gather": GATHER_CASES}
KINDS = ("leaf", "constant", "compute", "layout", "view")


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_is_declared(name):
    spec = OPS[name]
    assert spec.doc, f"{name}: a one-line doc (compiler/ops.py)"
    assert spec.kind in KINDS, name
    if spec.kind == "leaf":
        return
    assert spec.shape is not None, f"{name}: a shape rule (compiler/ops.py)"
    assert spec.reference is not None, f"{name}: a reference formula (compiler/ops.py)"
    if spec.kind == "compute":
        assert spec.archetype in KERNELS, f"{name}: a kernel archetype (codegen/)"
    else:
        assert spec.archetype is None, f"{name}: a {spec.kind} op launches nothing"
    if spec.locality is not None:
        assert spec.locality in ("element", "row"), name
        assert all(0 <= k < spec.arity for k in spec.through), name
        hosts = [a for a in ARCHETYPES.values() if name in a.epilogue | a.prologue]
        assert hosts, f"{name}: no archetype takes it as a stage"
    if spec.locality == "element":
        assert name in EXPRESSIONS, f"{name}: its expression (codegen/elementwise.py)"


@pytest.mark.parametrize("name", sorted(n for n, s in OPS.items() if s.kind == "compute"))
def test_every_op_that_launches_has_a_case_and_a_cost(name):
    spec = OPS[name]
    if name in STRUCTURED:
        cases = ARCHETYPE_CASES.get(name)
        assert cases, f"{name}: its stage cases (tests/kernel_cases.py)"
        return
    if spec.locality is not None and not spec.inplace:
        assert name in SAMPLES, f"{name}: a sample of its operands (tests/op_cases.py)"
        return
    if spec.inplace:  # a cache write: rows written into a cache, and the plain copy
        assert "copy" in ROW_WRITE_CASES
        return
    assert name in OWN_CASES, f"{name}: a kernel case (tests/test_op_table.py OWN_CASES)"
    g, _, _ = OWN_CASES[name]()
    (out,) = g.outputs
    n = g[out]
    t = CostModel(H200, "bf16").time(n.op, n.attrs, [g[i].shape for i in n.inputs], n.shape)
    assert math.isfinite(t) and t > 0, f"{name}: a cost (compiler/cost.py)"


def _base_case(name, variant):
    """The op alone, as its own base-op node, on sample operands."""
    if OPS[name].archetype == "rows":
        return row_case(name + (f"-{variant}" if variant else ""), 7, 3, 24, seed=5)
    return pointwise_case(name + (f"-{variant}" if variant else ""), 37, 45, seed=5)


@pytest.mark.parametrize("name, variant", [(n, v) for n in sorted(SAMPLES) for v in SAMPLES[n]])
def test_every_stage_op_runs_alone_and_is_priced(name, variant, tmp_path):
    # each op with a locality, as its own kernel (a row op as a rows kernel, an element op
    # as a pointwise one); its fused forms are the archetypes' cases (test_kernels.py)
    g, w, inputs = _base_case(name, variant)
    (out,) = g.outputs
    assert g[out].op == name
    n = g[out]
    t = CostModel(H200, "bf16").time(n.op, n.attrs, [g[i].shape for i in n.inputs], n.shape)
    assert math.isfinite(t) and t > 0
    check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")

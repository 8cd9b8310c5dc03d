"""Mixture-of-experts fusions: the expert products' gate | up halves and their weighted sum.

    glu(E[:, :n], E[:, n:2n])   = expert_glu(x, r, w)            E = expert_matmul(x, r, w), 2n wide
    expert_combine(expert_matmul(a, r, w), r) = expert_matmul_combine(a, r, w)
    expert_glu(rms_norm(x, nw), moe_route(z, s), w) = expert_glu_routed(x, nw, z, s, w)
    expert_matmul_combine(a, moe_route(z, s), w)    = expert_matmul_combine_routed(a, z, s, w)

The first writes act(gate) * up from the gate and up tiles side by side: the [pairs, 2n]
product is never stored. The second sums each token's k products in the program that
computes them: the [pairs, width] rows are never stored, but each token's k experts are
read by that token's programs alone, which pays at a token or a few and loses to the grouped
product (each expert's weights read once for all its tokens) at a prefill: the cost model
prices both (compiler/cost.py) and the extractor picks. The routed forms let each program
route its own token from the router's logits (softmax and top-k over a row of a few hundred
values) and normalize its own row, so that a decode step runs no route and no norm kernel
before the experts; they read each token's experts per token, as the fused sum does.
"""

from egglog import String, f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor, cols

experts = ruleset(name="experts")


@experts.register
def _(x: Tensor, r: Tensor, w: Tensor, m: Tensor, e: Tensor, n: i64, act: String, z: Tensor,
      s: Tensor, nw: Tensor, k: i64, eps: f64):
    yield rule(m == e.slice_cols(i64(0), n).glu(e.slice_cols(n, n), act),
               e == x.expert_matmul(r, w), cols(e) == n + n,
               name="glu of an expert product's halves: one expert product").then(
        union(m).with_(x.expert_glu(r, w, act)))
    yield rule(m == x.expert_matmul(r, w).expert_combine(r),
               name="the weighted sum of expert products: their product's epilogue").then(
        union(m).with_(x.expert_matmul_combine(r, w)))
    yield rule(m == x.rms_norm(nw, eps).expert_glu(z.moe_route(s, k), w, act),
               name="an expert glu of a normalized row: it routes and normalizes the row").then(
        union(m).with_(x.expert_glu_routed(nw, z, s, w, eps, k, act)))
    yield rule(m == x.expert_matmul_combine(z.moe_route(s, k), w),
               name="a fused expert sum routes its token itself").then(
        union(m).with_(x.expert_matmul_combine_routed(z, s, w, k)))

"""Gated MLP chain (SwiGLU, GeGLU): gate and up matmuls sharing an input become one matmul
over both weights, the activation a parameter of the rule.

act(h @ Wg) * (h @ Wu) = matmul_glu(h, [Wg | Wu], act): each program computes the paired
gate and up tiles and writes only act(gate) * up, so neither product is stored. The
RMSNorm before them joins as the prologue, as in rmsnorm_matmul. A product gated by
another tensor, act(h @ W) * u, becomes matmul_gate: the activation and the gating are
its epilogue.
"""

from egglog import String, f64, rule, ruleset, union

from ..compiler.egraph import Tensor
from .analysis import weight

gated_mlp = ruleset(name="gated_mlp")


@gated_mlp.register
def _(h: Tensor, g: Tensor, u: Tensor, x: Tensor, w: Tensor, b: Tensor, m: Tensor, eps: f64,
      act: String):
    # gate and up are never written: only their gated product is
    yield rule(m == h.matmul(g).glu(h.matmul(u), act), weight(g), weight(u),
               name="gate/up matmuls with act*up epilogue").then(
        union(m).with_(h.matmul_glu(g.concat_cols(u), act)))
    # a product gated by another tensor (the per-layer input gate): act(h @ W) * up, the
    # product never written
    yield rule(m == h.matmul(g).glu(u, act), weight(g), name="act(matmul)*up as epilogue"
               ).then(union(m).with_(h.matmul_gate(g, u, act)))
    # the normalized rows are never written either
    yield rule(m == x.rms_norm(w, eps).matmul_glu(b, act), name="rms_norm as gated-mlp prologue"
               ).then(union(m).with_(x.norm_matmul_glu(b, w, eps, act)))

"""SwiGLU chain: gate and up matmuls sharing an input become one matmul over both weights.

silu(h @ Wg) * (h @ Wu) = matmul_swiglu(h, [Wg | Wu]): each program computes the
paired gate and up tiles and writes only silu(gate) * up, so neither product is
stored. The RMSNorm before them joins as the prologue, as in rmsnorm_matmul.
"""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

swiglu_chain = ruleset(name="swiglu_chain")


@swiglu_chain.register
def _(h: Tensor, g: Tensor, u: Tensor, x: Tensor, w: Tensor, b: Tensor, m: Tensor, eps: f64):
    # gate and up are never written: only their silu-product is
    yield rule(m == h.matmul(g).swiglu(h.matmul(u)), name="gate/up matmuls with silu*up epilogue"
               ).then(union(m).with_(h.matmul_swiglu(g.concat_cols(u))))
    # the normalized rows are never written either
    yield rule(m == x.rms_norm(w, eps).matmul_swiglu(b), name="rms_norm as swiglu prologue").then(
        union(m).with_(x.norm_matmul_swiglu(b.scale_rows(w), eps)))

"""MatMul + residual Add: the add becomes the matmul's epilogue (both argument orders).

r + a @ b adds r to the accumulator tile before the store: the product is never
written and read back.
"""

from egglog import rule, ruleset, union

from ..compiler.egraph import Tensor

residual_epilogue = ruleset(name="residual_epilogue")


@residual_epilogue.register
def _(a: Tensor, b: Tensor, r: Tensor, m: Tensor):
    # saves a write and a read of the product, and one launch
    yield rule(m == r.add(a.matmul(b)), name="residual + matmul as epilogue").then(
        union(m).with_(a.matmul_add(b, r)))
    yield rule(m == a.matmul(b).add(r), name="matmul + residual as epilogue").then(
        union(m).with_(a.matmul_add(b, r)))

"""Soft-cap as the matmul's epilogue: cap * tanh(a @ b / cap) is applied to the accumulator
tile before the store, so the raw logits (the largest activation of the model) are never
written and read back."""

from egglog import f64, rule, ruleset, union

from ..compiler.egraph import Tensor

softcap_epilogue = ruleset(name="softcap_epilogue")


@softcap_epilogue.register
def _(a: Tensor, b: Tensor, m: Tensor, cap: f64):
    yield rule(m == a.matmul(b).softcap(cap), name="soft-cap as matmul epilogue").then(
        union(m).with_(a.matmul_softcap(b, cap)))

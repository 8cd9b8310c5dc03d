"""An op applied to a kernel's output joins the kernel as its last stage, wherever the
kernel's archetype takes that op (its epilogue set, from the op table's localities).

    f(K(...; E), others)  =  K(...; E then f(others))     K: product, rows, pointwise, gather

for every op f, every operand position the kernel's output may take in f, and every
archetype taking f. The fused kernel never writes the intermediate tensor and reads it
back, and saves a launch: the residual add and the soft-cap as a product's epilogue, the
gating of the per-layer input, a post-norm with its residual and layer scalar in one row
pass, norm + RoPE of q and k, rows written straight into their KV-cache slots. Whether
the fused kernel wins is the cost model's call (a row's RMSNorm in a tiled product's
epilogue has no kernel and is priced out; at one row it runs in the last column tile).
"""

from egglog import rule, ruleset, union

from ..compiler.kernels import ARCHETYPES
from ..compiler.ops import OPS
from .terms import apply, attr_vars, kernel, stage, stage_lists, tensors

epilogue = ruleset(name="epilogue")


def _rules():
    for arch in ARCHETYPES.values():
        main = tensors("k", len(arch.main))
        pro, epi = stage_lists()
        fused = kernel(arch, main, pro, epi)
        for name in sorted(arch.epilogue):
            spec = OPS[name]
            attrs = attr_vars(spec)
            for at in spec.through:
                others = tensors("o", spec.arity - 1)
                operands = others[:at] + [fused] + others[at:]
                m = tensors("m", 1)[0]
                shown = ", ".join(arch.name if k == at else "_" for k in range(spec.arity))
                yield rule(m == apply(spec, operands, attrs),
                           name=f"{name}({shown}) joins the {arch.name} kernel's epilogue").then(
                    union(m).with_(kernel(arch, main, pro, epi.then(stage(spec, at, others, attrs)))))


epilogue.register(*_rules())

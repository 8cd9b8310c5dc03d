"""egglog rulesets, one file per family, composed into one schedule.

The analysis (column counts) saturates first; then every rewrite family runs
together until nothing changes. Rewrites only add equivalent terms: which of
them runs is decided afterwards by cost-based extraction.
"""

from .algebra import algebra
from .analysis import analysis
from .merge_matmul import shared_input_merge
from .norm_matmul import rmsnorm_matmul
from .qk_norm_rope import qk_norm_rope
from .residual import residual_epilogue
from .swiglu import swiglu_chain

FUSIONS = {
    "rmsnorm_matmul": rmsnorm_matmul,
    "qk_norm_rope": qk_norm_rope,
    "swiglu_chain": swiglu_chain,
    "residual_epilogue": residual_epilogue,
    "shared_input_merge": shared_input_merge,
    "algebra": algebra,
}


def schedule(families=None):
    """analysis to saturation, then the chosen families (default: all), repeated to saturation."""
    chosen = [FUSIONS[f] for f in (FUSIONS if families is None else families)]
    step = analysis.saturate()
    for rs in chosen:
        step = step + rs
    return step.saturate()

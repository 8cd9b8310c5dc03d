"""egglog rulesets, one file per family, composed into one schedule.

The analysis (column counts, which terms are weights) saturates first; then every
rewrite family runs together until nothing changes. Rewrites only add equivalent terms:
which of them runs is decided afterwards by cost-based extraction.
"""

from .algebra import algebra
from .analysis import analysis
from .cache_rows import cache_rows
from .gated_mlp import gated_mlp
from .merge_matmul import shared_input_merge
from .norm_matmul import rmsnorm_matmul
from .post_norm import post_norm_residual
from .qk_norm_rope import qk_norm_rope
from .residual import residual_epilogue
from .row_slice import row_slice
from .scalar import scalar_fold
from .softcap import softcap_epilogue

FUSIONS = {
    "rmsnorm_matmul": rmsnorm_matmul,
    "qk_norm_rope": qk_norm_rope,
    "cache_rows": cache_rows,
    "gated_mlp": gated_mlp,
    "residual_epilogue": residual_epilogue,
    "post_norm_residual": post_norm_residual,
    "softcap_epilogue": softcap_epilogue,
    "scalar_fold": scalar_fold,
    "shared_input_merge": shared_input_merge,
    "row_slice": row_slice,
    "algebra": algebra,
}


def schedule(families=None):
    """analysis to saturation, then the chosen families (default: all), repeated to saturation
    (the analysis saturates again on every round: rewrites build terms whose facts later
    rules read)."""
    chosen = [FUSIONS[f] for f in (FUSIONS if families is None else families)]
    step = analysis.saturate()
    for rs in chosen:
        step = step + rs
    return step.saturate()

"""egglog rulesets, one file per family, composed into one schedule.

The analysis (column counts, which terms are weights) saturates first; the archetypes'
normal form (every op as a kernel of its archetype) and every chosen rewrite family then
run together until nothing changes. Rewrites only add equivalent terms: which of them runs
is decided afterwards by cost-based extraction.

Fusions are three structural families, generated from the op table rather than written per
combination: `epilogue` (an op on a kernel's output joins the kernel), `prologue` (the
RMSNorm of a product's input joins it), `paired` (two products of one input combined by a
binary op become one product over both weights). `fused_loss` makes the lm_head's product,
soft-cap and cross-entropy one op, forward and backward (`capped_loss`: the soft-cap inside
the loss's kernels where the logits are stored); `experts` fuses the mixture-of-experts products' GLU and
weighted sum. The others are algebra: products sharing
an input merge, constant scales fold, row slices move ahead of row-local ops, slices of
concatenations simplify.
"""

from .algebra import algebra
from .analysis import analysis
from .archetypes import archetypes
from .epilogue import epilogue
from .experts import experts
from .fused_loss import capped_loss, fused_loss
from .merge_matmul import shared_input_merge
from .paired import paired
from .prologue import prologue
from .row_slice import row_slice
from .scalar import scalar_fold

FUSIONS = {
    "epilogue": epilogue,
    "prologue": prologue,
    "paired": paired,
    "shared_input_merge": shared_input_merge,
    "scalar_fold": scalar_fold,
    "row_slice": row_slice,
    "algebra": algebra,
    "fused_loss": fused_loss,
    "capped_loss": capped_loss,
    "experts": experts,
}


def schedule(families=None):
    """analysis to saturation, then the archetypes' normal form and the chosen families
    (default: all), repeated to saturation (the analysis saturates again on every round:
    rewrites build terms whose facts later rules read)."""
    unknown = sorted(set(families or ()) - set(FUSIONS))
    if unknown:
        raise ValueError(f"unknown rewrite family {unknown[0]!r} (known: {', '.join(FUSIONS)})")
    chosen = [FUSIONS[f] for f in (FUSIONS if families is None else families)]
    step = analysis.saturate() + archetypes
    for rs in chosen:
        step = step + rs
    return step.saturate()

"""The lm_head's product, its soft-cap and the cross-entropy are one op, forward and
backward: the [rows, vocab] logits and their gradient are never stored.

    cross_entropy(softcap(x @ w^T, cap), labels) = linear_cross_entropy(x, w, labels, cap)
    linear_cross_entropy(x, w, labels, cap)      = stats[:, 0]
    d z @ w            = linear_cross_entropy_grad_h(x, w, labels, d, stats[:, 1], cap)
    matmul_tn(d z, x)  = linear_cross_entropy_grad_w(x, w, labels, d, stats[:, 1], cap)

with stats = linear_cross_entropy_stats(x, w, labels, cap) (each row's loss and logsumexp,
one pass over the vocabulary), z = x @ w^T and d z = softcap_grad(cross_entropy_grad(
softcap(z), labels, d), z): the forms autodiff writes for the loss (compiler/ops.py's VJPs
of matmul, softcap and cross_entropy), so a training graph built from the plain loss offers
both plans; the same without the soft-cap (cap 0). Fused, each gradient recomputes the
logits tile by tile before its product (a pass more than the plain plan's), and nothing of
[rows, vocab] is stored; plain, the logits and their gradient are written and read: the
cost model's time and memory prices decide. `capped_loss` takes the soft-cap into the plain
loss's kernels (applied as they read the logits, its derivative as the gradient is
written), so of [rows, vocab] only the logits and their gradient are stored. Where no d w
is wanted (a frozen lm_head), the loss and d h are also one op together,

    cross_entropy(...), d z @ w = linear_cross_entropy_dh(x, w, labels, d, cap)[:, H], [:, :H]

its logits made once, a chunk of rows at a time (codegen/linear_loss.py): d, a training
step's row weights, is an input, known before the loss.
"""

from egglog import f64, i64, rule, ruleset, union

from ..compiler.egraph import Tensor, cols

fused_loss = ruleset(name="fused_loss")


@fused_loss.register
def _(x: Tensor, w: Tensor, labels: Tensor, d: Tensor, m: Tensor, n: Tensor, k: i64,
      cap: f64):
    z = x.matmul(w.transpose())
    capped = z.softcap(cap)
    d_capped = capped.cross_entropy_grad(labels, d).softcap_grad(z, cap)
    forms = ((capped, cap, d_capped, "soft-capped"),
             (z, f64(0.0), z.cross_entropy_grad(labels, d), "plain"))
    for logits, c, dz, what in forms:
        lse = x.linear_cross_entropy_stats(w, labels, c).slice_cols(i64(1), i64(1))
        yield rule(m == logits.cross_entropy(labels),
                   name=f"the {what} lm_head and its loss are one op").then(
            union(m).with_(x.linear_cross_entropy(w, labels, c)))
        yield rule(m == dz.matmul(w), name=f"d rows of the {what} lm_head's loss: one op").then(
            union(m).with_(x.linear_cross_entropy_grad_h(w, labels, d, lse, c)))
        yield rule(m == dz.matmul_tn(x),
                   name=f"d weight of the {what} lm_head's loss: one op").then(
            union(m).with_(x.linear_cross_entropy_grad_w(w, labels, d, lse, c)))
    # a training step's loss and d rows together: the row weights d are known before the
    # loss (an input), so one op writes both in one pass over the logits, chunk by chunk
    # (codegen/linear_loss.py): the logits computed once, not once more for the gradient
    for logits, c, dz, what in forms:
        both = x.linear_cross_entropy_dh(w, labels, d, c)
        yield rule(m == logits.cross_entropy(labels), n == dz.matmul(w), cols(x) == k,
                   name=f"the {what} lm_head's loss and d rows: one op").then(
            union(m).with_(both.slice_cols(k, i64(1))),
            union(n).with_(both.slice_cols(i64(0), k)))
    # the loss is the first column of the statistics the gradients read
    yield rule(m == x.linear_cross_entropy(w, labels, cap),
               name="the fused loss is a column of its statistics").then(
        union(m).with_(x.linear_cross_entropy_stats(w, labels, cap).slice_cols(i64(0), i64(1))))


capped_loss = ruleset(name="capped_loss")


@capped_loss.register
def _(z: Tensor, labels: Tensor, d: Tensor, m: Tensor, cap: f64):
    # where the logits exist: the soft-cap inside the loss's kernels, applied as they read
    # the logits (cross_entropy(z, cap)) and its derivative as the gradient's writes them,
    # so neither the capped logits nor their gradient before the cap's is stored
    capped = z.softcap(cap)
    yield rule(m == capped.cross_entropy(labels), name="the soft-cap read by the loss").then(
        union(m).with_(z.cross_entropy(labels, cap)))
    yield rule(m == capped.cross_entropy_grad(labels, d).softcap_grad(z, cap),
               name="the soft-cap's gradient written by the loss's").then(
        union(m).with_(z.cross_entropy_grad(labels, d, cap)))

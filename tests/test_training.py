"""Training's pieces against torch: AdamW against torch.optim.AdamW, the fused loss against
transformers' causal-LM loss under autograd."""

import pytest
import torch

from meganeura.errors import InputError
from meganeura.training import AdamW
from numerics import assert_close

SHAPES = {"a": (7,), "b.weight": (37, 13), "c": (130,), "d": (1, 1), "e": (53, 71)}  # e: two programs


def _weights(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _grads(step: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_adamw_steps_equal_torch(tmp_path, max_norm):
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _weights(0), {n: torch.nn.Parameter(w.clone()) for n, w in _weights(0).items()}
    opt = AdamW(ours, cache_dir=tmp_path, **kw)
    ref = torch.optim.AdamW(list(theirs.values()), foreach=False, **kw)
    for step in range(3):
        grads = _grads(step, scale=3.0)
        norm = opt.step({n: g.clone() for n, g in grads.items()}, max_norm=max_norm)
        for n, p in theirs.items():
            p.grad = grads[n].clone()
        total = torch.nn.utils.clip_grad_norm_(list(theirs.values()), max_norm or float("inf"),
                                               foreach=False)
        ref.step()
        assert norm == pytest.approx(float(total), rel=1e-6)
        for n, p in theirs.items():
            assert_close(ours[n], p.detach(), "fp32-exact")
            state = ref.state[p]
            assert_close(opt.exp_avg[n], state["exp_avg"], "fp32-exact")
            assert_close(opt.exp_avg_sq[n], state["exp_avg_sq"], "fp32-exact")
    assert opt.steps == 3


@pytest.mark.parametrize("scale, kw", [
    # gradients as small as eps: the denominator's eps and its place matter
    (1e-4, dict(lr=1e-2, betas=(0.3, 0.5), eps=1e-4, weight_decay=0.0)),
    (1e-6, dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5)),
])
def test_other_betas_and_an_eps_that_matters_equal_torch(tmp_path, scale, kw):
    ours, theirs = _weights(1), {n: torch.nn.Parameter(w.clone()) for n, w in _weights(1).items()}
    start = {n: w.clone() for n, w in ours.items()}
    opt = AdamW(ours, cache_dir=tmp_path, **kw)
    ref = torch.optim.AdamW(list(theirs.values()), foreach=False, **kw)
    for step in range(3):
        grads = _grads(step, scale)
        opt.step(grads)
        for n, p in theirs.items():
            p.grad = grads[n].clone()
        ref.step()
    for n, p in theirs.items():  # the updates themselves, not only the weights they move
        assert_close(ours[n] - start[n], p.detach() - start[n], "fp32")


def test_non_finite_gradients_change_nothing(tmp_path):
    ours = _weights(2)
    opt = AdamW(ours, lr=1e-2, cache_dir=tmp_path)
    opt.step(_grads(0))
    before = {n: w.clone() for n, w in ours.items()}
    moments = {n: m.clone() for n, m in opt.exp_avg.items()}
    bad = _grads(1)
    bad["b.weight"][3, 4] = float("nan")
    with pytest.raises(InputError, match="hold NaN or inf .* the step was not taken"):
        opt.step(bad)
    assert opt.steps == 1
    assert all(torch.equal(ours[n], before[n]) for n in ours)
    assert all(torch.equal(opt.exp_avg[n], moments[n]) for n in ours)


@pytest.mark.parametrize("kw, message", [
    (dict(lr=-1.0), r"lr must be a number in \[0, inf\], got -1.0"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0, 1\), got 1.0"),
    (dict(betas=0.9), r"betas must be two numbers in \[0, 1\), got 0.9"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a number"),
])
def test_bad_hyperparameters_are_named(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        AdamW(_weights(0), cache_dir=tmp_path, **kw)


@pytest.mark.parametrize("change, message", [
    (lambda g: g.pop("c"), "'c' is missing"),
    (lambda g: g.update(f=torch.ones(2)), "'f' is not a trained weight"),
    (lambda g: g.update(a=torch.ones(8)), r"gradient 'a' must be .* of shape \[7\] on cpu, got "
                                          r"shape \[8\]"),
    (lambda g: g.update(a=torch.ones(7, dtype=torch.int64)), "fp32, bf16, fp16 or fp64"),
])
def test_bad_gradients_are_named_and_change_nothing(tmp_path, change, message):
    ours = _weights(3)
    before = {n: w.clone() for n, w in ours.items()}
    opt = AdamW(ours, cache_dir=tmp_path)
    grads = _grads(0)
    change(grads)
    with pytest.raises(InputError, match=message):
        opt.step(grads)
    assert opt.steps == 0 and all(torch.equal(ours[n], before[n]) for n in ours)


def test_whole_runs_of_aligned_tensors_take_the_wide_kernels(tmp_path):
    # every element count a multiple of 8 (and torch's addresses of 16 bytes): the kernels
    # are told so (16-byte loads and stores on the GPU) and step as torch does
    kw = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    shapes = {"a": (8,), "b": (24, 40), "c": (4104,)}  # c: a block and a part
    g = torch.Generator().manual_seed(6)
    start = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    ours, theirs = dict(start), {n: torch.nn.Parameter(w.clone()) for n, w in start.items()}
    opt = AdamW({n: w.clone() for n, w in ours.items()}, cache_dir=tmp_path, **kw)
    ref = torch.optim.AdamW(list(theirs.values()), foreach=False, **kw)
    for _ in range(2):
        grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        opt.step(grads, max_norm=3.0)
        for n, p in theirs.items():
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), 3.0)
        ref.step()
    assert all(group.aligned for group in opt._groups.values())
    for n, p in theirs.items():
        assert_close(opt.weights[n], p.detach(), "fp32-exact")


def test_mixed_gradient_dtypes_take_one_launch_each(tmp_path):
    """Gradients of two dtypes (fp32 and fp64 here; a plan's outputs mix fp32 and bf16 on the
    GPU): one norm launch and one step launch per dtype over all their tensors, equal to
    torch's AdamW with clipping on the same gradients."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours, theirs = _weights(5), {n: torch.nn.Parameter(w.clone()) for n, w in _weights(5).items()}
    opt = AdamW(ours, cache_dir=tmp_path, **kw)
    ref = torch.optim.AdamW(list(theirs.values()), foreach=False, **kw)
    launches = []
    load = opt._kernel

    class Counted:
        def __init__(self, fn, entry):
            self.fn, self.entry = fn, entry

        def __getitem__(self, grid):
            launches.append(self.entry)
            return self.fn[grid]
    opt._kernel = lambda source, entry: Counted(load(source, entry), entry)
    for step in range(3):
        grads = {n: g.double() if i % 2 else g for i, (n, g) in enumerate(_grads(step).items())}
        opt.step(grads, max_norm=2.0)
        for n, p in theirs.items():
            p.grad = grads[n].float()
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), 2.0)
        ref.step()
    assert sorted(launches) == sorted(["sq_sum_kernel", "adamw_kernel"] * 2 * 3)
    for n, p in theirs.items():
        assert_close(ours[n], p.detach(), "fp32-exact")


@pytest.mark.cuda
def test_bf16_weights_with_fp32_master_weights_follow_fp32_adamw():
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    start = {n: w.cuda() for n, w in _weights(4).items()}
    ours = {n: w.to(torch.bfloat16) for n, w in start.items()}
    theirs = {n: torch.nn.Parameter(w.to(torch.bfloat16).float()) for n, w in start.items()}
    opt = AdamW(ours, master_weights=True, **kw)
    ref = torch.optim.AdamW(list(theirs.values()), **kw)
    for step in range(20):
        grads = {n: g.cuda() for n, g in _grads(step).items()}
        opt.step({n: g.to(torch.bfloat16) for n, g in grads.items()})
        for n, p in theirs.items():
            p.grad = grads[n].to(torch.bfloat16).float()
        ref.step()
    for n, p in theirs.items():  # the master weights follow fp32 AdamW; the weights round them
        assert_close(opt.master_weights[n], p.detach(), "fp32")
        assert torch.equal(ours[n], opt.master_weights[n].to(torch.bfloat16))


# ---- the fused linear + soft-cap + cross-entropy --------------------------------------------


def _ce_case(t: int, h: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * h ** -0.5 * 4  # logits of a few units
    ids = torch.randint(0, v, (t,), generator=g)
    ids[torch.randperm(t, generator=g)[: t // 5]] = -100  # positions that are not learned
    return hidden, weight, ids


def _reference(hidden, weight, labels, softcap):
    """transformers' causal-LM loss and torch autograd's gradients, in fp64."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logits = h @ w.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = ForCausalLMLoss(logits[None], labels[None], vocab_size=w.shape[0])
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("t, h, v, softcap", [(37, 40, 130, 30.0), (5, 16, 33, None),
                                              (70, 24, 97, 2.0)])
def test_fused_loss_and_gradients_equal_transformers_loss_under_autograd(tmp_path, t, h, v,
                                                                         softcap):
    from meganeura.training.loss import LinearCrossEntropy, shift_labels

    hidden, weight, labels = _ce_case(t, h, v, seed=t)
    ce = LinearCrossEntropy("cpu", softcap=softcap, cache_dir=tmp_path)
    loss, dh, dw = ce(hidden, weight, shift_labels(labels))
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, softcap)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert_close(dh, ref_dh, "fp32")
    assert_close(dw, ref_dw, "fp32")
    assert ce(hidden, weight, shift_labels(labels), grads=False)[1:] == (None, None)


def test_shifted_labels_predict_the_next_token():
    from meganeura.training.loss import shift_labels

    assert shift_labels(torch.tensor([5, 6, -100, 8])).tolist() == [6, -100, 8, -100]
    assert shift_labels(torch.tensor([[1, 2], [3, 4]])).tolist() == [[2, -100], [4, -100]]


@pytest.mark.parametrize("change, message", [
    (lambda h, w, y: (h, w, torch.full_like(y, -100)), "every label is -100"),
    (lambda h, w, y: (h, w, y[:-1]), r"labels must be int64 of shape \[37\]"),
    (lambda h, w, y: (h, w, y.int()), r"labels must be int64 .* torch.int32"),
    (lambda h, w, y: (h, w, torch.where(y == y[0], 130, y)), r"label 130 is outside the "
                                                             r"vocabulary \[0, 130\)"),
    (lambda h, w, y: (h, w[:, :-1], y), "must share their width and dtype"),
    (lambda h, w, y: (h[None], w, y), "hidden must be a 2-D floating-point tensor"),
])
def test_bad_loss_inputs_are_named(tmp_path, change, message):
    from meganeura.training.loss import LinearCrossEntropy, shift_labels

    hidden, weight, labels = _ce_case(37, 40, 130, seed=1)
    labels = shift_labels(labels)
    labels[0] = 7  # a counted position, whatever the draw
    with pytest.raises(InputError, match=message):
        LinearCrossEntropy("cpu", cache_dir=tmp_path)(*change(hidden, weight, labels))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_the_gpu(dtype):
    from meganeura.training.loss import LinearCrossEntropy, shift_labels

    hidden, weight, labels = _ce_case(301, 256, 2003, seed=3)
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # the reference reads the same values
    loss, dh, dw = LinearCrossEntropy("cuda", softcap=30.0)(hidden.cuda(), weight.cuda(),
                                                            shift_labels(labels).cuda())
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels, 30.0)
    kind = "fp32" if dtype == torch.float32 else "bf16"
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5 if kind == "fp32" else 2e-2)
    assert_close(dh.cpu(), ref_dh, kind)
    assert_close(dw.cpu(), ref_dw, kind)

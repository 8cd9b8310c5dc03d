"""Whole compiled models (every kernel generated from the extracted plan) and their errors."""

import pytest
import torch

import meganeura
from configs import CONFIGS, SMALL
from meganeura.compiler.cost import CPU_INTERPRETER, DeviceProfile
from meganeura.errors import InputError, MeganeuraError, WeightsError
from meganeura.models import build
from meganeura.models.weights import random_weights
from meganeura.runtime.reference import run_reference
from numerics import assert_close


def _ids(c, seq, seed):
    return torch.randint(0, c.vocab_size, (seq,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq", [1, 7, 37])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_model_matches_reference(name, seq, tmp_path):
    c = CONFIGS[name]
    g = build(c, seq)
    w = random_weights(c, seed=seq + 5)
    fn = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    fn.outputs[0].fill_(float("nan"))
    ids = _ids(c, seq, seq)
    (ref,) = run_reference(g, w, {"token_ids": ids})
    assert_close(fn(ids), ref, "fp32")
    ids2 = _ids(c, seq, seq + 100)  # a second call with other ids: buffers are reused
    (ref2,) = run_reference(g, w, {"token_ids": ids2})
    assert_close(fn(ids2), ref2, "fp32")
    archetypes = {a for _, a, _ in fn.report.kernels}
    assert archetypes == {"embedding", "matmul", "rowwise", "attention"}
    assert len(fn.launches) == len(fn.report.plan.launches)


def test_a_different_device_profile_launches_different_kernels(tmp_path):
    c = CONFIGS["gqa2"]
    g = build(c, 7)
    w = random_weights(c, seed=2)
    ids = _ids(c, 7, 1)
    fused = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    # no launch overhead and a very slow vector unit: recomputing norms stops paying
    slow_vector = DeviceProfile("slow-vector", CPU_INTERPRETER.bandwidth, 1e12, 1e7, 0.0, 32)
    other = meganeura.compile(g, w, device="cpu", profile=slow_vector, cache_dir=tmp_path)
    kinds = lambda m: [(a, v) for _, a, v in m.report.kernels]  # noqa: E731
    assert kinds(fused) != kinds(other)
    assert ("rowwise", "rms_norm") in kinds(other) and ("rowwise", "rms_norm") not in kinds(fused)
    assert_close(other(ids).clone(), fused(ids).clone(), "fp32")
    (ref,) = run_reference(g, w, {"token_ids": ids})
    assert_close(other(ids), ref, "fp32")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    g = build(SMALL, 5)
    return meganeura.compile(g, random_weights(SMALL), device="cpu",
                             cache_dir=tmp_path_factory.mktemp("k"))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([1, 2, 3, 4]), r"must have shape \[5\], got \[4\]"),
    (torch.tensor([1, 2, 3, 4, 5, 6]), r"must have shape \[5\], got \[6\]"),
    (torch.tensor([1.0, 2, 3, 4, 5]), "must hold integers"),
    (torch.tensor([1, 2, 64, 4, 5]), r"token id 64, outside \[0, 64\)"),
    (torch.tensor([1, 2, -3, 4, 5]), "token id -3"),
    (torch.tensor([1, 2, 3, 4, 5], device="meta"), "is on meta, the model runs on cpu"),
    ("1 2 3 4 5", "must be a torch.Tensor"),
])
def test_bad_token_ids_are_rejected_before_any_kernel(small_model, monkeypatch, ids, message):
    ran = []
    monkeypatch.setattr(small_model, "run_kernels", lambda: ran.append(1))
    with pytest.raises(InputError, match=message):
        small_model(ids)
    assert ran == []


def test_wrong_number_of_inputs(small_model):
    with pytest.raises(InputError, match=r"expected 1 input\(s\) \(token_ids\), got 2"):
        small_model(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_missing_and_misshaped_weights(tmp_path):
    g = build(SMALL, 3)
    w = random_weights(SMALL)
    del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    w = random_weights(SMALL)
    w["lm_head.weight"] = w["lm_head.weight"].T
    with pytest.raises(WeightsError, match=r"'lm_head.weight' has shape \[64, 32\], expected \[32, 64\]"):
        meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)


def test_bad_device_and_dtype(tmp_path):
    g = build(SMALL, 3)
    w = random_weights(SMALL)
    with pytest.raises(MeganeuraError, match="dtype must be"):
        meganeura.compile(g, w, device="cpu", dtype=torch.float16, cache_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(MeganeuraError, match="CUDA is not available"):
            meganeura.compile(g, w, device="cuda", cache_dir=tmp_path)


def test_only_the_kernels_inputs_stay_resident(small_model):
    g = small_model.report.plan.graph
    resident = {g[i].name for i in small_model.tensors if g[i].op == "parameter"}
    # the merged q | k | v and gate | up products read their weights in place (the norm
    # weight scales A in the prologue): no concatenated or folded copy stays resident
    for w in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
              "self_attn.o_proj", "input_layernorm"):
        assert f"model.layers.0.{w}.weight" in resident, w
    # the token ids live in the buffer arena, in the memory the logits take at the end
    (ids,) = g.inputs()
    ids_at = small_model.tensors[ids.id].data_ptr()
    logits = small_model.outputs[0]
    assert ids_at != 0 and ids.id not in small_model.plan.load_time
    assert logits.data_ptr() <= ids_at < logits.data_ptr() + logits.nbytes
    kept = {g[i].op for i in small_model.tensors if i in small_model.plan.load_time}
    # nothing: not even the positions 0 .. S-1 (RoPE takes the row index for them)
    assert kept == set() and "arange" in {g[i].op for i in small_model.plan.load_time}
    assert {v for _, a, v in small_model.report.kernels if a == "matmul"} >= {
        "rms_norm|+matvec-5-rows+3-part-B", "rms_norm|glu.pair+tma+2-part-B"}


def test_buffers_are_reused_by_liveness_and_never_alias_a_live_input():
    from meganeura.compiler.cost import CostModel
    from meganeura.pipeline import optimize_graph as optimize
    from meganeura.runtime.buffers import plan_buffers

    c = CONFIGS["gqa2"]
    deep = type(c)(**{**c.__dict__, "num_hidden_layers": 6})
    plan, _ = optimize(build(c, 7), CostModel(CPU_INTERPRETER, "fp32"))
    deep_plan, _ = optimize(build(deep, 7), CostModel(CPU_INTERPRETER, "fp32"))
    buffers = plan_buffers(plan, 4, inputs=True)
    # memory is reused layer after layer: three times the depth, the same arena
    assert plan_buffers(deep_plan, 4, inputs=True).total == buffers.total < sum(
        buffers.nbytes_of.values())
    # the token ids (8 bytes each) take no memory of their own: the arena is as large
    assert plan_buffers(plan, 4).total == buffers.total
    g = plan.graph
    (ids,) = [n.id for n in g.inputs()]
    assert buffers.nbytes_of[ids] == 256  # 7 ids, 56 bytes, aligned
    order = {nid: k for k, nid in enumerate(plan.launches)}
    order[ids] = -1  # written before the first launch
    base = {v: g[v].inputs[0] for v in plan.views}
    owners = [ids] + list(plan.launches)
    last = {nid: order[nid] for nid in owners}  # lifetimes, recomputed here
    for nid in plan.launches:
        for i in g[nid].inputs:
            if base.get(i, i) in last:
                last[base.get(i, i)] = max(last[base.get(i, i)], order[nid])
    for o in g.outputs:
        last[base.get(o, o)] = float("inf")
    span = {n: (buffers.offset[n], buffers.offset[n] + buffers.nbytes_of[n]) for n in owners}
    for a in owners:
        assert span[a][0] % 256 == 0 and span[a][1] <= buffers.total
        for b in owners:
            if a < b and span[a][0] < span[b][1] and span[b][0] < span[a][1]:  # same memory
                assert last[a] < order[b] or last[b] < order[a], (
                    f"{g.label(a)} and {g.label(b)} share memory while both live")

def test_weights_changed_in_place_are_seen_after_a_refresh(tmp_path):
    # a training step updates the weights in place: the plan's load-time copies (merged
    # weights on the interpreter) and the weights it holds in its own dtype (fp64 given
    # here) are computed again into their buffers; the launches and the arena stay
    c = CONFIGS["gqa2"]
    g = build(c, 7)
    w = random_weights(c, seed=3)
    w = {n: (t.double() if n.endswith("o_proj.weight") else t) for n, t in w.items()}
    fn = meganeura.compile(g, w, device="cpu", cache_dir=tmp_path)
    copies = [i for i in fn.tensors if i in fn.plan.load_time]
    assert copies, "the interpreter's plan reads a merged weight"
    arena = fn.outputs[0].data_ptr()
    ids = _ids(c, 7, 1)
    fn(ids)
    gen = torch.Generator().manual_seed(4)
    for t in w.values():  # in place, as the optimizer does
        t.add_(0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    (ref,) = run_reference(g, w, {"token_ids": ids})
    assert not torch.allclose(fn(ids), ref, atol=1e-3)  # stale until refreshed
    fn.refresh_weights(w)
    assert_close(fn(ids), ref, "fp32")
    assert fn.outputs[0].data_ptr() == arena

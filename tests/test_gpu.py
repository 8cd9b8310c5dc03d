"""The same kernels and models on a CUDA GPU: bf16 against the fp32 reference (2e-2)."""

import sys
from pathlib import Path

import pytest
import torch

import meganeura
from configs import CONFIGS
from kernel_cases import (GATHER_CASES, POINTWISE_CASES, PRODUCT_CASES, PRODUCT_SAMPLE,
                          ROW_CASES, ROW_NORM_PRODUCT_CASES, ROW_WRITE_CASES, attention_case,
                          cache_attention_case, cache_rows_case, check_cache_attention,
                          check_cache_rows, check_case, gather_case, parts_case,
                          pointwise_case, product_case, product_tn_case, row_case,
                          norm_grad_case, attention_grad_case, linear_loss_case, moe_case)
from meganeura.models import Gemma4Config, build
from meganeura.models.weights import random_weights
from meganeura.runtime.reference import run_reference
from numerics import assert_close

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("tmn", [(37, 45, 70), (2048, 2560, 640), (4096, 256, 2560),
                                 (4096, 10240, 16), (4096, 16, 2560), (1000, 3000, 24)])
def test_reduction_product_bf16(tmn, tmp_path):
    # a weight's gradient dY^T X over a sequence's rows, an fp32 result; a LoRA adapter's
    # (16 columns, or 16 rows: thin tiles, the rows split among programs)
    check_case(product_tn_case(*tmn, seed=tmn[0]), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("s, heads, kv_heads, head_dim, window, dy_fp32", [
    (300, 8, 2, 256, 0, False), (300, 8, 2, 256, 64, False), (130, 8, 1, 512, 0, False),
    (77, 4, 4, 128, 0, False), (300, 8, 2, 256, 64, True), (130, 8, 2, 512, 0, True)])
def test_attention_grad_bf16(s, heads, kv_heads, head_dim, window, dy_fp32, tmp_path):
    # dy_fp32: a LoRA plan's dO, held in fp32 (rounded to bf16 for the products)
    check_case(attention_grad_case(s, heads, kv_heads, head_dim, window, seed=s,
                                   dy_fp32=dy_fp32), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_cross_entropy_stats",
                                "linear_cross_entropy_grad_h", "linear_cross_entropy_grad_w",
                                "linear_cross_entropy_dh"])
def test_linear_loss_bf16(op, tmp_path):
    check_case(linear_loss_case(op, 300, 512, 5000, 30.0, seed=1), "cuda", torch.bfloat16,
               tmp_path, "bf16")


def test_loss_and_d_rows_in_chunks_bf16(tmp_path, monkeypatch):
    # linear_cross_entropy_dh's logits scratch of 256 rows: 1000 rows in four chunks
    from meganeura.compiler import cost

    monkeypatch.setattr(cost, "LOGITS_BYTES", 256 * 20000 * 2)
    check_case(linear_loss_case("linear_cross_entropy_dh", 1000, 640, 20000, 30.0, seed=2),
               "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("op", ["norm_grad", "unit_norm_grad", "norm_wgrad"])
@pytest.mark.parametrize("s, width, head_dim", [(37, 2560, 2560), (300, 2048, 256),
                                                (64, 4096, 512)])
def test_norm_gradients_bf16(op, s, width, head_dim, tmp_path):
    check_case(norm_grad_case(op, s, width, head_dim, seed=s), "cuda", torch.bfloat16, tmp_path,
               "bf16")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mkn", [(4096, 2560, 16), (300, 10240, 24)])
@pytest.mark.parametrize("op", ["plain", "rms_norm|", "|add"])
def test_thin_product_bf16(op, mkn, transposed, tmp_path):
    # a LoRA adapter's products: 16 or 24 columns, tiles of 64 rows and that width
    check_case(product_case(op, *mkn, seed=mkn[2], transposed=transposed), "cuda",
               torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mkn", [(1, 45, 70), (1, 2560, 1000), (37, 45, 70), (300, 2560, 1000)])
@pytest.mark.parametrize("op", PRODUCT_CASES)
def test_product_bf16(op, mkn, transposed, tmp_path):
    check_case(product_case(op, *mkn, seed=mkn[0], transposed=transposed), "cuda",
               torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mkn", [(8, 2560, 2560), (3, 2560, 10240), (16, 10240, 2560),
                                 (5, 2560, 262144 // 16)])
@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_few_rows_in_each_program_bf16(op, mkn, transposed, tmp_path):
    # a batched decode step's products: every program takes the rows (a 16-row tile on the
    # matrix units) and streams its columns of B, K split where the column tiles are few
    model = check_case(product_case(op, *mkn, seed=mkn[0], transposed=transposed), "cuda",
                       torch.bfloat16, tmp_path, "bf16", sms=132)
    spec = model.launches[0].spec
    tiled = op.startswith("rms_norm|glu.pair") or (op.startswith("rms_norm|") and mkn[2] >= 65536)
    assert ("+matvec" not in spec.variant) == tiled and spec.constexprs["BLOCK_M"] == 16


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mkn", [(300, 2560, 2560), (2048, 10240, 2560)])
@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_last_wave_in_half_height_tiles_bf16(op, mkn, transposed, tmp_path):
    # 60 tiles of 128 x 128 (one partial wave: 120 halves, the last row tile's second half
    # wholly past M = 300), and the seed's down projection: 320 tiles, 264 whole, the last
    # 56 as 112 halves
    model = check_case(product_case(op, *mkn, seed=7, transposed=transposed), "cuda",
                       torch.bfloat16, tmp_path, "bf16", sms=132)
    spec = model.launches[0].spec
    tiles = 3 * 20 if mkn[0] == 300 else 16 * 20
    full = tiles - tiles % 132
    assert "halved-last-wave" in spec.variant and spec.grid == (full + 2 * (tiles - full),)


@pytest.mark.parametrize("op, widths", [("plain", (1024, 256, 512)),
                                        ("|glu.pair-gelu_tanh", (768, 768))])
@pytest.mark.parametrize("transposed", [False, True])
def test_weights_read_in_parts_bf16(op, widths, transposed, tmp_path):
    # the prefill's q | k | v and gate | up read from the weights in place (the seed's [K, N]
    # and a checkpoint's [N, K]), the three K loops of q | k | v sharing one stage-buffer set
    model = check_case(parts_case(op, 300, 512, widths, seed=1, transposed=transposed), "cuda",
                       torch.bfloat16, tmp_path, "bf16")
    assert f"{len(widths)}-part-B" in model.launches[0].spec.variant


@pytest.mark.parametrize("op, widths", [("rms_norm|", (2048, 512, 512)),
                                        ("plain", (1000, 200, 64)),
                                        ("rms_norm|glu.pair-gelu_tanh", (1536, 1536))])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 8])
def test_one_row_reads_weights_in_parts_bf16(op, widths, transposed, rows, tmp_path):
    # a decode step's q | k | v and gate | up through the matrix-vector kernel, one row or
    # a batch's few (1000 is not a multiple of its column tile: the concatenation)
    model = check_case(parts_case(op, rows, 2560, widths, seed=2, transposed=transposed),
                       "cuda", torch.bfloat16, tmp_path, "bf16")
    tiled = rows > 1 and op.startswith("rms_norm|glu.pair")  # (as the H100 measured faster)
    assert ("+matvec" in model.launches[0].spec.variant) != tiled


@pytest.mark.parametrize("slots, pos", [(512, 100), (512, 5000), (4352, 4000), (32832, 30000),
                                        (40, 39)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 256), (8, 2, 512), (16, 8, 128),
                                                       (32, 16, 144)])
def test_decode_attention_bf16(slots, pos, heads, kv_heads, head_dim, tmp_path):
    # long caches split their slots among programs that the last one merges; a ring that
    # has wrapped (pos >= slots) reads every slot
    case = cache_attention_case(slots, pos, heads, kv_heads, head_dim, seed=slots)
    g, state, inputs = case
    state = {k: v * head_dim ** -0.25 for k, v in state.items()}  # O(1) scores at scale 1/sqrt(hd)
    check_cache_attention((g, state, inputs), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("slots, pos, window, sequences", [
    (1535, list(range(3000, 4024)), 512, 1),  # e4b's sliding ring, a 1024-row chunk across it
    (5120, list(range(4000, 4256)), 0, 1),  # a full cache, a 256-row chunk
    (1535, list(range(0, 16)), 512, 1),  # a first short chunk
    (2048, [100, 2047, 0, 1500, 7, 999, 1234, 64], 0, 8),  # a batched step of 8 sequences
    (1535, [3000, 10, 600, 1600], 512, 4),  # a batched step over rings
])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 256), (8, 2, 512), (32, 16, 144)])
def test_attention_over_the_cache_of_chunks_and_batches_bf16(slots, pos, window, sequences,
                                                             heads, kv_heads, head_dim,
                                                             tmp_path):
    case = cache_attention_case(slots, pos, heads, kv_heads, head_dim, seed=slots,
                                window=window, sequences=sequences)
    g, state, inputs = case
    state = {k: v * head_dim ** -0.25 for k, v in state.items()}  # O(1) scores at scale 1/sqrt(hd)
    check_cache_attention((g, state, inputs), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("op", ROW_WRITE_CASES)
def test_rows_of_a_batched_step_bf16(op, tmp_path):
    positions = torch.tensor([5000, 3, 1500, 1534, 0, 77, 4096, 1])
    check_cache_rows(cache_rows_case(op, 8, 1535, None, 2, 256, seed=8, positions=positions,
                                     sequences=8), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("s, slots, last", [(1, 4352, 4000), (1, 512, 5000), (300, 512, 299),
                                            (300, 64, 299)])
@pytest.mark.parametrize("op", ROW_WRITE_CASES)
def test_rows_normalized_into_the_cache_bf16(op, s, slots, last, tmp_path):
    check_cache_rows(cache_rows_case(op, s, slots, last, 2, 256, seed=slots), "cuda",
                     torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("op", PRODUCT_CASES)
def test_product_fp32_strided(op, tmp_path):
    check_case(product_case(op, 37, 45, 70, strided=True), "cuda", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("head_dim", [128, 132, 144, 240, 256, 512])
@pytest.mark.parametrize("op", ROW_CASES)
def test_rowwise_bf16(op, head_dim, tmp_path):
    check_case(row_case(op, 300, 4, head_dim, strided=True), "cuda", torch.bfloat16, tmp_path,
               "bf16")


@pytest.mark.parametrize("window", [None, 100, 5000], ids=["causal", "window100", "window5000"])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("head_dim", [128, 132, 144, 240, 256, 512])
def test_attention_bf16(head_dim, gqa, window, tmp_path):
    scale = 1.0 if head_dim in (256, 512) else None  # the published model's heads and scale
    check_case(attention_case(600, 2 * gqa, 2, head_dim, window, seed=head_dim, scale=scale),
               "cuda", torch.bfloat16, tmp_path, "bf16")


def test_gather_and_pointwise_bf16(tmp_path):
    for op in GATHER_CASES:
        check_case(gather_case(op, 300, 1000, 2560), "cuda", torch.bfloat16, tmp_path, "bf16")
    for op in POINTWISE_CASES:
        check_case(pointwise_case(op, 300, 1000), "cuda", torch.bfloat16, tmp_path, "bf16")


@pytest.mark.parametrize("dtype, kind", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_models_on_cuda(name, dtype, kind, tmp_path):
    c = CONFIGS[name]
    g = build(c, 37)
    w = random_weights(c, seed=3)
    fn = meganeura.compile(g, w, device="cuda", dtype=dtype, cache_dir=tmp_path)
    for seed in (1, 2):  # the second call replays the captured CUDA graph with other ids
        ids = torch.randint(0, c.vocab_size, (37,), generator=torch.Generator().manual_seed(seed))
        (ref,) = run_reference(g, w, {"token_ids": ids})
        assert_close(fn(ids.cuda()).float().cpu(), ref, kind)
    assert fn._graph is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_replays_without_recapture(dtype, tmp_path):
    c = CONFIGS["gqa2"]  # window 5: the prompt and the new tokens wrap the ring
    model = meganeura.from_config(c, device="cuda", dtype=dtype, seed=3, cache_dir=tmp_path)
    prompt = torch.randint(0, c.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=7, stop=[])
    session = model.generator.last_session
    graph = session.decode._graph
    assert graph is not None  # captured at the first step, replayed at the next ones
    again = model.generate(prompt, max_new_tokens=7, stop=[])
    assert session.decode._graph is graph and again.tolist() == out.tolist()
    if dtype == torch.float32:  # the tokens of a step-by-step loop of full reference forwards
        ids = prompt.clone()
        w = {k: v.float().cpu() for k, v in model.weights.items()}
        for _ in range(7):
            (logits,) = run_reference(build(c, ids.numel()), w, {"token_ids": ids})
            ids = torch.cat([ids, logits[-1].argmax().reshape(1)])
        assert out.tolist() == ids.tolist()


def test_chunked_prefill_and_batched_decode_on_cuda(tmp_path):
    # fp32: prompts of several chunks (4, 8; the last padded) and a batch of three, each
    # equal to a step-by-step loop of full reference forwards; the batch's captured step
    # replays at every position
    c = CONFIGS["gqa2"]
    model = meganeura.from_config(c, device="cuda", dtype=torch.float32, seed=3,
                                  cache_dir=tmp_path)
    model.generator.chunks = (4, 8)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen) for n in (21, 3, 12)]
    outs = model.generate(prompts, max_new_tokens=6, stop=[])
    assert model.generator.last_session.decode._graph is not None
    w = {k: v.float().cpu() for k, v in model.weights.items()}
    for prompt, out in zip(prompts, outs):
        ids = prompt.clone()
        for _ in range(6):
            (logits,) = run_reference(build(c, ids.numel()), w, {"token_ids": ids})
            ids = torch.cat([ids, logits[-1].argmax().reshape(1)])
        assert out.tolist() == ids.tolist()
        assert model.generate(prompt, max_new_tokens=6, stop=[]).tolist() == ids.tolist()


def test_sampling_with_a_seed_repeats_on_cuda(tmp_path):
    c = CONFIGS["small_test"]
    model = meganeura.from_config(c, device="cuda", seed=3, cache_dir=tmp_path)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    a = model.generate(prompt, 6, temperature=1.1, top_p=0.95, seed=7)
    b = model.generate(prompt, 6, temperature=1.1, top_p=0.95, seed=7)
    assert a.tolist() == b.tolist()


def test_kernels_built_in_parallel_before_the_first_run(tmp_path):
    c = CONFIGS["small_test"]
    g = build(c, 37)
    w = random_weights(c, seed=3)
    fn = meganeura.compile(g, w, device="cuda", dtype=torch.bfloat16, cache_dir=tmp_path)
    kernels = {id(k): k for launch in fn.launches for k, _ in launch.builds}
    assert len(kernels) > 2
    fn.build_kernels(threads=4)
    device = torch.cuda.current_device()
    for k in kernels.values():  # every kernel compiled before the first call
        assert len(k.device_caches[device][0]) >= 1
    ids = torch.randint(0, c.vocab_size, (37,), generator=torch.Generator().manual_seed(5))
    (ref,) = run_reference(g, w, {"token_ids": ids})
    assert_close(fn(ids.cuda()).float().cpu(), ref, "bf16")


def test_decode_with_split_products_matches_the_reference(tmp_path):
    # wide enough that the decode step's products over [K, N] weights are split along K (on
    # the H200: q | k | v, o, down and the lm_head; products of one width share the tiles'
    # counters, each leaving them zeroed)
    c = Gemma4Config(vocab_size=997, hidden_size=1280, num_hidden_layers=2,
                     num_attention_heads=10, num_key_value_heads=2, intermediate_size=2560,
                     head_dim=128, sliding_window_size=5, global_attn_period=2,
                     global_attn_offset=1)
    model = meganeura.from_config(c, device="cuda", dtype=torch.float32, seed=5,
                                  cache_dir=tmp_path)
    prompt = torch.randint(0, c.vocab_size, (9,), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=12, stop=[])
    session = model.generator.last_session
    variants = [launch.spec.variant for launch in session.decode.launches]
    # o and down split on any GPU of 41 SMs or more (80 16-column tiles fill no two waves)
    assert sum("+split-K" in v for v in variants) >= 4, variants
    w = {k: v.float().cpu() for k, v in model.weights.items()}
    (logits,) = run_reference(build(c, out.numel() - 1), w, {"token_ids": out[:-1].cpu()})
    for t in range(prompt.numel() - 1, out.numel() - 1):  # each token the argmax, to rounding
        row = logits[t]
        assert row[out[t + 1]] >= row.max() - 1e-4 * row.abs().max(), t


@pytest.mark.parametrize("op", ["rms_norm|", "plain"])
def test_narrow_one_row_product_over_a_transposed_weight_splits_k_bf16(op, tmp_path):
    # a MoE router's product (128 columns of a [128, 2816] weight): too few columns for
    # the SMs, so programs share K in slices
    g, w, inputs = product_case(op, 1, 2816, 128, seed=4, transposed=True)
    model = check_case((g, w, inputs), "cuda", torch.bfloat16, tmp_path, "bf16")
    assert "+split-K" in model.launches[0].spec.variant


@pytest.mark.parametrize("rows", [1, 8])
def test_split_products_repeat_bit_for_bit(rows, tmp_path):
    # the slices' partials are summed in slice order, not in the order programs finish: a
    # seeded generation gives the same tokens on every run
    g, w, inputs = product_case("|add", rows, 10240, 2560, seed=7)
    model = check_case((g, w, inputs), "cuda", torch.float32, tmp_path, "fp32")
    assert "+split-K" in model.launches[0].spec.variant
    dev = [x.cuda() for x in inputs]
    outs = [model(*dev).clone() for _ in range(8)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("k, n", [(2048, 2560), (10240, 2560), (8192, 5376)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("op", ROW_NORM_PRODUCT_CASES)
def test_product_ends_with_the_rows_post_norm_bf16(op, transposed, k, n, tmp_path):
    # the decode step's o, down and per-layer projections with their post-norms: hundreds
    # of column tiles on every SM, the row normalized by the last to count; the same bits
    # on every call, the counter left zeroed
    g, w, inputs = product_case(op, 1, k, n, seed=k, transposed=transposed)
    model = check_case((g, w, inputs), "cuda", torch.bfloat16, tmp_path, "bf16")
    assert model.launches[0].spec.variant.startswith(op.lstrip("|") + "+matvec")
    assert model.launches[0].spec.grid[0] >= 132
    dev = [x.to("cuda", torch.bfloat16) for x in inputs]
    outs = [model(*dev).clone() for _ in range(8)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    counters = [b for (name, _, _), b in model._scratches.items() if name.endswith("counters")]
    assert len(counters) == 1 and not counters[0].any()


@pytest.mark.parametrize("kind, name", [("gemma4", "every_feature"), ("decoder", "llama3_tied")])
def test_training_gradients_bf16(kind, name, tmp_path):
    # the whole training plan (forward, loss, backward) as bf16 kernels against
    # transformers' fp32 autograd of the same weights: each gradient within 2e-2, or within
    # 1.5x the floor of these weights (what rounding them and the linear layers' operands
    # to bf16 alone costs; e2b's gradients are 1.4-1.5x their floor, transformers' bf16 4x;
    # on every_feature transformers' bf16 is 1.45x it, the median of its tensors)
    import hf_checkpoints as hf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from hf_forward import bf16_floor_gradients

    ref = hf.text_model(name, 1) if kind == "gemma4" else hf.decoder_model(name, 1)
    hf.save(ref, tmp_path / "m")
    model = meganeura.from_pretrained(tmp_path / "m", device="cuda", cache_dir=tmp_path / "k")
    ids = torch.randint(0, model.config.vocab_size, (2, 40),
                        generator=torch.Generator().manual_seed(3))
    loss, grads = meganeura.Trainer(model).gradients(ids)
    # on every_feature's large, perturbed weights, their rounding to bf16 alone moves the
    # gradients by 0.11 (median) and the floor by 0.13; transformers' bf16 by 0.18 (the CPU)
    _, floor = bf16_floor_gradients(ref, ids, round_weights=True)
    ref.zero_grad()
    out = ref(ids, labels=ids)
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 2e-2 * out.loss.item()
    over = []  # every tensor past its bound, not only the first
    for n, p in ref.named_parameters():
        err = ((grads[n].cpu() - p.grad).norm() / p.grad.norm()).item()
        least = ((floor[n] - p.grad).norm() / p.grad.norm()).item()
        if err >= max(2e-2, 1.5 * least):
            over.append(f"{n}: {err:.3e} (the bf16 floor: {least:.3e})")
    assert not over, "\n".join(over)


@pytest.mark.parametrize("tokens", [1, 8, 300])
@pytest.mark.parametrize("op, per_token", [("expert_glu", True), ("expert_matmul", False),
                                           ("expert_matmul_combine", False),
                                           ("expert_combine", True),
                                           ("expert_glu_routed", True),
                                           ("expert_matmul_combine_routed", False)])
def test_expert_products_bf16(op, per_token, tokens, tmp_path):
    # 26B-A4B's widths (hidden 2816, experts of 704), 128 experts, top 8: a decode step's
    # programs per pair, and the sorted, grouped product of a batch and of a prefill
    width = 704 if op.startswith("expert_matmul_combine") or not per_token else 2816
    out = 2816 if width == 704 else 704
    check_case(moe_case(op, tokens, width, 128, 8, out, per_token=per_token, seed=tokens),
               "cuda", torch.bfloat16, tmp_path, "bf16")


def test_router_ties_on_cuda_as_torch_topk(tmp_path):
    # logits of three levels (ties in most rows, across the k-th place): the route kernel
    # keeps the lower index, and so does torch.topk on CUDA
    g, w, inputs = moe_case("moe_route", 64, 0, 128, 8, 0, ties=True, seed=5)
    model = check_case((g, w, inputs), "cuda", torch.float32, tmp_path, "fp32")
    route = model(*[x.cuda() for x in inputs])
    p = torch.softmax(inputs[0].cuda(), dim=-1)
    expected = torch.topk(p, 8, dim=-1).indices
    assert torch.equal(route[:, 8:].long().sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("name, programs, options", [
    ("small_test", None, {}), ("small_test", 3, {}), ("gqa2", None, {}),
    # weights stored [N, K] (a checkpoint's): tasks ask L2 for them first; registers capped
    # for several programs an SM
    ("llama", None, dict(prefetch=65536, registers=128)), ("llama", 400, dict(registers=128))])
def test_the_megakernel_computes_the_decode_steps_bits_on_cuda(name, programs, options,
                                                              tmp_path):
    # the decode step as one persistent kernel, a program per SM (None), fewer or more
    # programs than SMs, against the step's own launches from the same caches: the same
    # bits, run after run (every kernel here has the megakernel's four warps)
    from meganeura.codegen.megakernel import Megakernel
    from meganeura.compiler.schedule import build as schedule, works_of
    from meganeura.models.llama import LlamaConfig

    c = CONFIGS[name] if name in CONFIGS else LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = meganeura.from_config(c, device="cuda", dtype=torch.bfloat16, seed=4,
                                  cache_dir=tmp_path)
    gen = model.generator
    s = gen.session(64, floor=False)
    step = gen.decode_plan(s)
    g = torch.Generator(device="cuda").manual_seed(6)
    for t in s.caches.values():
        t.normal_(generator=g)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    mk = Megakernel(step, schedule(works_of(step), programs or sms), **options)
    before = {n: t.clone() for n, t in s.caches.items()}
    ids, pos = torch.tensor([5], device="cuda"), torch.tensor([30], device="cuda")
    want = step(ids, pos).clone()
    after = {n: t.clone() for n, t in s.caches.items()}
    for _ in range(3):
        for n, t in s.caches.items():
            t.copy_(before[n])
        step.outputs[0].fill_(float("nan"))
        step.load_inputs(ids, pos)
        mk.run()
        torch.cuda.synchronize()
        assert torch.equal(step.outputs[0], want)
        assert all(torch.equal(s.caches[n], after[n]) for n in s.caches)


def test_training_steps_from_a_cuda_graph_equal_the_launches(tmp_path):
    # Trainer(cuda_graph=True): the plan captured once and replayed, the weights changing in
    # place between steps (and the load-time tensors written again into their buffers)
    c = CONFIGS["small_test"]
    ids = torch.randint(0, c.vocab_size, (13,), generator=torch.Generator().manual_seed(3))
    losses = {}
    for graph in (False, True):
        model = meganeura.from_config(c, device="cuda", dtype=torch.float32, seed=2,
                                      cache_dir=tmp_path)
        trainer = meganeura.Trainer(model, lr=1e-3, cuda_graph=graph)
        losses[graph] = [trainer.step(ids) for _ in range(3)]
        fn = trainer._plans[13][2]
        assert (fn._graph is not None) == graph
    # (the gradients' atomic sums may move last bits between runs: fp32's tolerance)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)

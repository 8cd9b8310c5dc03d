"""Every archetype through Triton's interpreter against the reference, fp32, odd shapes."""

import pytest
import torch

from kernel_cases import (GATHER_CASES, POINTWISE_CASES, PRODUCT_CASES, PRODUCT_SAMPLE,
                          ROW_CASES, ROW_NORM_PRODUCT_CASES, ROW_WRITE_CASES, attention_case,
                          cache_attention_case, cache_rows_case, check_cache_attention,
                          check_cache_rows, check_case, gather_case, parts_case,
                          pointwise_case, product_case, product_tn_case, row_case,
                          attention_grad_case, embedding_grad_case, linear_loss_case,
                          loss_case, norm_grad_case,
                          place_case, moe_case, compile_plan)
from meganeura.runtime.reference import run_reference
from numerics import assert_close


@pytest.mark.parametrize("m", [1, 7, 37])
@pytest.mark.parametrize("op", PRODUCT_CASES)
def test_product_archetype(op, m, tmp_path):
    # every stage a product takes; K = 45 and N = 70 are not multiples of any block size
    model = check_case(product_case(op, m, 45, 70, seed=m), "cpu", torch.float32, tmp_path, "fp32")
    (launch,) = model.launches
    assert launch.spec.archetype == "matmul"


@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
@pytest.mark.parametrize("shape", [(37, 72, 40), (7, 45, 70)], ids=["descriptors", "pointers"])
def test_matmul_reads_weights_stored_transposed(op, shape, tmp_path):
    # a checkpoint's [out, in] weight, read in place (no transposed copy is made)
    model = check_case(product_case(op, *shape, seed=4, transposed=True), "cpu", torch.float32,
                       tmp_path, "fp32")
    spec = model.launches[0].spec
    assert "B-transposed" in spec.variant
    g = model.plan.graph
    assert not any(g[i].op == "transpose" for i in model.tensors)


@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_matmul_reads_a_strided_view(op, tmp_path):
    check_case(product_case(op, 13, 33, 40, seed=3, strided=True), "cpu", torch.float32, tmp_path,
               "fp32")


@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_matmul_through_tensor_descriptors(op, tmp_path):
    # rows of 16-byte multiples: A and B tiles come through tensor descriptors, and the
    # edge tiles (M = 37, N = 40 against 32-wide blocks) are zero-filled by them
    model = check_case(product_case(op, 37, 72, 40, seed=5), "cpu", torch.float32, tmp_path,
                       "fp32")
    spec = model.launches[0].spec
    assert spec.variant.endswith("+tma") and "a_desc.load" in spec.source
    odd = check_case(product_case(op, 37, 45, 70, seed=5), "cpu", torch.float32, tmp_path, "fp32")
    assert "tma" not in odd.launches[0].spec.variant and "a_desc" not in odd.launches[0].spec.source


@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
@pytest.mark.parametrize("shape, sms, grid", [
    # 3 x 3 tiles of 32 x 32 on 4 SMs: 8 in two full waves, the ninth as two halves
    ((67, 72, 80), 4, 10),
    # pointer loads (K = 45), 2 x 3 tiles on 4 SMs: the last wave's 2 tiles as 4 halves, the
    # second half of the last row tile past M (37 rows)
    ((37, 45, 70), 4, 8),
], ids=["descriptors", "pointers"])
def test_last_wave_runs_in_half_height_tiles(op, shape, sms, grid, tmp_path):
    model = check_case(product_case(op, *shape, seed=sms), "cpu", torch.float32, tmp_path, "fp32",
                       sms=sms)
    spec = model.launches[0].spec
    assert "halved-last-wave" in spec.variant and spec.grid == (grid,)
    assert ("+tma" in spec.variant) == (shape[1] == 72)  # the two ways A is read
    # a full last wave keeps whole tiles
    whole = check_case(product_case(op, *shape, seed=sms), "cpu", torch.float32, tmp_path, "fp32",
                       sms=3)
    assert "halved" not in whole.launches[0].spec.variant


@pytest.mark.parametrize("op, widths, parts", [
    # q | k | v: column tiles (32 wide; 8 at one row) never straddle two parts
    ("plain", (64, 32, 40), 3),
    ("rms_norm|", (64, 32, 32), 3),
    # 44 is not a multiple of either tile: one concatenation of the three (no partial w0|w1)
    ("plain", (44, 32, 16), 1),
    ("|glu.pair-gelu_tanh", (40, 40), 2),  # gate | up, each read in place
    ("|glu.pair-silu", (40, 40), 2),
])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [37, 1], ids=["tiled", "one-row"])
def test_matmul_reads_concatenated_weights_in_place(op, widths, parts, transposed, rows,
                                                    tmp_path):
    model = check_case(parts_case(op, rows, 48, widths, seed=rows, transposed=transposed),
                       "cpu", torch.float32, tmp_path, "fp32")
    spec = model.launches[0].spec
    g = model.plan.graph
    kept = [g[i].op for i in model.tensors if i in model.plan.load_time]
    assert ("+matvec" in spec.variant) == (rows == 1)
    if parts > 1:
        assert f"{parts}-part-B" in spec.variant and "concat_cols" not in kept
    else:
        assert "part-B" not in spec.variant and kept == ["concat_cols"]


def _split_k_checks(model, k, case, seed):
    """A K-split product of the cases at N = 280: two slices at K = 45, three at 130; its
    nine column tiles' counters left zeroed, which a second call finds."""
    assert model.launches[0].spec.grid[2] == (2 if k == 45 else 3)
    assert not model._scratches[("matvec_counters", (9,), "i32")].any()
    _fresh_call_matches(model, *case, seed)


def _fresh_call_matches(model, g, w, inputs, seed):
    """A second call of the compiled case with fresh inputs (its output poisoned first)
    matches the reference: what a launch leaves (counters) serves the next."""
    fresh = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) for x in inputs]
    model.outputs[0].fill_(float("nan"))
    (ref,) = run_reference(g, w, dict(zip([n.name for n in g.inputs()], fresh)))
    assert_close(model(*fresh).float(), ref, "fp32")


@pytest.mark.parametrize("k", [30, 45, 130])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_one_row_runs_the_matrix_vector_kernel(op, transposed, k, tmp_path):
    # a decode step's products: K = 45 or 130 and N = 280 leave partial K steps and column
    # tiles (nine of 32 columns); B past one K step (stored [K, N] or [N, K]) is shared
    # among programs in K slices (two of 32 rows at K = 45, three of 64 at 130), whose last
    # program finishes each column tile
    g, w, inputs = product_case(op, 1, k, 280, seed=11, transposed=transposed)
    model = check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")
    spec = model.launches[0].spec
    assert "+matvec" in spec.variant and spec.entry == "matvec_kernel"
    assert ("B-transposed" in spec.variant) == transposed
    assert ("+split-K" in spec.variant) == (k > 32)
    if "+split-K" in spec.variant:
        assert len(model._scratches) == 2  # the slices' partial rows and the tiles' counters
        _split_k_checks(model, k, (g, w, inputs), 98)


@pytest.mark.parametrize("m, k", [(3, 30), (7, 45), (16, 130)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("op", PRODUCT_SAMPLE)
def test_few_rows_run_in_each_program(op, transposed, m, k, tmp_path):
    # a batched decode step's products (up to 16 rows): every program takes all the rows,
    # on the matrix units, and streams its columns of B once; past one K step, K slices
    # (two of 32 rows at K = 45, three at 130) whose last program sums the rows' partials.
    # A norm prologue's paired gate | up stays tiled (faster so on the H100)
    g, w, inputs = product_case(op, m, k, 280, seed=m + k, transposed=transposed)
    model = check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")
    spec = model.launches[0].spec
    if op.startswith("rms_norm|glu.pair"):
        assert "matvec" not in spec.variant and spec.constexprs["BLOCK_M"] == 16
        return
    assert f"+matvec-{m}-rows" in spec.variant and spec.entry == "matvec_kernel"
    assert "tl.dot" in spec.source and spec.grid[:2] == (9, 1)
    assert ("+split-K" in spec.variant) == (k > 32)
    if "+split-K" in spec.variant:
        _split_k_checks(model, k, (g, w, inputs), 97)


@pytest.mark.parametrize("m, k", [(1, 45), (1, 130), (3, 45)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("op", ROW_NORM_PRODUCT_CASES)
def test_product_ends_with_the_rows_post_norm(op, transposed, m, k, tmp_path):
    # N = 280: nine 32-column tiles, the last one partial, counted in three groups of three;
    # the last tile of each row to count normalizes the whole row (several rows: counters
    # each), and leaves the counters zeroed
    g, w, inputs = product_case(op, m, k, 280, seed=k + m, transposed=transposed)
    model = check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")
    spec = model.launches[0].spec
    assert spec.variant.startswith(op.lstrip("|")) and "+matvec" in spec.variant
    assert "+split-K" not in spec.variant and spec.grid == (9, m)  # whole column tiles count
    counters = [buf for (name, _, _), buf in model._scratches.items() if name.endswith("counters")]
    assert spec.constexprs["GROUPS"] == 3 and spec.constexprs["GROUP_TILES"] == 3
    # a counter a cache line: the row's, then its three groups'
    assert len(counters) == 1 and counters[0].shape == (m * 4 * 32,) and not counters[0].any()
    # a second call finds the counters zeroed: its last tiles normalize the new rows
    _fresh_call_matches(model, g, w, inputs, 99)


def test_product_variants_are_generated_from_the_stages(tmp_path):
    norm = check_case(product_case("rms_norm|glu.pair-silu", 37, 45, 70), "cpu", torch.float32,
                      tmp_path, "fp32").launches[0].spec
    plain = check_case(product_case("plain", 37, 45, 70), "cpu", torch.float32, tmp_path,
                       "fp32").launches[0].spec
    assert norm.variant == "rms_norm|glu.pair" and plain.variant == "plain"
    assert "ss +=" in norm.source and "acc_up" in norm.source
    assert "ss +=" not in plain.source and "acc_up" not in plain.source and "r_ptr" not in plain.source


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("head_dim", [16, 24, 132])
@pytest.mark.parametrize("op", ROW_CASES)
def test_row_archetype(op, head_dim, strided, tmp_path):
    check_case(row_case(op, 7, 3, head_dim, seed=head_dim, strided=strided), "cpu", torch.float32,
               tmp_path, "fp32")


@pytest.mark.parametrize("limit", [257, 131072])
@pytest.mark.parametrize("op", ["rope", "head_rms_norm,rope-partial"])
def test_rope_at_far_positions(op, limit, tmp_path):
    # positions up to a long context: the angle in float64, reduced there, cos and sin in
    # fp32, against the reference's [positions, hd/2] table from float64
    g, w, inputs = row_case(op, 9, 2, 24, seed=limit, limit=limit)
    inputs[-1][:4] = torch.tensor([0, 255, 40000 % limit, limit - 1])
    model = check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")
    (freq,) = model._tables.values()  # the one table the kernel reads: hd/2 + 2 float64
    assert freq.dtype == torch.float64 and freq.shape == (24 // 2 + 2,)


def test_rms_norm_on_an_odd_width(tmp_path):
    from meganeura.compiler.graph import Graph
    g = Graph()
    x = g.input_f32("x", (5, 37))
    g.set_outputs([g.rms_norm(x, g.parameter("w", (37,)), 1e-5)])
    case = (g, {"w": torch.rand(37) + 0.5}, [torch.randn(5, 37)])
    check_case(case, "cpu", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("window", [None, 3, 50], ids=["causal", "window3", "window50"])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("head_dim", [16, 24, 132, 144, 512])
def test_attention_archetype(head_dim, gqa, window, tmp_path):
    kv = 2
    check_case(attention_case(37, kv * gqa, kv, head_dim, window, seed=head_dim + gqa), "cpu",
               torch.float32, tmp_path, "fp32")


def test_attention_with_a_given_scale(tmp_path):
    # the published model's scale 1.0 (its q and k are normalized), not 1/sqrt(head_dim)
    model = check_case(attention_case(37, 4, 2, 32, 5, seed=9, scale=1.0), "cpu", torch.float32,
                       tmp_path, "fp32")
    assert model.plan.graph[model.plan.launches[0]].attrs["scale"] == 1.0


@pytest.mark.parametrize("s", [1, 7])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_short_sequences(s, window, tmp_path):
    check_case(attention_case(s, 4, 2, 16, window, seed=s), "cpu", torch.float32, tmp_path, "fp32")


def test_attention_skips_key_blocks_outside_the_window(tmp_path):
    from meganeura.codegen.attention import emit
    src = emit(True, "ieee", 128)
    assert "lo = (tl.maximum(q0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N" in src
    assert "hi = tl.minimum(q0 + BLOCK_M, S)" in src  # nothing past the diagonal
    # three runs: diagonal (masked), inside the mask (no mask), the window's edge (masked)
    runs = src.split("for n0 in range(")[1:]
    assert [r.split(",")[0] for r in runs] == ["q0", "full", "lo"]
    assert "tl.where" in runs[0] and "tl.where" not in runs[1] and "tl.where" in runs[2]
    assert "mask=" not in runs[1]  # a power-of-two head: unmasked loads inside the mask


def test_attention_splits_odd_head_dims_instead_of_doubling(tmp_path):
    from meganeura.codegen.attention import emit
    from meganeura.compiler.cost import head_dim_chunks
    assert head_dim_chunks(144) == (128, 16) and head_dim_chunks(160) == (128, 32)
    assert head_dim_chunks(132) == (256,) and head_dim_chunks(240) == (256,)
    assert head_dim_chunks(128) == (128,) and head_dim_chunks(24) == (32,)
    assert head_dim_chunks(512) == (256, 256)
    src = emit(False, "ieee", 144)
    assert "acc_b" in src and "rd_b = D0 + tl.arange(0, D1)" in src
    assert "acc_b" not in emit(False, "ieee", 128)
    assert "rd_b = D0 + tl.arange(0, D1)" in emit(False, "ieee", 512)


@pytest.mark.parametrize("s", [1, 7, 37])
@pytest.mark.parametrize("op", GATHER_CASES)
def test_gather_archetype(op, s, tmp_path):
    check_case(gather_case(op, s, 61, 45, seed=s), "cpu", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("op", POINTWISE_CASES)
def test_pointwise_archetype(op, tmp_path):
    check_case(pointwise_case(op, 37, 45), "cpu", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("slots, pos", [(20, 6), (100, 0), (100, 40), (100, 99), (100, 257)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 24), (3, 1, 48)])
def test_decode_attention_splits_the_slots(slots, pos, heads, kv_heads, head_dim, tmp_path):
    # on the interpreter a row's keys go to two programs of at least 32 each: 100 slots are
    # 2 programs per kv head (64 keys each; one past a short row's keys returns at once),
    # and a second kernel merges the partials; pos 257 is a ring that has wrapped (every
    # slot valid)
    model = check_cache_attention(cache_attention_case(slots, pos, heads, kv_heads, head_dim,
                                                       seed=pos), "cpu", torch.float32,
                                  tmp_path, "fp32")
    spec = model.launches[0].spec
    chunk = max(32, 1 << (-(-slots // 2) - 1).bit_length())
    assert spec.grid == (1, kv_heads, -(-slots // chunk))
    assert ("split" in spec.variant) == (slots > 32)
    assert [k.entry for k in spec.chain()] == ["decode_attention_kernel"] + (
        ["decode_combine_kernel"] if slots > 32 else [])


@pytest.mark.parametrize("slots, pos, window, sequences", [
    (40, list(range(3, 10)), 0, 1),  # a chunk of 7 rows into a full cache
    (12, list(range(0, 8)), 5, 1),  # a first chunk into a ring of window 5 + reach 8 - 1
    (12, list(range(29, 37)), 5, 1),  # a later chunk, the ring wrapped, positions across it
    (20, list(range(13, 31)), 0, 1),  # 18 rows: two tiles of a chunk, the cache wrapped
    (50, [5, 40, 0], 0, 3),  # a batched step: three sequences, one row each
    (12, [30, 3, 11, 12], 5, 4),  # a batched step over rings
])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 24), (3, 1, 48)])
def test_attention_over_the_cache_of_chunks_and_batches(slots, pos, window, sequences, heads,
                                                        kv_heads, head_dim, tmp_path):
    # each row attends to its own positions (causal, its window) read at their ring slots of
    # its sequence's block; a chunk's rows share a tile, a batch's rows have a tile each
    model = check_cache_attention(cache_attention_case(slots, pos, heads, kv_heads, head_dim,
                                                       seed=len(pos), window=window,
                                                       sequences=sequences),
                                  "cpu", torch.float32, tmp_path, "fp32")
    spec = model.launches[0].spec
    assert ("chunk" in spec.variant) == (sequences == 1)


@pytest.mark.parametrize("s, slots, last, positions", [
    (1, 40, 17, None), (1, 6, 23, None), (7, 40, 6, None), (7, 5, 30, None),
    (3, 5, 11, [2, 10, 11]), (3, 600, 300, [0, 255, 300]), (7, 40, None, "arange"),
    (9, 5, None, "arange")])
@pytest.mark.parametrize("op", ROW_WRITE_CASES)
def test_rows_normalized_into_the_cache(op, s, slots, last, positions, tmp_path):
    # a decode step's row (into a full cache, into a ring that has wrapped) and a prefill's
    # rows (all kept; more than a ring of 5 keeps, the older ones skipped: position 2 is
    # older than the ring of 5 ending at 11 keeps, and its slot 2 must keep its old row);
    # far positions; a forward's positions 0 .. S-1 (their row indices, nothing read), all
    # kept or wrapping a ring of 5
    pos = positions if positions is None or isinstance(positions, str) else torch.tensor(positions)
    model = check_cache_rows(cache_rows_case(op, s, slots, last, 3, 24, seed=s + slots,
                                             positions=pos), "cpu", torch.float32, tmp_path,
                             "fp32")
    spec = model.launches[0].spec
    if op == "copy":  # cache_write alone: the copy kernel, which reads any positions
        assert spec.archetype == "kv_cache"
    else:  # a row kernel's positions: a forward's are the row indices, nothing read
        assert spec.variant.endswith("cache_write")
        assert ("pos_ptr" in spec.source) == (positions != "arange")


@pytest.mark.parametrize("slots, positions", [(6, [3, 17, 0, 5]), (40, [39, 1, 20])])
@pytest.mark.parametrize("op", ROW_WRITE_CASES)
def test_rows_of_a_batched_step_go_into_their_sequences_blocks(op, slots, positions,
                                                               tmp_path):
    # row i at slot pos[i] % slots of block i (rings that wrapped, and not); the other
    # sequences' rows keep their values
    check_cache_rows(cache_rows_case(op, len(positions), slots, None, 3, 24, seed=slots,
                                     positions=torch.tensor(positions),
                                     sequences=len(positions)),
                     "cpu", torch.float32, tmp_path, "fp32")


def _before_the_gate(source: str) -> list[str]:
    """Loads, stores and atomics on the path to each griddepcontrol.wait: walking up from
    it, the lines of its own block and of the blocks that enclose it (not the bodies of
    sibling branches, which another program's path takes)."""
    lines, out = source.split("\n"), []

    def depth(x):
        return len(x) - len(x.lstrip())

    for k, line in enumerate(lines):
        if "gdc_wait" not in line:
            continue
        level = depth(line)
        for x in reversed(lines[:k]):
            if not x.strip() or x.lstrip().startswith("def "):
                continue
            if depth(x) < level:  # the header of the enclosing block
                level = depth(x)
            elif depth(x) > level:  # inside a sibling block
                continue
            if "tl.load" in x or "tl.store" in x or "atomic" in x:
                out.append(x)
    return out


def test_dependent_launches_touch_only_weights_before_the_gate():
    # a decode step's kernels, built for an H200 (no GPU needed to emit them): every one
    # waits for the kernel before it ahead of any write and any read of activations; only
    # weight tiles are asked before the wait
    from meganeura.codegen import Target, kernel_for
    from meganeura.compiler.cost import H200, CostModel
    from meganeura.models import PRESETS, build
    from meganeura.models.kv import Generation
    from meganeura.pipeline import optimize_graph as optimize

    plan, _ = optimize(build(PRESETS["gemma4_e4b"], 1, Generation(512, decode=True)),
                       CostModel(H200, "bf16"))
    target = Target(torch.device("cuda"), torch.bfloat16, sms=132, pdl=True)
    early = 0
    for nid in plan.launches:
        for spec in kernel_for(plan.graph[nid], plan.graph, target).chain():
            assert spec.pdl and "gdc_wait" in spec.source, spec.variant
            for line in _before_the_gate(spec.source):
                assert "tl.store" not in line and "atomic" not in line, (spec.variant, line)
                assert line.split("=")[0].strip() in ("w_next", "u_next") and \
                    "tl.load(b" in line, (spec.variant, line)
                early += 1
    assert early > 0  # the weight-streaming kernels do prefetch


def test_a_product_of_activations_waits_before_reading_b():
    from meganeura.codegen import Target, kernel_for
    from meganeura.compiler.graph import Graph

    g = Graph()
    x, y = g.input_f32("x", (1, 64)), g.input_f32("y", (64, 48))
    out = g.matmul(x, y)
    g.set_outputs([out])
    spec = kernel_for(g[out], g, Target(torch.device("cuda"), torch.bfloat16, sms=132, pdl=True))
    assert "+matvec" in spec.variant and "gdc_wait" in spec.source
    assert _before_the_gate(spec.source) == []


@pytest.mark.parametrize("t, m, n, strided", [(37, 45, 70, False), (5, 16, 33, True),
                                              (70, 9, 40, False)])
def test_reduction_product(t, m, n, strided, tmp_path):
    # dW = dY^T X: rows past T, columns past M and N masked; a strided A read in place
    model = check_case(product_tn_case(t, m, n, seed=t + m, strided=strided), "cpu",
                       torch.float32, tmp_path, "fp32")
    assert model.outputs[0].dtype == torch.float32


@pytest.mark.parametrize("op", ["norm_grad", "unit_norm_grad", "norm_wgrad"])
@pytest.mark.parametrize("s, width, head_dim, strided", [(7, 24, 8, False), (37, 45, 45, True),
                                                         (20, 132, 132, False)])
def test_norm_gradients(op, s, width, head_dim, strided, tmp_path):
    # heads of 8 (a q/k norm), a whole odd row (a row norm) read strided, a wide row
    check_case(norm_grad_case(op, s, width, head_dim, seed=s, strided=strided), "cpu",
               torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_grad"])
@pytest.mark.parametrize("s, v, cap", [(7, 45, 0.0), (5, 200, 0.0), (7, 45, 2.5), (5, 200, 2.5)])
def test_cross_entropy_of_logits_rows(op, s, v, cap, tmp_path):
    # the vocabulary in blocks (200: past the interpreter's 64), rows labelled -100; soft-
    # capped as read (logits up to 3: past the cap, where its derivative is small)
    check_case(loss_case(op, s, v, seed=v, cap=cap), "cpu", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("s, w, start, width", [(7, 5, 4, 12), (20, 130, 0, 300)])
def test_a_block_placed_into_zeros(s, w, start, width, add, tmp_path):
    # into zeros, or added into a sum (slice_cols's gradients of one tensor as they come)
    check_case(place_case(s, w, start, width, seed=s, add=add), "cpu", torch.float32,
               tmp_path, "fp32")


@pytest.mark.parametrize("t, v, d, padding", [(7, 9, 45, -1), (37, 11, 130, 3)])
def test_a_gathers_gradient_adds_rows_into_the_table(t, v, d, padding, tmp_path):
    # repeated ids add up; the padding token's rows add nothing; rows no id names stay 0
    # (the buffer is zeroed before each run: a second run gives the same)
    model = check_case(embedding_grad_case(t, v, d, padding, seed=t), "cpu", torch.float32,
                       tmp_path, "fp32")
    first = model.outputs[0].clone()
    model.run_kernels()
    assert torch.allclose(model.outputs[0], first)


@pytest.mark.parametrize("s, heads, kv_heads, head_dim, window", [
    (37, 4, 2, 16, 0), (37, 4, 2, 16, 5), (20, 3, 1, 24, 0), (9, 2, 2, 32, 4)])
def test_attentions_gradient(s, heads, kv_heads, head_dim, window, tmp_path):
    # causal and windowed, GQA groups of 2, 3 and 1, odd lengths and a padded head width
    check_case(attention_grad_case(s, heads, kv_heads, head_dim, window, seed=s + head_dim),
               "cpu", torch.float32, tmp_path, "fp32")


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_cross_entropy_stats",
                                "linear_cross_entropy_grad_h", "linear_cross_entropy_grad_w",
                                "linear_cross_entropy_dh"])
@pytest.mark.parametrize("t, h, v, cap", [(7, 24, 45, 0.0), (37, 40, 70, 3.0)])
def test_the_lm_head_and_loss_without_logits(op, t, h, v, cap, tmp_path):
    # rows, vocabulary and width past one tile each; a soft-cap that bends
    model = check_case(linear_loss_case(op, t, h, v, cap, seed=t), "cpu", torch.float32,
                       tmp_path, "fp32")
    first = model.outputs[0].clone()  # gradients add into zeros each run
    model.run_kernels()
    assert torch.allclose(model.outputs[0], first)


@pytest.mark.parametrize("t, cap", [(37, 3.0), (33, 0.0)])
def test_the_loss_and_d_rows_chunk_by_chunk(t, cap, tmp_path, monkeypatch):
    # linear_cross_entropy_dh with a logits scratch of one row tile (16 rows on the
    # interpreter): three chunks, the last ragged, each reusing the scratch, d h's products
    # in two shares of the vocabulary
    from meganeura.compiler import cost
    from meganeura.codegen.linear_loss import chunk_rows

    monkeypatch.setattr(cost, "LOGITS_BYTES", 16 * 70 * 4)
    assert chunk_rows(t, 70, 4, 16) == 16
    model = check_case(linear_loss_case("linear_cross_entropy_dh", t, 40, 70, cap, seed=t),
                       "cpu", torch.float32, tmp_path, "fp32")
    assert [s.variant for s in model.specs[model.plan.launches[-1]].chain()].count(
        "dh-logits") == 3
    first = model.outputs[0].clone()
    model.run_kernels()  # the scratch reused: the same bits
    assert torch.equal(model.outputs[0], first)


@pytest.mark.parametrize("tokens", [1, 19])
@pytest.mark.parametrize("op, per_token", [("expert_matmul", True), ("expert_matmul", False),
                                           ("expert_glu", True),
                                           ("expert_matmul_combine", False),
                                           ("expert_matmul_combine", True),
                                           ("expert_combine", True),
                                           ("expert_glu_routed", True),
                                           ("expert_matmul_combine_routed", False)])
def test_expert_products(op, per_token, tokens, tmp_path):
    # one token: a program per pair (or, combined, per token) streams its expert; more: the
    # pairs sorted by expert, one grouped product over every expert's tiles (odd widths,
    # 11 experts of which 19 tokens' 3 pairs leave some unused or shared)
    model = check_case(moe_case(op, tokens, 37, 11, 3, 27, per_token=per_token, seed=tokens),
                       "cpu", torch.float32, tmp_path, "fp32")
    # one token: the weighted sum a program per expert, the other products K in slices;
    # the last program of a column tile sums the partials and leaves its counter zeroed
    variants = [k.variant for spec in model.specs.values() for k in spec.chain()]
    if op != "expert_combine":
        assert any("-split" in v for v in variants) == (tokens == 1), variants
    for (name, _, _), t in model._scratches.items():
        assert not name.endswith("counters") or not t.any(), name


@pytest.mark.parametrize("op, per_token", [("expert_glu", True), ("expert_matmul", False)])
def test_grouped_expert_products_read_weights_through_descriptors(op, per_token, tmp_path):
    # rows of 16 bytes: the weight tiles come through a [experts, rows, K] descriptor; 40
    # output columns past a 32-wide tile (a gate tile reads up's first rows: masked)
    model = check_case(moe_case(op, 21, 48, 9, 3, 40, per_token=per_token, seed=5), "cpu",
                       torch.float32, tmp_path, "fp32")
    assert any(k.entry == "expert_grouped_kernel" and k.variant.endswith("-tma")
               for spec in model.specs.values() for k in spec.chain())


@pytest.mark.parametrize("experts, k", [(13, 3), (5, 5), (130, 8), (4, 1)])
def test_the_router_keeps_the_top_k(experts, k, tmp_path):
    check_case(moe_case("moe_route", 9, 0, experts, k, 0, seed=experts), "cpu", torch.float32,
               tmp_path, "fp32")


def test_router_ties_go_to_the_lower_index(tmp_path):
    # logits of three levels: most rows hold ties across the k-th place; the kernel keeps the
    # lower index, as the stable sort of the formula does
    g, w, inputs = moe_case("moe_route", 16, 0, 10, 4, 0, ties=True, seed=3)
    model = check_case((g, w, inputs), "cpu", torch.float32, tmp_path, "fp32")
    route = model(*inputs)
    p = torch.softmax(inputs[0], dim=-1)
    boundary = 0
    for row, probs in zip(route, p):
        chosen = row[4:].long()
        kth = probs[chosen[-1]]
        tied = (probs == kth).nonzero().squeeze(1)
        expected = tied[tied >= 0][:int((probs[chosen] == kth).sum())]
        assert set(chosen[probs[chosen] == kth].tolist()) == set(expected.tolist())
        boundary += len(tied) > int((probs[chosen] == kth).sum())
    assert boundary >= 8  # most rows have a tie that the k-th place cuts


@pytest.mark.parametrize("op, per_token", [("expert_glu_routed", True),
                                           ("expert_matmul_combine_routed", False)])
def test_routed_expert_kernels_break_ties_as_the_router(op, per_token, tmp_path):
    # each program ranks its token's experts itself: on logits of three levels its k experts
    # and weights are the route's (the lower index first on a tie)
    check_case(moe_case(op, 3, 24, 10, 4, 12, per_token=per_token, ties=True, seed=7), "cpu",
               torch.float32, tmp_path, "fp32")


def test_a_nan_logit_routes_to_no_expert_past_the_last(tmp_path):
    # garbage in (a NaN router logit) is garbage out for that token, but never an index past
    # the experts (which the expert kernels would read weights at); the other rows are right
    from meganeura.runtime.reference import run_reference

    g, w, inputs = moe_case("moe_route", 4, 0, 11, 3, 0, seed=2)
    inputs[0][1, 5] = float("nan")
    model = compile_plan(g, w, "cpu", torch.float32, tmp_path)
    route = model(*inputs).clone()
    assert route[:, 3:].max() < 11 and route[:, 3:].min() >= 0
    (ref,) = run_reference(g, w, {"logits": inputs[0]})
    assert torch.allclose(route[[0, 2, 3]], ref[[0, 2, 3]])


def test_routed_expert_ops_refuse_weights_of_another_expert_count():
    from meganeura.compiler.graph import Graph
    from meganeura.errors import GraphError

    g = Graph()
    x, z = g.input_f32("x", (4, 32)), g.input_f32("z", (4, 16))
    scale, w = g.parameter("s", (16,)), g.parameter("w", (4, 20, 32))
    with pytest.raises(GraphError, match="4 experts' weights for router logits over 16"):
        g.expert_matmul_combine_routed(x, z, scale, w, 2)

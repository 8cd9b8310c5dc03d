"""The benchmark harnesses themselves: the decode floor and one decode run through Triton's
interpreter; the interleaving of the prefill regimes; a Llama prefill row and a Qwen3 decode
row against transformers on tiny configs."""

import csv
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from meganeura.models import PRESETS, LlamaConfig, Qwen3Config  # noqa: E402


@pytest.mark.parametrize("preset, context, ms", [("gemma4_4b", 4096, 2.03), ("gemma4_e4b", 4096, 2.2),
                                                 ("gemma4_31b", 4096, 14.5)])
def test_the_floor_matches_the_published_estimates(preset, context, ms):
    # the decode issue's floors (bytes a step reads at 4.3 TB/s): 2.03, about 2.2, about 14.5 ms
    from decode import BANDWIDTH, floor_bytes

    got = floor_bytes(PRESETS[preset], context, 2) / BANDWIDTH * 1e3
    assert abs(got - ms) / ms < 0.01


def test_the_floor_grows_with_the_cache_read():
    from decode import floor_bytes

    cfg = PRESETS["gemma4_e4b"]
    short, long = floor_bytes(cfg, 512, 2), floor_bytes(cfg, 32768, 2)
    # the 7 full-attention layers (KV-shared ones included: they read their producer's
    # cache) read 32769 - 513 more rows of K and V, 2 kv heads x 512 wide, 2 bytes each; the
    # sliding rings (512 slots) are full at both
    assert long - short == 7 * (32769 - 513) * 2 * (2 * 512) * 2


def test_one_run_writes_its_rows(tmp_path):
    from decode import main

    out = tmp_path / "decode.csv"
    assert main(["--models", "gemma4-small-test", "--contexts", "5", "11", "--steps", "1",
                 "--warmup", "0", "--no-ttft", "--no-compile-time", "--csv", str(out), "--plot", ""]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], r["context"]) for r in rows] == [("gemma4-small-test", "5"),
                                                          ("gemma4-small-test", "11")]
    assert all(float(r["meganeura_ms"]) > 0 and float(r["floor_ms"]) > 0 for r in rows)


def test_prefill_regimes_interleave_the_contenders():
    # from idle: A, B, A, B one call each after the idle time; sustained: a warm-up block
    # each, then blocks of `block` calls, alternating
    from prefill import regimes

    calls = []
    out = regimes({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3,
                  cuda=False, idle_s=0.0, block=2)
    assert calls[:6] == ["a", "b"] * 3
    assert calls[6:10] == ["a", "a", "b", "b"]  # the warm-up blocks
    assert calls[10:] == ["a", "a", "b", "b"] * 3
    assert set(out) == {"a_idle_ms", "b_idle_ms", "a_sustained_ms", "b_sustained_ms"}
    assert all(v >= 0 for v in out.values())


def test_transformers_generate_is_timed_step_by_step():
    # a tiny published config through transformers' own generate loop (dynamic cache, CPU)
    import torch

    from decode import hf_decode, hf_generate_decode
    from hf_checkpoints import CONFIGS
    from hf_forward import hf_model
    from transformers import DynamicCache

    from transformers import Gemma4TextConfig

    hf = hf_model(Gemma4TextConfig(**CONFIGS["every_feature"]), torch.float32, torch.device("cpu"))
    ms = hf_generate_decode(hf, 9, 3, 97, torch.device("cpu"), static=False, warmup=1)
    assert ms > 0
    eager = hf_decode(hf, hf, DynamicCache(config=hf.config), 9, 3, 97, torch.device("cpu"))
    assert eager > 0


# one layer, GQA 4/2, llama3 scaling inside the head, tied; Qwen3's per-head q/k norm, untied
TINY_LLAMA = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_scaling=(8.0, 1.0, 4.0, 16), tie_word_embeddings=True)
TINY_QWEN3 = Qwen3Config(vocab_size=59, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6)


def test_transformers_config_of_a_llama_preset():
    from hf_forward import hf_config

    c = hf_config(PRESETS["llama_3_2_1b"])
    assert (c.model_type, c.hidden_size, c.num_key_value_heads, c.head_dim) == \
        ("llama", 2048, 8, 64)
    assert c.tie_word_embeddings and c.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    q = hf_config(PRESETS["qwen3_8b"])
    assert q.model_type == "qwen3" and not q.tie_word_embeddings and q.intermediate_size == 12288


def test_a_llama_prefill_row_against_transformers(tmp_path):
    import torch
    from prefill import build_parser, run_published

    args = build_parser().parse_args(["--check", "--hf-fp32", "--no-torch-compile", "--warmup",
                                      "0", "--iters", "1", "--kernel-reps", "1", "--cache-dir",
                                      str(tmp_path)])
    args.dtype = "fp32"
    row = run_published(args, "tiny-llama", TINY_LLAMA, 6, torch.device("cpu"), torch.float32)
    assert row["rel_error"] <= 1e-4 and row["rel_error_hf_fp32"] <= 1e-4
    assert row["reference_vs_hf_fp32"] <= 1e-5  # the same model, the same weights
    assert row["meganeura_ms"] > 0 and row["eager_ms"] > 0 and row["launches"] > 0


def test_unit_init_puts_meganeuras_random_weights_in_transformers_model():
    # --init unit: transformers' model holds random_weights(cfg, seed) itself (tied lm_head
    # included), and its fp32 logits are the reference executor's on those weights
    import torch
    from hf_forward import hf_config, hf_logits, hf_model, shared_weights

    from meganeura.models import build
    from meganeura.models.weights import random_weights
    from meganeura.runtime.check import TOLERANCE, relative_error
    from meganeura.runtime.reference import run_reference

    cpu = torch.device("cpu")
    for cfg in (TINY_LLAMA, TINY_QWEN3):
        hf = hf_model(hf_config(cfg), torch.float32, cpu, seed=3, init="unit", cfg=cfg)
        ours = random_weights(cfg, 3)
        shared = shared_weights(hf, cfg)
        assert shared.keys() == ours.keys()
        assert all(torch.equal(shared[n], ours[n]) for n in ours)
        ids = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(5))
        (ref,) = run_reference(build(cfg, 7), ours, {"token_ids": ids}, torch.float32, cpu)
        assert relative_error(hf_logits(hf, ids), ref) <= TOLERANCE["fp32"]
    with pytest.raises(ValueError, match="init 'xavier'"):
        hf_model(hf_config(TINY_LLAMA), torch.float32, cpu, init="xavier", cfg=TINY_LLAMA)


def test_qwen3_decode_against_transformers(tmp_path):
    # decode.py's pieces for a model transformers has: its model on the same weights, the
    # greedy steps' check against its fp32 model, its eager decode timed (a whole row through
    # the interpreter is test_one_run_writes_its_rows')
    import torch
    from decode import check_generation, hf_decode
    from hf_forward import hf_config, hf_model, shared_weights
    from transformers import DynamicCache

    import meganeura

    cpu = torch.device("cpu")
    hf = hf_model(hf_config(TINY_QWEN3), torch.float32, cpu)
    model = meganeura.from_config(TINY_QWEN3, shared_weights(hf, TINY_QWEN3), cpu,
                                  torch.float32, cache_dir=tmp_path)
    q_norm = "model.layers.0.self_attn.q_norm.weight"
    assert torch.equal(model.weights[q_norm], hf.state_dict()[q_norm])
    assert not torch.all(model.weights[q_norm] == 1)  # moved off transformers' ones
    assert check_generation(model, hf, TINY_QWEN3, [5], 2, cpu) <= 1e-4
    assert model.generator.sessions == []  # the check leaves no caches behind
    assert hf_decode(hf, hf, DynamicCache(config=hf.config), 5, 2, 59, cpu) > 0


def test_the_training_benchmark_runs_each_work(tmp_path):
    from train import main

    out = tmp_path / "train.csv"
    # (--breakdown takes an optimizer step, and puts the weights back: the contenders
    # after meganeura share them, and the seed's losses below agree only so)
    assert main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--no-liger",
                 "--breakdown",
                 "--executor", "reference", "--csv", str(out), "--plot", str(tmp_path / "t.png"),
                 "--curve-steps", "3", "--curve-csv", str(tmp_path / "curve.csv"),
                 "--curve-plot", str(tmp_path / "curve.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["work"], r["contender"]) for r in rows] == [
        ("e4b-lora", "meganeura"), ("e4b-lora", "transformers"), ("e2b-full", "meganeura"),
        ("e2b-full", "transformers"), ("4b", "meganeura"), ("4b", "torch eager"),
        ("31b-lora", "meganeura"), ("31b-lora", "transformers"), ("curve", "meganeura"),
        ("curve", "transformers"), ("check", "meganeura vs fp32 autograd"),
        ("check", "bf16 product operands (floor) vs fp32 autograd")]
    assert rows[0]["trained"] == rows[1]["trained"]  # the same adapters on both sides
    assert all(float(r["first_step_s"]) > 0 for r in rows[:8])  # the timed works
    # the seed's work: the same loss of the same weights in meganeura and in plain PyTorch
    ours, theirs = (float(r["note"].split()[1]) for r in rows[4:6])
    assert abs(ours - theirs) < 1e-4 * theirs and float(rows[4]["model_tflop"]) > 0
    # the curve: three steps on the docs' bytes, fp32 on both sides, against transformers fp32
    assert float(rows[8]["max_rel_error"]) < 1e-4 and float(rows[9]["max_rel_error"]) < 1e-4
    curve = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert [r["contender"] for r in curve].count("meganeura") == 3
    assert float(rows[-2]["max_rel_error"]) < 1e-4  # fp32 on the CPU
    # the floor rounds the products' operands: about bf16's half ulp, grown by the layers
    assert 1e-3 < float(rows[-1]["median_rel_error"]) < 3e-2


def test_the_batch_step_benchmark_runs_each_row_count(capsys):
    from decode_batch import main

    assert main(["--model", "gemma4-small-test", "--rows", "1", "3", "--context", "12",
                 "--device", "cpu", "--megakernel", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 rows: " in out and "3 rows: " in out
    # the one-row step as a persistent kernel, checked against the step's own launches
    assert "megakernel, 1 programs" in out and "same bits as the launches" in out


def test_the_chunk_profile_sets_chunks_beside_the_exact_plan(capsys):
    from chunk_profile import main

    assert main(["--model", "gemma4-small-test", "--device", "cpu", "--lengths", "6",
                 "--chunks", "4", "--reps", "1", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    # two chunks of 4 cover the 6 tokens; every launch of both timed and summed by kind
    assert "chunks (start, rows) [(0, 4), (4, 4)]" in out
    assert "decode_attention chunk" in out and "attention causal" in out


def test_the_moe_floor_reads_only_the_chosen_experts():
    # 26B-A4B reads 3.8e9 of its 25.2e9 parameters a token (the chosen 8 of 128 experts, and
    # the tied embedding once as the lm_head), at a context of one token nothing more
    from decode import floor_bytes

    cfg = PRESETS["gemma4_26b_a4b"]
    assert abs(floor_bytes(cfg, 1, 2) / 2 / 3.8e9 - 1) < 0.01
    assert cfg.num_parameters() / 25.2e9 == pytest.approx(1, abs=0.01)


def test_a_preset_cut_to_its_first_layers_keeps_its_widths():
    from hf_forward import cut_layers, hf_config

    cfg = cut_layers(PRESETS["gemma4_26b_a4b"], "gemma4_26b_a4b", 6)
    assert cfg.num_hidden_layers == 6 and cfg.layer_types[-1] == "full_attention"
    assert (cfg.hidden_size, cfg.num_experts, cfg.top_k_experts) == (2816, 128, 8)
    hf = hf_config(cfg, "gemma4_26b_a4b")
    assert hf.num_hidden_layers == 6 and hf.enable_moe_block and hf.num_experts == 128
    e4b = cut_layers(PRESETS["gemma4_e4b"], "gemma4_e4b", 21)
    assert e4b.num_kv_shared_layers == 9  # the same share of the layers as 18 of 42


def test_a_contender_compiling_past_its_limit_is_left_out():
    # train.py's deadline interrupts Python work (torch.compile's is) after its seconds, and
    # marks its alarm fired however torch.compile passes the interruption on
    import torch

    from train import CompileTimeout, deadline

    t0 = time.perf_counter()
    with pytest.raises(CompileTimeout):
        with deadline(1):
            while time.perf_counter() - t0 < 30:
                sum(range(1000))
    assert time.perf_counter() - t0 < 5

    def slow(gm, example_inputs):  # a compile that would take 30 s
        t = time.perf_counter()
        while time.perf_counter() - t < 30:
            sum(range(1000))
        return gm.forward
    t0 = time.perf_counter()
    with deadline(1) as alarm:
        try:
            torch.compile(lambda x: x * 2 + 1, backend=slow)(torch.ones(3))
        except Exception:  # noqa: BLE001 (torch.compile's own wrapping of the alarm)
            pass
    assert alarm.fired and time.perf_counter() - t0 < 5
    with deadline(0) as alarm:  # no limit
        pass
    assert not alarm.fired


def test_the_megakernel_check_compares_with_the_launches_at_its_warps(tmp_path):
    # decode.py --megakernel --check on the interpreter: the persistent kernel, its launches,
    # and its launches with every kernel at the persistent kernel's warps give one answer
    import meganeura
    from configs import CONFIGS
    from decode import megakernel_check

    model = meganeura.from_config(CONFIGS["small_test"], device="cpu", seed=3, cache_dir=tmp_path)
    model.generator.megakernel = 1
    err, same, order, alike = megakernel_check(model, 12, 2)
    assert (err, same, order, alike) == (0.0, True, 0.0, 0.0)

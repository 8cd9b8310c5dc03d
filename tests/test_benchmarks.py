"""The benchmark harnesses themselves: the decode floor and one decode run through Triton's
interpreter; the interleaving of the prefill regimes."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from meganeura.models import PRESETS  # noqa: E402


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
    assert main(["--models", "gemma4-small-test", "--contexts", "5", "11", "--steps", "3",
                 "--no-ttft", "--no-compile-time", "--csv", str(out), "--plot", ""]) == 0
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

    hf = hf_model("", torch.float32, torch.device("cpu"), 0, fields=CONFIGS["every_feature"])
    ms = hf_generate_decode(hf, 9, 3, 97, torch.device("cpu"), static=False, warmup=1)
    assert ms > 0
    eager = hf_decode(hf, hf, DynamicCache(config=hf.config), 9, 3, 97, torch.device("cpu"))
    assert eager > 0

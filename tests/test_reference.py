"""The reference executor against the independent forward in gemma4_forward.py, and the
plain PyTorch forward that benchmarks/ measures against (the same model, too)."""

import sys
from pathlib import Path

import pytest
import torch

from configs import CONFIGS
from gemma4_forward import forward
from meganeura.errors import InputError, WeightsError
from meganeura.models import build
from meganeura.models.weights import random_weights
from meganeura.runtime.reference import run_reference
from numerics import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_forward import make_forward  # noqa: E402


@pytest.mark.parametrize("seq", [1, 7, 37])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_matches_independent_forward(name, seq):
    c = CONFIGS[name]
    w = random_weights(c, seed=seq)
    ids = torch.randint(0, c.vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))
    (logits,) = run_reference(build(c, seq), w, {"token_ids": ids})
    assert logits.shape == (seq, c.vocab_size)
    assert_close(logits, forward(c, w, ids), "fp32-exact")
    for sliding in ("flex", "dense"):  # the benchmark's two forms of sliding-window layers
        assert_close(make_forward(c, seq, "cpu", sliding)(w, ids), logits, "fp32-exact")


def test_windows_shorter_than_the_sequence_are_exercised():
    # seq 37 is past both test windows (8 and 5): the sliding mask really cuts keys off
    assert all(c.sliding_window_size < 37 for c in CONFIGS.values())
    c = CONFIGS["gqa2"]
    w = random_weights(c, seed=3)
    ids = torch.randint(0, c.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    (a,) = run_reference(build(c, 37), w, {"token_ids": ids})
    wide = type(c)(**{**c.__dict__, "sliding_window_size": 64})
    (b,) = run_reference(build(wide, 37), w, {"token_ids": ids})
    assert torch.allclose(a[:5], b[:5], atol=1e-6)  # rows inside the window agree
    assert not torch.allclose(a[10:], b[10:], atol=1e-3)  # later rows see fewer keys


def test_bf16_reference_is_close_to_fp32():
    c = CONFIGS["gqa2"]
    w = random_weights(c, seed=1)
    ids = torch.randint(0, c.vocab_size, (7,), generator=torch.Generator().manual_seed(2))
    g = build(c, 7)
    (ref,) = run_reference(g, w, {"token_ids": ids})
    (out,) = run_reference(g, w, {"token_ids": ids}, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, "bf16")


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([1, 2, 64]), "token id 64, outside \\[0, 64\\)"),
    (torch.tensor([1, -1, 3]), "token id -1"),
    (torch.tensor([1, 2]), "must have shape \\[3\\]"),
    (torch.tensor([1.0, 2.0, 3.0]), "must hold integers"),
    ([1, 2, 3], "must be a torch.Tensor"),
])
def test_bad_token_ids(ids, message):
    c = CONFIGS["small_test"]
    with pytest.raises(InputError, match=message):
        run_reference(build(c, 3), random_weights(c), {"token_ids": ids})


def test_missing_or_misshaped_weight():
    c = CONFIGS["small_test"]
    w = random_weights(c)
    ids = torch.tensor([1, 2, 3])
    del w["lm_head.weight"]
    with pytest.raises(WeightsError, match="'lm_head.weight' is missing"):
        run_reference(build(c, 3), w, {"token_ids": ids})
    w = random_weights(c)
    w["model.norm.weight"] = torch.ones(3)
    with pytest.raises(WeightsError, match="has shape \\[3\\], expected \\[32\\]"):
        run_reference(build(c, 3), w, {"token_ids": ids})


def test_llama3_frequencies_match_transformers():
    # llama3's scaled RoPE frequencies (Llama-3.2-1B's: factor 32), as transformers makes them
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from meganeura.compiler.formulas import inv_freq

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                      max_position_embeddings=131072, rope_parameters=params)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")  # fp32
    ours = inv_freq(500000.0, 64, 32, (32.0, 1.0, 4.0, 8192))
    assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=0)  # theirs: a few fp32 roundings
    # the three bands are all there: kept, scaled by 1/32, and interpolated between
    ratio = ours / inv_freq(500000.0, 64, 32)
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / 32, dtype=torch.float64)).any()
    assert ((ratio > 1 / 32 + 1e-9) & (ratio < 1 - 1e-9)).any()

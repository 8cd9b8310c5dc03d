"""The plain PyTorch forward that benchmarks/ measures against computes the same model."""

import sys
from pathlib import Path

import pytest
import torch

from configs import CONFIGS
from meganeura.models import build
from meganeura.models.weights import random_weights
from meganeura.runtime.reference import run_reference
from numerics import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_forward import make_forward  # noqa: E402


@pytest.mark.parametrize("seq", [1, 7, 37])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_benchmark_forward_matches_reference(name, seq):
    c = CONFIGS[name]
    w = random_weights(c, seed=seq)
    ids = torch.randint(0, c.vocab_size, (seq,), generator=torch.Generator().manual_seed(seq))
    (ref,) = run_reference(build(c, seq), w, {"token_ids": ids})
    assert_close(make_forward(c, seq, "cpu")(w, ids), ref, "fp32-exact")

"""How far a preset's fp32 logits move when its input carries one bf16 rounding: the error
that no bf16 computation on these random weights can go below.

    python benchmarks/bf16_floor.py --models llama-3.1-8b qwen3-8b gemma4-4b --seq-len 2048

The prefill and decode checks hold a bf16 run within 2e-2 of the fp32 reference executor.
A deep model with random weights can amplify rounding far above that; this script measures
by how much. The same graph, weights and token ids as `prefill.py --check` (seed, seq-len):
the fp32 reference's logits against the fp32 reference's logits with every token embedding
scaled by 1 + d, d = +-2^-9 at random per element (a bf16 rounding, half an ulp), the rest
of the forward in fp32. A tied lm_head reads the scaled table too.
"""

from __future__ import annotations

import argparse
import sys

import torch

from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.models.weights import random_weights
from meganeura.runtime.check import relative_error
from meganeura.runtime.reference import run_reference

EMBEDDING = "model.embed_tokens.weight"


def floor(name: str, seq: int, seed: int, device) -> float:
    cfg = PRESETS[MODEL_NAMES[name]]
    graph = build(cfg, seq)
    weights = random_weights(cfg, seed, torch.bfloat16, device)
    gen = torch.Generator(device="cpu").manual_seed(seed + seq)  # prefill.py's token ids
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=gen).to(device)
    (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
    table = weights[EMBEDDING].float()
    sign = torch.randint(0, 2, table.shape, generator=torch.Generator(device=device)
                         .manual_seed(seed), device=device) * 2 - 1
    weights[EMBEDDING] = table * (1 + sign * 2.0 ** -9)
    del table, sign
    (moved,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
    return relative_error(moved, ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, choices=sorted(MODEL_NAMES))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="prefill.py's --seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    for name in a.models:
        err = floor(name, a.seq_len, a.seed, device)
        print(f"{name} seq {a.seq_len}: fp32 logits moved by one bf16 rounding of the "
              f"embeddings: relative error {err:.2e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

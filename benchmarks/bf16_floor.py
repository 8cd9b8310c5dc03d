"""How far a preset's fp32 logits move under bf16 rounding that any bf16 implementation
has: the error below which no bf16 run of these random weights can land.

    python benchmarks/bf16_floor.py --models llama-3.1-8b qwen3-8b gemma4-4b --seq-len 2048

The prefill and decode checks hold a bf16 run within 2e-2 of fp32. How much rounding a
model amplifies depends on its weights; this script measures it on exactly the weights and
token ids of `prefill.py --check` (same seed and sequence length: transformers' own
initialization for the presets transformers has, `random_weights` for the seed's):

- embeddings: the fp32 reference executor's logits against the same forward with every
  token embedding scaled by 1 + d, d = +-2^-9 at random per element (one bf16 rounding,
  half an ulp; a tied lm_head reads the scaled table too);
- product inputs (presets transformers has): transformers' fp32 model against the same
  model with the input of every linear layer rounded to bf16, as a bf16 tensor-core product
  reads it (fp32 accumulation, everything else in fp32);
- beside them, on the same weights and ids: transformers' bf16 model and (--meganeura)
  meganeura's compiled bf16 forward against transformers' fp32 model.

`--init unit` runs the presets transformers has on meganeura's `random_weights` instead
(N(0, 1/fan_in) linear layers; activations keep unit scale at any width). `--layers N` cuts
them to their first N layers. (transformers' experts multiply their stacked weights
without nn.Linear: the product-input floor leaves their inputs in fp32.)
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_forward import INITS, cut_layers, has_transformers
from meganeura.models import MODEL_NAMES, PRESETS, build
from meganeura.models.weights import random_weights
from meganeura.runtime.check import relative_error
from meganeura.runtime.reference import run_reference

EMBEDDING = "model.embed_tokens.weight"


def _weights(name: str, cfg, seed: int, device, init: str):
    """prefill.py's weights: (transformers' model or None, meganeura's weight dict)."""
    if has_transformers(cfg):
        from hf_forward import hf_config, hf_model, shared_weights

        model = hf_model(hf_config(cfg, MODEL_NAMES.get(name)), torch.bfloat16, device, seed,
                         init, cfg)
        return model, shared_weights(model, cfg)
    return None, random_weights(cfg, seed, torch.bfloat16, device)


def embedding_floor(graph, weights: dict, ids, seed: int, device) -> float:
    (ref,) = run_reference(graph, weights, {"token_ids": ids}, torch.float32, device)
    table = weights[EMBEDDING].float()
    sign = torch.randint(0, 2, table.shape, generator=torch.Generator(device=device)
                         .manual_seed(seed), device=device) * 2 - 1
    moved = dict(weights, **{EMBEDDING: table * (1 + sign * 2.0 ** -9)})
    del table, sign
    (out,) = run_reference(graph, moved, {"token_ids": ids}, torch.float32, device)
    return relative_error(out, ref)


def against_fp32(model, ids, compiled=None) -> dict[str, float]:
    """Against transformers' fp32 model: the product-input floor, transformers' bf16 model
    and (given) meganeura's compiled bf16 forward on the same weights and ids."""
    from hf_forward import hf_fp32_copy, hf_logits

    ref_model = hf_fp32_copy(model)
    ref = hf_logits(ref_model, ids).float()
    hooks = [m.register_forward_pre_hook(
        lambda _, args: (args[0].to(torch.bfloat16).float(),) + tuple(args[1:]))
        for m in ref_model.modules() if isinstance(m, torch.nn.Linear)]
    errors = {"bf16 inputs to every product": relative_error(hf_logits(ref_model, ids).float(),
                                                             ref)}
    for h in hooks:
        h.remove()
    del ref_model
    errors["transformers bf16"] = relative_error(hf_logits(model, ids).float(), ref)
    if compiled is not None:
        errors["meganeura bf16"] = relative_error(compiled(ids).float(), ref)
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, choices=sorted(MODEL_NAMES))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="prefill.py's --seed")
    ap.add_argument("--init", choices=INITS, default="transformers", help="prefill.py's --init")
    ap.add_argument("--meganeura", action="store_true", help="also meganeura's compiled bf16 "
                    "forward against transformers' fp32 model (CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="the presets cut to their first "
                    "N layers (prefill.py's --layers)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    for name in a.models:
        cfg = cut_layers(PRESETS[MODEL_NAMES[name]], MODEL_NAMES[name], a.layers)
        model, weights = _weights(name, cfg, a.seed, device, a.init)
        gen = torch.Generator(device="cpu").manual_seed(a.seed + a.seq_len)  # prefill.py's ids
        ids = torch.randint(0, cfg.vocab_size, (a.seq_len,), generator=gen).to(device)
        graph = build(cfg, a.seq_len)
        moved = embedding_floor(graph, weights, ids, a.seed, device)
        init = a.init if model is not None else "unit"
        line = (f"{name} seq {a.seq_len} ({init} init): fp32 logits moved by one bf16 rounding "
                f"of the embeddings {moved:.2e}")
        if model is not None:
            compiled = None
            if a.meganeura:
                import meganeura

                compiled = meganeura.compile(graph, weights, device, torch.bfloat16)
            errors = against_fp32(model, ids, compiled)
            del compiled
            line += "; against transformers' fp32: " + ", ".join(
                f"{k} {v:.2e}" for k, v in errors.items())
        print(line + " (relative error)", flush=True)
        del model, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The published Gemma-4 as transformers runs it: the baseline meganeura is measured against.

`hf_model` builds transformers' Gemma4ForCausalLM of a preset directly on the device in the
plan dtype (sdpa attention, its best working implementation for these models: flex
attention does not compile for their 512-wide heads), with random weights (transformers'
own initialization; norm weights and layer scalars moved off their initial ones, q_norm
and k_norm scaled so that attention is not a coin toss: see `qk_norm_scale`).
`shared_weights` hands meganeura the very same tensors: its graph names and layout are the
checkpoint's, so nothing is copied and both run on identical weights.
"""

from __future__ import annotations

import torch

from meganeura.models import weight_specs
from meganeura.models.gemma4_text import PRESET_FIELDS, qk_norm_scale


def hf_model(preset: str, dtype, device, seed: int = 0, fields: dict | None = None):
    """transformers' Gemma4ForCausalLM of PRESET_FIELDS[preset] (or `fields`), eval mode."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    config = Gemma4TextConfig(**(fields if fields is not None else PRESET_FIELDS[preset]))
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # ones are a degenerate test of norm weights and layer scalars
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layer_scalar")):
                t.add_(0.1 * torch.randn(t.shape, generator=gen, device=device, dtype=t.dtype))
                t.mul_(qk_norm_scale(name, t.shape[0]))
    return model.eval()


def shared_weights(model, config) -> dict[str, torch.Tensor]:
    """The model's own tensors under meganeura's parameter names (no copy)."""
    state = model.state_dict()
    return {name: state[name] for name in weight_specs(config)}


def hf_fp32_copy(model):
    """transformers' model in fp32, as from_pretrained(dtype=float32) would build it: the
    weights upcast, and the embedding scales sqrt(width) in fp32 (a model built in bf16
    holds them rounded to bf16, 50.5 for 50.596, which .float() would keep)."""
    import copy

    ref = copy.deepcopy(model).float()
    for module in ref.modules():
        if hasattr(module, "scalar_embed_scale") and hasattr(module, "embed_scale"):
            module.embed_scale.fill_(module.scalar_embed_scale)
    return ref


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [S, vocab] of one sequence, in the model's dtype."""
    with torch.no_grad():
        return model(input_ids=ids[None], use_cache=False).logits[0]

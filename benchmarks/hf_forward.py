"""The published models as transformers runs them: the baseline meganeura is measured against.

`hf_model` builds transformers' causal LM of a config (Gemma4ForCausalLM, LlamaForCausalLM,
Qwen3ForCausalLM) directly on the device in the plan dtype (sdpa attention, its best working
implementation for these models: flex attention does not compile for Gemma-4's 512-wide
heads), with random weights (transformers' own initialization; norm weights and layer
scalars moved off their initial ones, Gemma-4's q_norm and k_norm scaled so that attention
is not a coin toss: see `qk_norm_scale`). `hf_config` gives transformers' config of a
meganeura config: Llama's and Qwen3's converted field by field, the published Gemma-4's its
preset's transformers fields (PRESET_FIELDS, or its first layers: `cut_layers`). With
`init="unit"` the model holds meganeura's own `random_weights` of the config instead (linear layers N(0, 1/fan_in), the weights the
seed's rows run on): activations keep unit scale at any width, where transformers'
N(0, 0.02^2) grows them at 8B widths (see bf16_floor.py). `shared_weights` hands meganeura the very same
tensors: its graph names and layout are the checkpoint's, so nothing is copied and both run
on identical weights.
"""

from __future__ import annotations

import dataclasses

import torch

from meganeura.models import Gemma4TextConfig, LlamaConfig, Qwen3Config, weight_specs
from meganeura.models.gemma4_text import from_dict as gemma4_from_dict
from meganeura.models.gemma4_text import preset_fields, qk_norm_scale
from meganeura.models.llama import transformers_fields
from meganeura.models.weights import random_weights

# meganeura's config class -> transformers' config class and causal LM, by name
TRANSFORMERS = {Gemma4TextConfig: ("Gemma4TextConfig", "Gemma4ForCausalLM"),
                LlamaConfig: ("LlamaConfig", "LlamaForCausalLM"),
                Qwen3Config: ("Qwen3Config", "Qwen3ForCausalLM")}


def cut_layers(cfg, preset: str, layers: int | None):
    """The preset's config cut to its first `layers` layers (None: as it is): the same widths
    in a model small enough for an fp32 copy beside the bf16 one."""
    if not layers or layers == cfg.num_hidden_layers:
        return cfg
    if isinstance(cfg, Gemma4TextConfig):
        return gemma4_from_dict(preset_fields(preset, layers))
    return dataclasses.replace(cfg, num_hidden_layers=layers)


def has_transformers(cfg) -> bool:
    """transformers has this config's model (the seed's Gemma-4 has none)."""
    return type(cfg) in TRANSFORMERS


def hf_config(cfg, preset: str | None = None):
    """transformers' config of a meganeura config; the published Gemma-4 needs its preset's
    key (its transformers fields are kept, not derived)."""
    import transformers

    if isinstance(cfg, Gemma4TextConfig):  # the preset, or its first layers (cut_layers)
        fields = preset_fields(preset, cfg.num_hidden_layers)
    else:
        fields = transformers_fields(cfg)
    return getattr(transformers, TRANSFORMERS[type(cfg)][0])(**fields)


INITS = ("transformers", "unit")


def hf_model(config, dtype, device, seed: int = 0, init: str = "transformers", cfg=None):
    """transformers' causal LM of `config` (a transformers config, see hf_config), eval mode;
    `init="unit"` loads `random_weights(cfg, seed)` (`cfg`: the meganeura config)."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: one of {', '.join(INITS)}")
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, dict(TRANSFORMERS.values())[type(config).__name__])
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gemma = config.model_type == "gemma4_text"
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # ones are a degenerate test of norm weights and layer scalars
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layer_scalar")):
                t.add_(0.1 * torch.randn(t.shape, generator=gen, device=device, dtype=t.dtype))
                if gemma:  # attention scale 1 on normalized q and k
                    t.mul_(qk_norm_scale(name, t.shape[0]))
        if init == "unit":
            _load(model, random_weights(cfg, seed, torch.float32, device))
    return model.eval()


def _load(model, weights: dict[str, torch.Tensor]) -> None:
    """Copies graph-layout weights (the checkpoint's names and layout) into the model."""
    state = model.state_dict()
    for name, w in weights.items():
        if state[name].shape != w.shape:
            raise ValueError(f"{name}: {list(w.shape)} for a {list(state[name].shape)} tensor")
        state[name].copy_(w)


def shared_weights(model, config) -> dict[str, torch.Tensor]:
    """The model's own tensors under meganeura's parameter names (no copy)."""
    state = model.state_dict()
    return {name: state[name] for name in weight_specs(config)}


def hf_fp32_copy(model):
    """transformers' model in fp32, as from_pretrained(dtype=float32) would build it: the
    weights upcast, and Gemma-4's embedding scales sqrt(width) in fp32 (a model built in bf16
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


class _RoundedGrad(torch.autograd.Function):
    """The identity, whose gradient is rounded to bf16 (kept in its dtype)."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy.to(torch.bfloat16).to(dy.dtype)


def bf16_floor_gradients(model, ids: torch.Tensor, round_weights: bool = False):
    """(loss, {name: grad}) of an fp32 transformers model on ids [B, S] (labels = ids) with
    only what a bf16 tensor-core product must round: every linear layer's input and the
    gradient it receives rounded to bf16, everything else fp32 (attention's products, every
    activation, the sums). round_weights: every weight rounded to bf16 first (for weights
    that are not bf16 values, as a bf16 model of them holds them). No bf16 implementation
    of these weights can be expected closer than about this; the model is left as it was
    (its .grad fields emptied)."""
    saved = {}
    if round_weights:
        with torch.no_grad():
            for n, p in model.named_parameters():
                saved[n] = p.detach().clone()
                p.copy_(p.to(torch.bfloat16).to(p.dtype))

    def pre(module, args):
        return (args[0].to(torch.bfloat16).to(args[0].dtype),) + tuple(args[1:])

    def post(module, args, out):
        return _RoundedGrad.apply(out)
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        for p in model.parameters():
            p.grad = None
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n], p.grad = p.grad, None
    return loss.item(), grads

"""meganeura: an e-graph compiler that turns transformer graphs into fused Triton kernels."""

__version__ = "0.1.0"


def compile(graph, weights, device=None, dtype=None, profile=None, cache_dir=None,
            cuda_graph=True, debug=None):
    """Optimizes `graph` and returns a compiled callable: `logits = fn(token_ids)`, with
    `fn.report`.

    weights: parameter name -> tensor in graph layout. device: "cuda" or "cpu" (default: cuda
    when available); on the CPU the kernels run through Triton's interpreter
    (TRITON_INTERPRET=1 must be set before triton loads). dtype: torch.bfloat16 or
    torch.float32 (default: bf16 on cuda, fp32 on cpu). profile: the DeviceProfile (or its
    name) the extractor prices kernels with. cache_dir: where kernel sources are cached
    (default: ~/.cache/meganeura/kernels). debug: pipeline stages to print, a set or a
    comma-separated string of egraph, plan, kernels, timing.
    """
    from .pipeline import compile_graph, setup

    return compile_graph(graph, weights, setup(device, dtype, profile, cache_dir, debug),
                         cuda_graph)


def from_pretrained(path, device=None, dtype=None, cache_dir=None, profile=None, debug=None):
    """Loads a checkpoint directory as a model object; see meganeura.inference.pretrained."""
    from .inference.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, device, dtype, cache_dir, profile, debug)


def from_config(config, weights=None, device=None, dtype=None, cache_dir=None, profile=None,
                seed=0, debug=None):
    """A model object for a config and weights (random ones by default); see
    meganeura.inference.pretrained.from_config."""
    from .inference.pretrained import from_config as _from_config

    return _from_config(config, weights, device, dtype, cache_dir, profile, seed, debug)


def __getattr__(name):
    """meganeura.Trainer and meganeura.LoRA (meganeura.training), imported on first use."""
    if name in ("Trainer", "LoRA"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'meganeura' has no attribute {name!r}")

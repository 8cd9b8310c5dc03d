"""meganeura: an e-graph compiler that turns transformer graphs into fused Triton kernels."""

__version__ = "0.1.0"


def compile(graph, weights, device=None, dtype=None, profile=None, cache_dir=None,
            cuda_graph=True):
    """Optimizes `graph` and returns a compiled callable; see meganeura.api.compile."""
    from .api import compile as _compile

    return _compile(graph, weights, device, dtype, profile, cache_dir, cuda_graph)


def from_pretrained(path, device=None, dtype=None, cache_dir=None, profile=None):
    """Loads a checkpoint directory as a model object; see meganeura.pretrained.from_pretrained."""
    from .pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, device, dtype, cache_dir, profile)


def from_config(config, weights=None, device=None, dtype=None, cache_dir=None, profile=None,
                seed=0):
    """A model object for a config and weights (random ones by default); see
    meganeura.pretrained.from_config."""
    from .pretrained import from_config as _from_config

    return _from_config(config, weights, device, dtype, cache_dir, profile, seed)

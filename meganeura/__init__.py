"""meganeura: an e-graph compiler that turns transformer graphs into fused Triton kernels."""

__version__ = "0.1.0"

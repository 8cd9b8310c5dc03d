import os

import pytest
import torch


def pytest_configure(config):
    # Kernels tested on the CPU run through Triton's interpreter, which must be chosen
    # before triton is imported (the Makefile sets it too). On a CUDA machine, run the
    # CUDA tests without it: python3 -m pytest -m cuda tests/test_gpu.py
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, with TRITON_INTERPRET unset")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

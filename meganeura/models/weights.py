"""Weights in the Hugging Face safetensors layout, and deterministic random weights.

A checkpoint is a `.safetensors` file, or a directory holding one
(`model.safetensors`) or shards listed in `model.safetensors.index.json`.
Linear weights are stored [out, in] and transposed to the graph's [in, out] on
load. Headers are parsed here (8-byte little-endian length, then JSON) so that
names and shapes are checked without reading any tensor; data is read through
safetensors (never pickle).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from .gemma4 import Gemma4Config, transposed_weight_names, weight_names, weight_shapes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Names, dtypes and shapes of a safetensors file, checked against its size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{file}: corrupt safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise WeightsError(f"{file}: corrupt safetensors file (header length {n} "
                                   f"exceeds file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"cannot read weights file {file}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{file}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: corrupt safetensors file (header is not a JSON object)")
    out = {}
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expect = _ITEMSIZE[dtype] * int(torch.Size(shape).numel())
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{file}: corrupt safetensors entry for '{name}'") from None
        if not (0 <= begin <= end <= data_size) or end - begin != expect:
            raise WeightsError(f"{file}: tensor '{name}' lies outside the file or has the wrong "
                               f"byte count (file truncated or corrupt)")
        out[name] = StoredTensor(file, dtype, shape)
    return out


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint path (file, directory, or sharded directory)."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            try:
                index = json.loads((p / INDEX_NAME).read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise WeightsError(f"{p / INDEX_NAME}: not a valid shard index") from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise WeightsError(f"{p / INDEX_NAME} names shard {missing[0]}, which is missing")
            return [p / s for s in shards]
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        raise WeightsError(f"{p}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")
    if not p.exists():
        raise WeightsError(f"weights path {p} does not exist")
    return [p]


def check_weights(path: str | Path, config: Gemma4Config) -> dict[str, StoredTensor]:
    """Reads only headers; raises WeightsError for a missing or misshaped tensor."""
    stored: dict[str, StoredTensor] = {}
    for f in checkpoint_files(path):
        stored.update(read_header(f))
    transposed = set(transposed_weight_names(config))
    shapes = weight_shapes(config)
    for name in weight_names(config):
        if name not in stored:
            raise WeightsError(f"weight '{name}' is missing from {path}")
        want = shapes[name][::-1] if name in transposed else shapes[name]
        got = stored[name].shape
        if got != want:
            layout = " (HF layout [out, in])" if name in transposed else ""
            raise WeightsError(f"weight '{name}' has shape {list(got)} in {path}, "
                               f"expected {list(want)}{layout}")
        if stored[name].dtype not in _DTYPES:
            raise WeightsError(f"weight '{name}' has dtype {stored[name].dtype}, expected a float")
    return stored


def load_weights(path: str | Path, config: Gemma4Config, dtype=torch.float32,
                 device="cpu") -> dict[str, torch.Tensor]:
    """Loads every weight of `config` in graph layout ([in, out]), cast to `dtype`."""
    from safetensors import SafetensorError, safe_open

    stored = check_weights(path, config)
    transposed = set(transposed_weight_names(config))
    by_file: dict[Path, list[str]] = {}
    for name in weight_names(config):
        by_file.setdefault(stored[name].file, []).append(name)
    out = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    t = t.T if name in transposed else t
                    out[name] = t.to(device=device, dtype=dtype).contiguous()
        except SafetensorError as e:
            raise WeightsError(f"{file}: corrupt safetensors file ({e})") from None
    return out


def random_weights(config: Gemma4Config, seed: int = 0, dtype=torch.float32,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights in graph layout: the same seed and device give the same values.

    Embedding ~ N(0, 1); a linear [in, out] ~ N(0, 1/in); norm weights ~ 1 + N(0, 0.1^2),
    so activations stay O(1) through any depth.
    """
    out = {}
    for i, (name, shape) in enumerate(weight_shapes(config).items()):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) == 1:
            t = 1.0 + 0.1 * t
        elif name != "model.embed_tokens.weight":
            t = t / shape[0] ** 0.5
        out[name] = t.to(dtype)
    return out


def save_weights(weights: dict[str, torch.Tensor], config: Gemma4Config, path: str | Path) -> None:
    """Writes graph-layout weights as one HF-layout safetensors file, atomically."""
    from safetensors.torch import save_file

    transposed = set(transposed_weight_names(config))
    tensors = {n: (weights[n].T if n in transposed else weights[n]).contiguous().cpu()
               for n in weight_names(config)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_random_weights(config: Gemma4Config, path: str | Path, seed: int = 0,
                        dtype=torch.float32) -> None:
    """Writes `random_weights(config, seed)` in the HF layout, for tests and demos."""
    save_weights(random_weights(config, seed, dtype), config, path)

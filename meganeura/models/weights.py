"""Weights in the Hugging Face safetensors layout, and deterministic random weights.

A checkpoint is a `.safetensors` file, or a directory holding one
(`model.safetensors`) or shards listed in `model.safetensors.index.json`. Each family
says how its parameters are stored (`WeightSpec`): the seed's linear weights are stored
[out, in] and transposed to the graph's [in, out] on load; the other families' graphs
(published Gemma-4, Llama, Qwen3) read them as stored. Names in a file may carry a prefix
(`model.language_model.` in the multimodal layout). Headers are parsed here (8-byte
little-endian length, then JSON) so that names and shapes are checked without reading any
tensor; data is read through safetensors (never pickle). Only regular files inside the
checkpoint are read.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from .registry import family, weight_specs

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header
MAX_INDEX = 50_000_000  # bytes of a shard index
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def regular_file(path: Path, what: str) -> int:
    """The size of `path`, which must be a regular file (not a FIFO, device or directory)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise WeightsError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{what} {path} is not a regular file")
    return st.st_size


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Names, dtypes and shapes of a safetensors file, checked against its size."""
    size = regular_file(file, "weights file")
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{file}: corrupt safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER:
                raise WeightsError(f"{file}: corrupt safetensors file (the header length it "
                                   f"starts with does not fit its {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"cannot read weights file {file}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
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
            if not all(isinstance(d, int) and d >= 0 for d in shape + (begin, end)):
                raise ValueError
            expect = _ITEMSIZE[dtype] * int(torch.Size(shape).numel())
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError):
            raise WeightsError(f"{file}: corrupt safetensors entry for '{name}'") from None
        if not (0 <= begin <= end <= data_size) or end - begin != expect:
            raise WeightsError(f"{file}: tensor '{name}' lies outside the file or has the wrong "
                               f"byte count (file truncated or corrupt)")
        out[name] = StoredTensor(file, dtype, shape)
    return out


def probe(path, what: str = "checkpoint") -> str | None:
    """"dir", "file" (anything else that exists) or None (nothing there); a path that cannot
    be looked at (no permission, a name too long) raises WeightsError naming why."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise WeightsError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def inside(f: Path, directory: Path) -> bool:
    """Whether f, links followed, lies in `directory` or, for a snapshot of the Hugging Face
    cache (<repo>/snapshots/<revision>/, whose files link into <repo>/blobs/), its blobs."""
    target = f.resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    return any(target.parent == r for r in roots)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint path (file, directory, or sharded directory);
    every shard an index names must be a regular file inside the directory."""
    p = Path(path)
    kind = probe(p, "weights path")
    if kind == "dir":
        index_path = p / INDEX_NAME
        if probe(index_path, "shard index") is not None:
            return _shards(p, index_path)
        if probe(p / SINGLE_NAME, "weights file") is not None:
            regular_file(p / SINGLE_NAME, "weights file")
            if not inside(p / SINGLE_NAME, p):
                raise WeightsError(f"{p / SINGLE_NAME} links outside {p}")
            return [p / SINGLE_NAME]
        raise WeightsError(f"{p}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")
    if kind is None:
        raise WeightsError(f"weights path {p} does not exist")
    regular_file(p, "weights file")
    return [p]


def _shards(directory: Path, index_path: Path) -> list[Path]:
    if regular_file(index_path, "shard index") > MAX_INDEX:
        raise WeightsError(f"{index_path}: shard index larger than {MAX_INDEX} bytes")
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        names = set(weight_map.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError, RecursionError):
        raise WeightsError(f"{index_path}: not a valid shard index") from None
    if not all(isinstance(s, str) and s for s in names):
        raise WeightsError(f"{index_path}: weight_map values must be shard file names")
    files = []
    for shard in sorted(names):
        f = directory / shard
        if Path(shard).name != shard or shard in (".", "..") or not inside(f, directory):
            raise WeightsError(f"{index_path} names shard {shard!r}, which is not a file inside "
                               f"{directory}")
        if probe(f, "weights file") is None:
            raise WeightsError(f"{index_path} names shard {shard}, which is missing")
        regular_file(f, "weights file")
        files.append(f)
    return files


def check_weights(path: str | Path, config, rename=None) -> dict[str, StoredTensor]:
    """Reads only headers; raises WeightsError for a missing or misshaped tensor. Returns the
    stored tensors by parameter name. rename: parameter name -> name in the files (the
    multimodal layout's `model.language_model.` prefix), default the name itself."""
    stored: dict[str, StoredTensor] = {}
    for f in checkpoint_files(path):
        stored.update(read_header(f))
    out = {}
    for name, spec in weight_specs(config).items():
        key = rename(name) if rename else name
        if key not in stored:
            raise WeightsError(f"weight '{key}' is missing from {path}")
        got = stored[key].shape
        if got != spec.stored_shape:
            layout = " (HF layout [out, in])" if spec.transposed else ""
            raise WeightsError(f"weight '{key}' has shape {list(got)} in {path}, "
                               f"expected {list(spec.stored_shape)}{layout}")
        if stored[key].dtype not in _DTYPES:
            raise WeightsError(f"weight '{key}' has dtype {stored[key].dtype}, expected a float")
        out[name] = stored[key]
    return out


def load_weights(path: str | Path, config, dtype=torch.float32, device="cpu",
                 rename=None) -> dict[str, torch.Tensor]:
    """Loads every weight of `config` in graph layout, cast to `dtype`, onto `device`."""
    from safetensors import SafetensorError, safe_open

    stored = check_weights(path, config, rename)
    specs = weight_specs(config)
    by_file: dict[Path, list[str]] = {}
    for name in specs:
        by_file.setdefault(stored[name].file, []).append(name)
    out = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(rename(name) if rename else name)
                    t = t.T if specs[name].transposed else t
                    out[name] = t.to(device=device, dtype=dtype).contiguous()
        except SafetensorError as e:
            raise WeightsError(f"{file}: corrupt safetensors file ({e})") from None
    return out


def random_weights(config, seed: int = 0, dtype=torch.float32,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights of `config`'s family, in graph layout (see the family's
    `random_weights` for the distributions)."""
    return family(config).random_weights(config, seed, dtype, device)


def save_weights(weights: dict[str, torch.Tensor], config, path: str | Path,
                 rename=None) -> None:
    """Writes graph-layout weights as one HF-layout safetensors file, atomically."""
    from safetensors.torch import save_file

    specs = weight_specs(config)
    tensors = {(rename(n) if rename else n): (weights[n].T if s.transposed else weights[n])
               .contiguous().cpu() for n, s in specs.items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_random_weights(config, path: str | Path, seed: int = 0, dtype=torch.float32) -> None:
    """Writes `random_weights(config, seed)` in the HF layout, for tests and demos."""
    save_weights(random_weights(config, seed, dtype), config, path)

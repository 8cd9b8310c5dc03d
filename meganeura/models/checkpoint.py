"""Checkpoint directories: the config, the family that reads it, the names of its weights.

A directory in the Hugging Face layout holds `config.json`, `model.safetensors` (or
shards and their index) and, for generation, `generation_config.json` and
`tokenizer.json`. Its `config.json`'s `model_type` picks the family (registry.FAMILIES),
and the family reads it into a config and says where the weights sit in the files
(`family.Layout`: the multimodal Gemma-4 nests its text weights under
`model.language_model.`); without a `model_type`, the seed's field names are read.
Everything else sees a config and a function from parameter names to the names in the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, WeightsError
from .registry import read_config
from .weights import probe, regular_file

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
MAX_JSON = 10_000_000  # bytes of a config file


@dataclass
class Checkpoint:
    path: Path | None  # the directory (None: a config file alone)
    config: object  # a config of one of registry.FAMILIES
    layout: str  # "gemma4_text" | "gemma4" | "seed" | "llama" | "qwen3"
    rename: Callable[[str], str] | None = None  # parameter name -> name in the files
    notes: list[str] = field(default_factory=list)  # what was read and what was skipped
    eos_token_ids: tuple[int, ...] = ()


def read_json(path: Path, what: str) -> object:
    """A small JSON file: a regular file, bounded in size, UTF-8, not nested without end."""
    if regular_file(path, what) > MAX_JSON:
        raise ConfigError(f"{what} {path} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def is_checkpoint_dir(path) -> bool:
    return probe(path) == "dir" and probe(Path(path) / CONFIG_NAME) is not None


def hub_cache() -> Path:
    """The local Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def looks_like_model_id(path) -> bool:
    """"org/name" (as the Hugging Face hub names models), not a path that exists."""
    text = str(path)
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and probe(text) is None)


def resolve(path) -> Path:
    """A checkpoint directory: `path` itself, or a model id's snapshot in the local Hugging
    Face cache, found offline with huggingface_hub (nothing is downloaded)."""
    if not looks_like_model_id(path):
        return Path(path)
    cache = hub_cache()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover (tokenizers brings it)
        raise WeightsError(f"{path} is not a directory, and reading a model id from the "
                           f"Hugging Face cache needs huggingface_hub") from None
    try:
        return Path(snapshot_download(str(path), cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        why = str(e).splitlines()[0][:120] if not isinstance(e, LocalEntryNotFoundError) else ""
        raise WeightsError(f"{path} is neither a directory nor a model in the Hugging Face cache "
                           f"{cache} (nothing is downloaded: fetch it with `hf download {path}`)"
                           + (f": {why}" if why else "")) from None


def open_checkpoint(path) -> Checkpoint:
    """Reads config.json (and generation_config.json if present); no tensor is read. `path`
    is a directory or a model id in the local Hugging Face cache (see resolve)."""
    p = resolve(path)
    kind = probe(p)
    if kind != "dir":
        raise WeightsError(f"{p} is not a checkpoint directory (config.json and safetensors "
                           f"files)" if kind else f"checkpoint {p} does not exist")
    if probe(p / CONFIG_NAME) is None:
        raise ConfigError(f"{p}: no {CONFIG_NAME} in this directory")
    d = read_json(p / CONFIG_NAME, "config")
    ck = config_of(d, p / CONFIG_NAME)
    ck.path = p
    ck.eos_token_ids = _eos_ids(p, d)
    return ck


def config_of(d, source) -> Checkpoint:
    """The family, config and weight names a config.json's object describes."""
    layout = read_config(d, source)
    return Checkpoint(None, layout.config, layout.name, layout.rename, list(layout.notes))


def _eos_ids(p: Path, d: dict) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's, else config.json's (text or top level)."""
    sources = []
    if probe(p / GENERATION_CONFIG_NAME) is not None:
        gen = read_json(p / GENERATION_CONFIG_NAME, "generation config")
        if isinstance(gen, dict):
            sources.append(gen)
    sources += [d, d.get("text_config") or {}]
    for s in sources:
        eos = s.get("eos_token_id") if isinstance(s, dict) else None
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2 ** 63 for i in ids):
            raise ConfigError(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        return tuple(ids)
    return ()


# files of a checkpoint directory that describe the model beside its weights, copied as they are
SIDE_FILES = (GENERATION_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def save_checkpoint(directory, config, weights: dict, checkpoint: Checkpoint | None = None,
                    overwrite: bool = False) -> Path:
    """Writes a checkpoint directory transformers (and from_pretrained) loads: config.json
    (the one the model was read from, or the family's `to_dict`), model.safetensors with the
    weights in the checkpoint layout, and the read checkpoint's generation config and
    tokenizer files. Everything is written into a temporary directory beside `directory`
    and moved into place at the end: a failure leaves nothing half-written, and a directory
    that holds anything is replaced only with overwrite=True."""
    import shutil
    import tempfile

    from .registry import family
    from .weights import save_weights

    out = Path(directory)
    kind = probe(out, "output directory")
    if kind == "file":
        raise ConfigError(f"{out} exists and is not a directory")
    if kind == "dir" and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty: pass overwrite=True to replace what it holds")
    if checkpoint is not None and checkpoint.layout == "gemma4":
        raise ConfigError("this model was read from a multimodal Gemma-4 checkpoint, whose "
                          "vision and audio towers were not loaded: saving its text decoder "
                          "alone is not supported yet")
    if checkpoint is not None and checkpoint.path is not None:
        d = read_json(checkpoint.path / CONFIG_NAME, "config")
    else:
        d = family(config).to_dict(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")
        save_weights(weights, config, tmp / "model.safetensors",
                     checkpoint.rename if checkpoint is not None else None)
        if checkpoint is not None and checkpoint.path is not None:
            for name in SIDE_FILES:
                if probe(checkpoint.path / name) == "file":
                    shutil.copyfile(checkpoint.path / name, tmp / name)
        if kind == "dir":
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out

"""Checkpoint directories: which family, which config, which weight names.

A directory in the Hugging Face layout holds `config.json`, `model.safetensors` (or
shards and their index) and, for generation, `generation_config.json` and
`tokenizer.json`. Its `config.json` decides the family:

- `model_type: gemma4_text` (Gemma4ForCausalLM): the published decoder, weights `model.*`;
- `model_type: gemma4` (Gemma4ForConditionalGeneration): `text_config` nested, the text
  weights under `model.language_model.*`; the vision and audio towers are not loaded;
- no `model_type`, the seed's field names: the seed's model (as `--config` reads them).

This is the one place that knows those layouts; everything else sees a config and a
function from parameter names to the names in the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, WeightsError
from . import gemma4 as seed
from . import gemma4_text as published
from .weights import regular_file

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
MAX_JSON = 10_000_000  # bytes of a config file


@dataclass
class Checkpoint:
    path: Path | None  # the directory (None: a config file alone)
    config: object  # seed.Gemma4Config | published.Gemma4TextConfig
    layout: str  # "gemma4_text" | "gemma4" | "seed"
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


def is_checkpoint_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).exists()


def _nested(name: str) -> str:
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def open_checkpoint(path) -> Checkpoint:
    """Reads config.json (and generation_config.json if present); no tensor is read."""
    p = Path(path)
    if not p.is_dir():
        raise WeightsError(f"{p} is not a checkpoint directory (config.json and safetensors "
                           f"files)" if p.exists() else f"checkpoint {p} does not exist")
    if not (p / CONFIG_NAME).exists():
        raise ConfigError(f"{p}: no {CONFIG_NAME} in this directory")
    d = read_json(p / CONFIG_NAME, "config")
    ck = config_of(d, p / CONFIG_NAME)
    ck.path = p
    ck.eos_token_ids = _eos_ids(p, d)
    return ck


def config_of(d, source) -> Checkpoint:
    """The family, config and weight names a config.json's object describes."""
    if not isinstance(d, dict):
        raise ConfigError(f"config {source} must be a JSON object")
    kind = d.get("model_type")
    if kind == "gemma4_text":
        ck = Checkpoint(None, published.from_dict(d), "gemma4_text")
        ck.notes.append("Gemma-4 text decoder (gemma4_text)")
    elif kind == "gemma4":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config {source}: model_type gemma4 needs a text_config object")
        # the multimodal model ties its lm_head by its own (top-level) flag, as transformers does
        text = {**text, "tie_word_embeddings": d.get("tie_word_embeddings", True)}
        ck = Checkpoint(None, published.from_dict(text), "gemma4", _nested)
        towers = [t for t in ("vision", "audio") if d.get(f"{t}_config")]
        ck.notes.append("Gemma-4 multimodal checkpoint (gemma4): its text decoder is loaded"
                        + (f"; the {' and '.join(towers)} tower{'s' * (len(towers) > 1)} "
                           f"{'are' if len(towers) > 1 else 'is'} skipped" if towers else ""))
    elif kind is None:
        ck = Checkpoint(None, seed.config_from_dict(d), "seed")
        ck.notes.append("the seed's Gemma-4 (seed field names)")
    else:
        raise ConfigError(f"config {source}: model_type {kind!r} is not supported "
                          f"(gemma4_text, gemma4, or the seed's fields without model_type)")
    return ck


def _eos_ids(p: Path, d: dict) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's, else config.json's (text or top level)."""
    sources = []
    if (p / GENERATION_CONFIG_NAME).exists():
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

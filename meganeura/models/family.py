"""What a model family is: one module exporting one `Family`, listed in `registry.FAMILIES`.

    FAMILY = Family(name="Llama", config=LlamaConfig, from_dict=from_dict,
                    layouts={"llama": plain_layout(from_dict, "llama", "Llama (llama)")},
                    presets=PRESETS, build=build, weight_specs=weight_specs,
                    random_weights=random_weights, summary=summary, to_dict=to_dict)

Everything the rest of meganeura knows about a family comes through these members: the
command line's `--model` choices and summary line, `from_pretrained`'s reading of a
checkpoint directory (by its `config.json`'s `model_type`), the graph, the weights' names
and layouts, the config.json `save_pretrained` writes. Nothing else names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class Preset:
    """A published shape of a family: its name on the command line, its key in
    `models.PRESETS`, its config (random weights unless a checkpoint is loaded)."""

    name: str  # --model NAME, e.g. "llama-3.2-1b"
    key: str  # PRESETS[key], e.g. "llama_3_2_1b"
    config: object


@dataclass(frozen=True)
class Layout:
    """A config.json object read by a family: the config, and where its weights sit in the files."""

    config: object
    name: str  # which layout: "llama", "gemma4_text", "gemma4" (multimodal), "seed"
    rename: Callable[[str], str] | None = None  # parameter name -> name in the files (None: same)
    notes: tuple[str, ...] = ()  # what was read and what was skipped, a line each


@dataclass(frozen=True)
class Family:
    """The protocol every model family implements, one member per thing the pipeline asks of it."""

    #: the family in words, as the command line prints it ("Llama")
    name: str
    #: its config class: `registry.family(config)` looks a config's exact type up
    config: type
    #: transformers' config.json fields -> a validated config (a ConfigError names the field)
    from_dict: Callable[[dict], object]
    #: config.json `model_type` -> reader of (its object, its path) (None: no model_type)
    layouts: Mapping[str | None, Callable[[dict, str], Layout]]
    #: the published shapes the command line offers, random weights
    presets: tuple[Preset, ...]
    #: (config, seq_len, generation=None) -> Graph (generation: see models/kv.py)
    build: Callable
    #: config -> {parameter name: WeightSpec} in graph order, listed from the config alone
    weight_specs: Callable
    #: (config, seed=0, dtype=fp32, device="cpu") -> {name: tensor}, deterministic
    random_weights: Callable
    #: config -> the command line's one-line description of the model
    summary: Callable[[object], str]
    #: config -> its config.json object (model_type included), as `save_pretrained` writes
    #: it for a model not read from a checkpoint; ConfigError where the family cannot
    to_dict: Callable[[object], dict]
    #: the keys of layouts
    model_types: tuple = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "model_types", tuple(self.layouts))


def plain_layout(from_dict: Callable[[dict], object], name: str, note: str):
    """The reader of a config.json whose weights sit under the parameters' own names."""

    def read(d: dict, source: str) -> Layout:
        return Layout(from_dict(d), name, None, (note,))

    return read

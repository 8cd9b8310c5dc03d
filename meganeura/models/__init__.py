"""Model definitions: one module per family, all of them in registry.FAMILIES."""

from .family import Family, Layout, Preset
from .gemma4 import (Gemma4Config, build_graph, config_from_dict, load_config,
                     transposed_weight_names, weight_names, weight_shapes)
from .gemma4_text import Gemma4TextConfig
from .llama import LlamaConfig
from .qwen3 import Qwen3Config
from .registry import (FAMILIES, MODEL_NAMES, PRESETS, build, family, num_parameters,
                       weight_specs)

__all__ = ["FAMILIES", "MODEL_NAMES", "PRESETS", "Family", "Gemma4Config", "Gemma4TextConfig",
           "Layout", "LlamaConfig", "Preset", "Qwen3Config", "build", "build_graph",
           "config_from_dict", "family", "load_config", "num_parameters",
           "transposed_weight_names", "weight_names", "weight_shapes", "weight_specs"]

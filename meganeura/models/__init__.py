"""Model definitions: config presets and graph builders of the two Gemma-4 families."""

from .gemma4 import (Gemma4Config, build_graph, config_from_dict, load_config,
                     transposed_weight_names, weight_names, weight_shapes)
from .gemma4_text import Gemma4TextConfig
from .registry import MODEL_NAMES, PRESETS, build, family, weight_specs

__all__ = ["MODEL_NAMES", "PRESETS", "Gemma4Config", "Gemma4TextConfig", "build", "build_graph",
           "config_from_dict", "family", "load_config", "transposed_weight_names", "weight_names",
           "weight_shapes", "weight_specs"]

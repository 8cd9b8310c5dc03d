"""Model definitions: config presets and graph builders."""

from .gemma4 import (MODEL_NAMES, PRESETS, Gemma4Config, build, build_graph, config_from_dict,
                     load_config, transposed_weight_names, weight_names, weight_shapes)

__all__ = ["MODEL_NAMES", "PRESETS", "Gemma4Config", "build", "build_graph", "config_from_dict",
           "load_config", "transposed_weight_names", "weight_names", "weight_shapes"]

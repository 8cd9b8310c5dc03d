"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class MeganeuraError(Exception):
    """Base class: bad input from the user (graph, config, weights, arguments)."""


class GraphError(MeganeuraError):
    """A graph node was built with mismatched shapes, dtypes or attributes."""


class ConfigError(MeganeuraError):
    """A model configuration field is missing, unknown or out of range."""


class WeightsError(MeganeuraError):
    """A weights file is missing, corrupt, or holds a tensor of the wrong name or shape."""


class InputError(MeganeuraError):
    """Token ids (or another run-time input) have the wrong shape, dtype, device or values."""

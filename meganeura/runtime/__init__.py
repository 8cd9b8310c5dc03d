"""Compiled model runtime and the reference executor."""

"""Kernel archetypes: templates that emit Triton source text."""

"""Experiment configs; variants import their base file."""

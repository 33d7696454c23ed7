"""Seeing a model: torch.fx tracing with leaf fallback, shapes on every node, stage discovery.

Never changes a model; :mod:`ulsam_inject.surgery` does that.
"""

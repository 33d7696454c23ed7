"""Measured, not counted: latency benchmarks, per-node profiles, before/after figures."""

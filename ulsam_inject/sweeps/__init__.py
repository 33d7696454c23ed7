"""Ablations over g, positions and modes: the paper's tables for your own model.

``sweep(model, positions, groups, modes, ...) -> SweepResult`` (:mod:`.run`) builds every
configuration (:mod:`.grid`), counts it as ``inject`` does, optionally times and fine-tunes
it, and appends each finished row to a JSON-lines results file (:mod:`.results`) so that a
rerun resumes; :mod:`.table` renders and writes the rows.
"""

from ulsam_inject.sweeps.grid import Configuration
from ulsam_inject.sweeps.row import SweepRow
from ulsam_inject.sweeps.run import BenchSettings, SweepResult, sweep

__all__ = ["BenchSettings", "Configuration", "SweepResult", "SweepRow", "sweep"]

"""One row of a sweep: a configuration and what was measured for it (data only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ulsam_inject.sweeps.grid import Configuration

STATUSES = ("done", "cached", "skipped")
COST_KEYS = ("before", "after", "change", "blocks", "uncounted")
"""The keys of a row's cost: those of ``inject --json`` (``ulsam-inject.report/1``)."""


@dataclass(frozen=True)
class SweepRow:
    """What one configuration gave.

    ``status`` is ``"done"`` (measured in this run), ``"cached"`` (read from the results
    file) or ``"skipped"`` (the combination does not fit the model: ``reason`` says why).
    ``cost`` holds the ``before``, ``after``, ``change``, ``blocks`` and ``uncounted`` of
    the retrofit's :class:`~ulsam_inject.Report`, exactly as ``inject --json`` writes them;
    ``latency`` (with ``bench``) the median, 10th and 90th percentile ms of the retrofit,
    the original's median timed interleaved with it (``reference_ms``) and their
    ``ratio``; ``accuracy`` (with ``data``) the best epoch's validation ``top1``, ``top5``
    (fractions) and ``loss``, and ``best_epoch``.
    """

    config: Configuration
    status: str
    reason: str | None = None
    cost: Mapping[str, Any] | None = None
    latency: Mapping[str, Any] | None = None
    accuracy: Mapping[str, Any] | None = None
    seconds: float | None = None

    def delta(self, key: str) -> int | None:
        """The change of a total (``"params"``, ``"macs"``, ...) against the original."""
        if self.cost is None:
            return None
        return int(self.cost["change"][key]["delta"])

    def total(self, key: str) -> int | None:
        """A total of the retrofitted model (``"params"``, ``"macs"``, ...)."""
        if self.cost is None:
            return None
        return int(self.cost["after"][key])

    def to_dict(self) -> dict[str, Any]:
        cost = dict(self.cost) if self.cost is not None else dict.fromkeys(COST_KEYS)
        return {
            "at": self.config.at,
            "stages": list(self.config.stages),
            "groups": self.config.groups,
            "mode": self.config.mode,
            "status": self.status,
            "reason": self.reason,
            **{key: cost.get(key) for key in COST_KEYS},
            "latency": dict(self.latency) if self.latency is not None else None,
            "accuracy": dict(self.accuracy) if self.accuracy is not None else None,
            "seconds": self.seconds,
        }

    def stored(self) -> dict[str, Any]:
        """What the results file keeps (everything but the status of this run)."""
        data = self.to_dict()
        data.pop("status")
        return data

    @classmethod
    def from_stored(cls, config: Configuration, data: Mapping[str, Any]) -> SweepRow:
        """A row read back from the results file (status ``"cached"``)."""
        cost = {key: data.get(key) for key in COST_KEYS} if data.get("after") is not None else None
        return cls(
            config=config,
            status="cached",
            reason=data.get("reason"),
            cost=cost,
            latency=data.get("latency"),
            accuracy=data.get("accuracy"),
            seconds=data.get("seconds"),
        )

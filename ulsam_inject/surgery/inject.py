"""The surgery in one call: trace -> stages -> plan -> rewrite (-> costs, when reported)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ulsam_inject.cost.count import Cost, count
from ulsam_inject.graph.stages import Stage, find_stages
from ulsam_inject.graph.trace import Traced, check_input_size, trace_model
from ulsam_inject.guards import check_input_limits, check_model
from ulsam_inject.surgery.plan import DEFAULT_GROUPS, Mode, Plan, make_plan
from ulsam_inject.surgery.positions import PositionSpec
from ulsam_inject.surgery.report import Report, build_report
from ulsam_inject.surgery.rewrite import rewrite


@dataclass(frozen=True)
class Retrofit:
    """The result of :func:`inject`: the rewritten model and how it was made.

    ``model`` is a ``torch.fx.GraphModule`` with a :class:`ulsam_inject.ULSAM` at each
    placement; ``stages`` are the original model's stages; ``source`` is the model spec
    when the model was given as one (needed to save a rebuildable artifact). With a report,
    ``costs`` holds the original's and the retrofitted model's :class:`~ulsam_inject.Cost`
    (per node: ``costs[0].for_nodes(stage.nodes)`` is a stage's).
    """

    model: fx.GraphModule
    plan: Plan
    stages: tuple[Stage, ...]
    input_size: tuple[int, int, int]
    leaves: Mapping[str, str]
    source: str | None = None
    source_kwargs: Mapping[str, Any] | None = None
    report: Report | None = None
    costs: tuple[Cost, Cost] | None = None

    def with_source(self, source: str | None, kwargs: Mapping[str, Any] | None = None) -> Retrofit:
        """The same retrofit, recorded as made from the model spec ``source``."""
        report = self.report
        if report is not None:
            report = dataclasses.replace(report, model=source)
        return dataclasses.replace(
            self, source=source, source_kwargs=dict(kwargs or {}), report=report
        )

    def recipe(self) -> dict[str, Any]:
        """What rebuilds this model from its source: spec, kwargs, plan, input size."""
        return {
            "model": self.source,
            "model_kwargs": dict(self.source_kwargs or {}),
            "input_size": list(self.input_size),
            "plan": self.plan.to_list(),
        }


def inject(
    model: nn.Module | str,
    at: PositionSpec,
    groups: int | Mapping[Any, int] = DEFAULT_GROUPS,
    mode: Mode | str | Mapping[Any, str] = "after",
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    report: bool = True,
) -> Retrofit:
    """Retrofit ULSAM into ``model`` at the positions ``at``; the model passed in is untouched.

    With ``report=True`` (default) the result carries a :class:`~ulsam_inject.surgery.report.Report`
    of parameter, MAC, other-op and memory-traffic deltas, counted on shapes alone.

    ``model`` is an ``nn.Module`` or a model spec (``"torchvision:mobilenet_v2"``,
    ``"timm:NAME"``, ``"package.module:factory"``). ``at`` takes stage indices (negative
    from the end), ranges ``"12-15"``, names ``"features.13"``, globs ``"features.1*"``,
    ``"all"``, or a list of them. ``groups`` and ``mode`` are one value or a mapping from a
    position to a value; mode ``"after"`` adds ULSAM on the stage's output, ``"replace"``
    removes an identity-shaped stage and puts ULSAM in its place.

    Example:
        >>> import torch, torchvision
        >>> from ulsam_inject import inject
        >>> net = torchvision.models.mobilenet_v2().eval()
        >>> result = inject(net, at=["features.13", "features.16"], groups=4)
        >>> result.model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
        >>> result.plan.to_list()[0]
        {'at': 'features.13', 'groups': 4, 'mode': 'after'}
    """
    source: str | None = None
    if isinstance(model, str):
        from ulsam_inject.io.sources import build_model, parse_model_spec

        spec = parse_model_spec(model, model_kwargs)
        source, model_kwargs = spec.spec, dict(spec.kwargs)
        model = build_model(spec)
    check_model(model, function="inject", accepted="an nn.Module or a model spec string")
    check_input_size(input_size)
    check_input_limits(input_size)
    working = copy.deepcopy(model)
    traced = trace_model(working, input_size)
    stages = find_stages(traced)
    plan = make_plan(stages, at, groups, mode, traced)
    before = count(traced) if report else None
    removed = {
        p.stage.name: _params_of(working, p.stage.modules)
        for p in plan.placements
        if p.mode == "replace"
    }
    graph_module = rewrite(traced, plan)
    summary = costs = None
    if before is not None:
        block_params = {
            p.module_name: _params_of(graph_module, (p.module_name,)) for p in plan.placements
        }
        after = count(
            Traced(graph_module, traced.input_size, dict(traced.leaves), root=graph_module)
        )
        costs = (before, after)
        summary = build_report(
            plan.placements,
            before,
            after,
            removed_params=removed,
            block_params=block_params,
            model=source,
            input_size=traced.input_size,
        )
    return Retrofit(
        model=graph_module,
        plan=plan,
        stages=tuple(stages),
        input_size=traced.input_size,
        leaves=dict(traced.leaves),
        source=source,
        source_kwargs=model_kwargs,
        report=summary,
        costs=costs,
    )


def _params_of(model: nn.Module, paths: tuple[str, ...]) -> int:
    """Parameter elements held by the modules at ``paths`` (shared tensors once)."""
    seen: dict[int, int] = {}
    for path in paths:
        for parameter in model.get_submodule(path).parameters():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())

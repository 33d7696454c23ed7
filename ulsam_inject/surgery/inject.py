"""The surgery in one call: trace -> stages -> plan -> rewrite (-> costs, when reported)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ulsam_inject.block.module import DEFAULT_INIT, ULSAM, check_init
from ulsam_inject.cost.count import Cost, count
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, check_input_size
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import Traced
from ulsam_inject.guards import check_input_limits, check_model
from ulsam_inject.surgery.local import rewrite_stages
from ulsam_inject.surgery.plan import DEFAULT_GROUPS, DEFAULT_MODE, Mode, Placement, Plan, make_plan
from ulsam_inject.surgery.positions import PositionSpec
from ulsam_inject.surgery.report import Report, build_report
from ulsam_inject.surgery.rewrite import keep_unused_tensors, rewrite
from ulsam_inject.surgery.seeing import find_stages, trace_model


@dataclass(frozen=True)
class Retrofit:
    """The result of :func:`inject`: the rewritten model and how it was made.

    ``model`` is the user's model (a deep copy, same class) with a :class:`ulsam_inject.ULSAM`
    at each placement's ``module_name``, or, where a stage was not a module of its own, a
    ``torch.fx.GraphModule`` of the whole model; ``stages`` are the original model's stages;
    ``source`` is the model spec when the model was given as one (needed to save a
    rebuildable artifact). With a report,
    ``costs`` holds the original's and the retrofitted model's :class:`~ulsam_inject.Cost`
    (per node: ``costs[0].for_nodes(stage.nodes)`` is a stage's).
    """

    model: nn.Module
    plan: Plan
    stages: tuple[Stage, ...]
    input_size: tuple[int, int, int]
    leaves: Mapping[str, str]
    source: str | None = None
    source_kwargs: Mapping[str, Any] | None = None
    report: Report | None = None
    costs: tuple[Cost, Cost] | None = None

    def __repr__(self) -> str:
        where = sorted({p.rewrite for p in self.plan.placements})
        lines = [
            f"Retrofit(model={type(self.model).__name__}, source={self.source!r}, "
            f"input_size={self.input_size}, rewrite={'/'.join(where)},",
            f"  plan={self.plan.to_list()},",
        ]
        if self.report is not None:
            params, macs = self.report.change("params"), self.report.change("macs")
            lines.append(
                f"  params {params[0]:+d} ({params[1]:+.3f}%), macs {macs[0]:+d} ({macs[1]:+.3f}%),"
            )
        return "\n".join(lines) + ")"

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
    mode: Mode | str | Mapping[Any, str] = DEFAULT_MODE,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    report: bool = True,
    seed: int | None = None,
    init: str = DEFAULT_INIT,
) -> Retrofit:
    """Retrofit ULSAM into ``model`` at the positions ``at``; the model passed in is untouched.

    The result's ``model`` is a deep copy of ``model``, of the same class, in which only the
    chosen stages' modules changed (see :mod:`ulsam_inject.surgery.local`); a stage that is
    not a module of its own makes the whole model a rewritten ``torch.fx.GraphModule``, and
    each placement's ``rewrite`` says which happened. ``seed`` makes the new blocks' initial
    weights reproducible without touching the global random stream. ``init`` says how
    they start: ``"default"`` (PyTorch's initialization) or ``"uniform"`` (a flat attention
    map, so each block starts as ``x * (1 + 1/(H*W))``; see :class:`ulsam_inject.ULSAM`).

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
        >>> type(result.model).__name__, type(result.model.features[13].ulsam).__name__
        ('MobileNetV2', 'ULSAM')
        >>> result.plan.to_list()[0]
        {'at': 'features.13', 'groups': 4, 'mode': 'after'}
    """
    check_init(init)
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
    make_block = _block_maker(working, seed, init)
    local_plan = rewrite_stages(working, plan, make_block, traced)
    retrofitted: nn.Module
    if local_plan is not None:
        plan, retrofitted = local_plan, working
        after_traced = trace_model(retrofitted, traced.input_size) if report else None
    else:  # the last resort: the whole model's graph
        retrofitted = rewrite(traced, plan, make_block)
        keep_unused_tensors(
            working, retrofitted, removed=[p.stage for p in plan.placements if p.mode == "replace"]
        )
        after_traced = Traced(retrofitted, traced.input_size, dict(traced.leaves), root=retrofitted)
    summary = costs = None
    if before is not None and after_traced is not None:
        block_params = {
            p.module_name: _params_of(retrofitted, (p.module_name,)) for p in plan.placements
        }
        after = count(after_traced)
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
        model=retrofitted,
        plan=plan,
        stages=tuple(stages),
        input_size=traced.input_size,
        leaves=dict(traced.leaves),
        source=source,
        source_kwargs=model_kwargs,
        report=summary,
        costs=costs,
    )


def _block_maker(
    model: nn.Module, seed: int | None, init: str = DEFAULT_INIT
) -> Callable[[Placement], ULSAM]:
    """New blocks on the model's device and dtype, in the mode of the module they join,
    started as ``init`` says; with ``seed``, drawn from a generator of their own (the
    caller's stream untouched)."""
    check_init(init)
    reference = next(iter(model.parameters()), None)
    generator = None if seed is None else torch.Generator().manual_seed(seed)

    def make(placement: Placement) -> ULSAM:
        if generator is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                block = ULSAM(placement.channels, placement.groups, init=init)
        else:
            block = ULSAM(placement.channels, placement.groups, init=init)
        if reference is not None:
            block = block.to(device=reference.device, dtype=reference.dtype)
        block.placed_at = placement.stage.name
        block.replaces_stage = placement.mode == "replace"
        try:  # the mode of the module it joins (a flat stage is no module: the model's)
            training = model.get_submodule(placement.stage.name).training
        except AttributeError:
            training = model.training
        return block.train(training)

    return make


def _params_of(model: nn.Module, paths: tuple[str, ...]) -> int:
    """Parameter elements held by the modules at ``paths`` (shared tensors once)."""
    seen: dict[int, int] = {}
    for path in paths:
        for parameter in model.get_submodule(path).parameters():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())

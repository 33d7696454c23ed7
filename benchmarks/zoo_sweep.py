"""Sweep the compact-model zoo: find stages, inject ULSAM after every stage, run it.

For each model (built without weights): find its stages, inject ULSAM "after" every stage
(g=4 where 4 divides the stage's channels, else g=1 -- counted in the table), then check

- eval: the output shape is the original's, and with every ULSAM swapped for identity the
  output equals the original exactly (``torch.equal``);
- train: a forward and backward pass at batch 2 runs and reaches the new blocks.

Prints a table and a summary: handled N/M, seconds per model (mean, median), and the
median time of ``inject`` (trace + discovery + injection) on torchvision mobilenet_v2.

Usage::

    PYTHONPATH=. python benchmarks/zoo_sweep.py                     # the whole list
    PYTHONPATH=. python benchmarks/zoo_sweep.py --family mobilevit --family tv:regnet
    PYTHONPATH=. python benchmarks/zoo_sweep.py --limit 10 --input-size 160 --json out.json

Not part of the test run: it takes tens of minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import multiprocessing
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

from ulsam_inject import ULSAM, find_stages, inject, trace_model
from ulsam_inject.surgery.rewrite import identity_blocks

# Surgery only: the cost report (when inject makes one) is timed by its own benchmark.
INJECT_KWARGS = {"report": False} if "report" in inspect.signature(inject).parameters else {}

TORCHVISION_FAMILIES = (
    "mobilenet_v2",
    "mobilenet_v3",
    "shufflenet_v2",
    "mnasnet",
    "efficientnet_b",
    "efficientnet_v2",
    "regnet_",
)
TIMM_FAMILIES = (
    "mobilenetv1",
    "mobilenetv2",
    "mobilenetv3",
    "mobilenetv4",
    "efficientnet",
    "tf_efficientnet",
    "tf_mobilenetv3",
    "lcnet",
    "ghostnet",
    "mixnet",
    "tf_mixnet",
    "fbnet",
    "mnasnet",
    "semnasnet",
    "spnasnet",
    "tinynet",
    "hardcorenas",
    "mobilevit",
    "efficientvit",
    "repvit",
    "mobileone",
    "fastvit",
    "mobilenet_edgetpu",
    "rexnet",
)


@dataclass
class Row:
    model: str
    stages: int = 0
    blocks: int = 0
    g1: int = 0
    kept_class: bool = False
    rewrites: dict[str, int] = field(default_factory=dict)  # "stage" / "parent" / "root"
    leaves: list[str] = field(default_factory=list)
    shapes: str = ""
    build_s: float = 0.0
    find_s: float = 0.0
    inject_s: float = 0.0
    check_s: float = 0.0
    status: str = "ok"
    error: str = ""

    @property
    def seconds(self) -> float:
        """Surgery and checks; model construction excluded."""
        return self.find_s + self.inject_s + self.check_s


def list_models(families: list[str] | None) -> list[tuple[str, Callable[[], nn.Module]]]:
    """``(label, factory)`` for every model of the sweep, filtered by ``families``."""
    wanted_tv = wanted_timm = None
    if families:
        wanted_tv = [f.split(":", 1)[1] for f in families if f.startswith("tv:")]
        wanted_timm = [f.split(":", 1)[1] for f in families if f.startswith("timm:")]
        plain = [f for f in families if ":" not in f]
        wanted_tv += plain
        wanted_timm += plain
    models: list[tuple[str, Callable[[], nn.Module]]] = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if name.startswith(TORCHVISION_FAMILIES) and (
            wanted_tv is None or name.startswith(tuple(wanted_tv))
        ):
            models.append((f"tv:{name}", _tv_factory(name)))
    try:
        import timm
    except ImportError:
        print("timm is not installed: sweeping torchvision only", file=sys.stderr)
        return models
    for name in timm.list_models():
        if name.startswith(TIMM_FAMILIES) and (
            wanted_timm is None or name.startswith(tuple(wanted_timm))
        ):
            models.append((f"timm:{name}", _timm_factory(name)))
    return models


def _tv_factory(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None)


def _timm_factory(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return _first_tensor(value[0])
    raise TypeError(f"model output is a {type(value).__name__}, not a tensor")


def _all_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_all_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_all_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def sweep_one(label: str, factory: Callable[[], nn.Module], size: tuple[int, int, int]) -> Row:
    row = Row(label)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = factory().eval()
    row.build_s = time.perf_counter() - start

    start = time.perf_counter()
    stages = find_stages(model, size)
    row.find_s = time.perf_counter() - start
    row.stages = len(stages)
    if not stages:
        raise RuntimeError("no stages found")
    groups = {s.name: 4 if s.out_channels % 4 == 0 else 1 for s in stages}
    row.g1 = sum(g == 1 for g in groups.values())

    start = time.perf_counter()
    result = inject(model, at="all", groups=groups, input_size=size, **INJECT_KWARGS)
    row.inject_s = time.perf_counter() - start
    row.leaves = sorted(result.leaves)
    retrofitted = result.model
    row.kept_class = type(retrofitted) is type(model)
    for placement in result.plan.placements:
        where = placement.rewrite.split(":")[0]
        row.rewrites[where] = row.rewrites.get(where, 0) + 1
    row.blocks = sum(isinstance(m, ULSAM) for m in retrofitted.modules())
    if row.blocks != len(stages):
        raise RuntimeError(f"{row.blocks} ULSAM blocks for {len(stages)} stages")

    start = time.perf_counter()
    x = torch.randn(2, *size)
    with torch.no_grad():
        expected = model(x)
        got = retrofitted.eval()(x)
        exp_t, got_t = _first_tensor(expected), _first_tensor(got)
        row.shapes = "x".join(map(str, exp_t.shape))
        if exp_t.shape != got_t.shape:
            raise RuntimeError(f"output shape {tuple(got_t.shape)} != {tuple(exp_t.shape)}")
        plain = identity_blocks(copy.deepcopy(retrofitted))
        if not _all_equal(plain(x), expected):
            raise RuntimeError("with identity blocks the output differs from the original")
        del plain
    retrofitted.train()
    out = _first_tensor(retrofitted(x))
    out.float().square().mean().backward()
    grads = [
        p.grad
        for m in retrofitted.modules()
        if isinstance(m, ULSAM)
        for p in m.parameters()
        if p.requires_grad
    ]
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise RuntimeError("no gradient reached the ULSAM blocks")
    row.check_s = time.perf_counter() - start
    return row


def _failed(label: str, error: BaseException) -> Row:
    row = Row(label, status="FAIL", error=f"{type(error).__name__}: {error}")
    last = traceback.extract_tb(error.__traceback__)
    if last:
        row.error += f" [{last[-1].filename.rsplit('/', 1)[-1]}:{last[-1].lineno}]"
    return row


def _child(
    conn: Any, label: str, factory: Callable[[], nn.Module], size: tuple[int, int, int]
) -> None:
    try:
        row = sweep_one(label, factory, size)
    except Exception as error:  # the sweep reports every failure and goes on
        row = _failed(label, error)
    conn.send(row)
    conn.close()


def run_isolated(
    label: str, factory: Callable[[], nn.Module], size: tuple[int, int, int], timeout: int
) -> Row:
    """``sweep_one`` in a forked process: memory goes back after each model; time-limited."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, label, factory, size))
    start = time.perf_counter()
    process.start()
    send.close()
    row: Row | None = None
    if receive.poll(timeout if timeout > 0 else None):
        try:
            row = receive.recv()
        except EOFError:
            row = None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if row is None:
        elapsed = time.perf_counter() - start
        why = (
            f"over the {timeout} s limit"
            if timeout > 0 and elapsed >= timeout
            else f"the process died (exit code {process.exitcode}; out of memory?)"
        )
        row = Row(label, status="FAIL", error=why)
    return row


def mobilenet_v2_inject_seconds(repeats: int = 5) -> float:
    """Median wall time of ``inject`` (copy + trace + discovery + plan + rewrite)."""
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    inject(model, at="all", **INJECT_KWARGS)  # warm-up: imports and first-call caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inject(model, at="all", **INJECT_KWARGS)
        times.append(time.perf_counter() - start)
    trace_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trace_model(copy.deepcopy(model))
        trace_times.append(time.perf_counter() - start)
    print(
        f"torchvision mobilenet_v2 (3x224x224): inject at all 17 stages "
        f"{statistics.median(times) * 1000:.0f} ms median of {repeats} "
        f"(of which copy + trace + shape propagation "
        f"{statistics.median(trace_times) * 1000:.0f} ms)"
    )
    return statistics.median(times)


def _where(row: Row) -> str:
    return "/".join(str(row.rewrites.get(k, 0)) for k in ("stage", "parent", "root"))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family",
        action="append",
        help="model name prefix, e.g. mobilevit, tv:regnet_x, timm:efficientnet_b; repeatable",
    )
    parser.add_argument("--limit", type=int, default=0, help="sweep only the first N models")
    parser.add_argument("--input-size", type=int, default=224, help="square input side")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model (0: none)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every model in this process (no fork, no time limit; memory accumulates)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--no-mnv2-timing", action="store_true", help="skip the mobilenet_v2 timing"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = (3, args.input_size, args.input_size)

    models = list_models(args.family)
    if args.limit:
        models = models[: args.limit]
    print(f"sweeping {len(models)} models at input {size}")
    header = (
        f"{'model':<40} {'stages':>6} {'blocks':>6} {'g=1':>4} {'leaves':>6} "
        f"{'class':>5} {'st/par/root':>11} {'find s':>7} {'inject s':>8} {'check s':>7} "
        f"{'total s':>7}  status"
    )
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    for label, factory in models:
        if args.in_process:
            try:
                row = sweep_one(label, factory, size)
            except Exception as error:  # the sweep reports every failure and goes on
                row = _failed(label, error)
        else:
            row = run_isolated(label, factory, size, args.timeout)
        rows.append(row)
        status = "ok" if row.status == "ok" else f"FAIL {_short(row.error, 160)}"
        print(
            f"{label:<40} {row.stages:>6} {row.blocks:>6} {row.g1:>4} {len(row.leaves):>6} "
            f"{'kept' if row.kept_class else 'lost':>5} {_where(row):>11} "
            f"{row.find_s:>7.2f} {row.inject_s:>8.2f} {row.check_s:>7.2f} {row.seconds:>7.2f}  "
            f"{status}",
            flush=True,
        )

    # Timed last, in this process: forked children start from a process that ran no ops.
    print()
    mnv2 = None if args.no_mnv2_timing else mobilenet_v2_inject_seconds()
    ok = [r for r in rows if r.status == "ok"]
    print(f"handled {len(ok)}/{len(rows)}")
    if ok:
        surgery = [r.find_s + r.inject_s for r in ok]
        total = [r.seconds for r in ok]
        print(
            "seconds per handled model: surgery (find + inject) mean "
            f"{statistics.mean(surgery):.2f} median {statistics.median(surgery):.2f}; "
            f"with checks mean {statistics.mean(total):.2f} median {statistics.median(total):.2f}"
        )
        print(
            f"stages per model: mean {statistics.mean(r.stages for r in ok):.1f}, "
            f"{sum(r.g1 > 0 for r in ok)} models needed g=1 somewhere, "
            f"{sum(bool(r.leaves) for r in ok)} models have untraceable leaves"
        )
        print(
            f"class kept: {sum(r.kept_class for r in ok)}/{len(ok)} models; "
            f"fell back to the root graph: {sum(r.rewrites.get('root', 0) > 0 for r in ok)}; "
            f"blocks rewritten in their stage {sum(r.rewrites.get('stage', 0) for r in ok)}, "
            f"in a parent {sum(r.rewrites.get('parent', 0) for r in ok)}, "
            f"in the root {sum(r.rewrites.get('root', 0) for r in ok)}"
        )
    if mnv2 is not None:
        print(f"mobilenet_v2 inject (trace + discovery + injection): {mnv2 * 1000:.0f} ms")
    for r in rows:
        if r.status != "ok":
            print(f"FAILED {r.model}: {r.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"seconds": r.seconds} for r in rows], f, indent=1)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

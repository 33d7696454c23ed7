"""Latency of compact CNNs with ULSAM: the original, ours, and the per-subspace reference.

Two blocks per model, g = 4, the paper's kind of placement (one on a 14 x 14 map, one on a
7 x 7 map; about +0.02% MACs): torchvision ``mobilenet_v2`` after ``features.13``
(96 x 14 x 14) and ``features.16`` (160 x 7 x 7); timm ``mobilenetv3_large_100`` after
``blocks.4`` (112 x 14 x 14) and ``blocks.5`` (160 x 7 x 7); timm ``efficientnet_b0`` after
``blocks.4`` (112 x 14 x 14) and ``blocks.5`` (192 x 7 x 7). The timm models need the
``timm`` extra; without it they are skipped with a note. For each model, device and batch
size,
:func:`ulsam_inject.measure_latency` times the original and the retrofitted model side by
side (interleaved, after a warm-up): once with our vectorized :class:`ulsam_inject.ULSAM`,
and once with :class:`ulsam_inject.block.reference.ReferenceULSAM` (the readable per-subspace
loop) swapped into the same model in place of each block, its weights converted with
``ULSAM.to_reference_state_dict`` (the two give the same outputs; checked first). Each
ratio is the retrofitted model's median over the original's, from its own interleaved
run; the ``original`` row shows the first run's timings. The ``identities, no ULSAM`` row
is the retrofitted model with identities in place of the blocks: the cost of the surgery
itself (the two changed stages run as small torch.fx graph modules), which the ULSAM rows
include.

Models are built without weights (random init: latency does not depend on the values),
in eval mode, fp32. CUDA rows are added when CUDA is available (``--device auto``).

Usage::

    PYTHONPATH=. python benchmarks/bench_models.py            # 3 models, batch 1 and 32, 2 threads
    PYTHONPATH=. python benchmarks/bench_models.py --models efficientnet_b0 --no-reference
    PYTHONPATH=. python benchmarks/bench_models.py --batches 1 --repeats 50 --threads 1
    PYTHONPATH=. python benchmarks/bench_models.py --device cuda --no-reference --json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from ulsam_inject import ULSAM, inject, measure_latency
from ulsam_inject.block.reference import ReferenceULSAM
from ulsam_inject.measure.bench import LatencyReport, Timing
from ulsam_inject.surgery.rewrite import identity_blocks

MODELS = {
    "mobilenet_v2": ("torchvision", ("features.13", "features.16")),
    "mobilenetv3_large_100": ("timm", ("blocks.4", "blocks.5")),
    "efficientnet_b0": ("timm", ("blocks.4", "blocks.5")),
}
"""Model name -> (library, ULSAM positions)."""


def build(name: str) -> nn.Module:
    """The model with random weights (nothing is downloaded), in eval mode."""
    library, _ = MODELS[name]
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    return torchvision.models.get_model(name, weights=None).eval()


@dataclass(frozen=True)
class Row:
    device: str
    batch: int
    threads: int
    model: str
    timing: Timing
    ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "batch": self.batch,
            "threads": self.threads,
            "model": self.model,
            "median_ms": self.timing.median_ms,
            "p10_ms": self.timing.p10_ms,
            "p90_ms": self.timing.p90_ms,
            "samples": self.timing.samples,
            "ratio": self.ratio,
        }


def with_reference_blocks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ULSAM replaced by an equivalent ReferenceULSAM."""
    swapped = copy.deepcopy(model)
    blocks = [(n, m) for n, m in swapped.named_modules() if isinstance(m, ULSAM)]
    if not blocks:
        raise SystemExit("no ULSAM block in the retrofitted model")
    for name, block in blocks:
        reference = ReferenceULSAM(block.channels, block.groups, momentum=block.dw_bn.momentum)
        reference.load_state_dict(block.to_reference_state_dict())
        reference.train(block.training)
        parent, _, attribute = name.rpartition(".")
        setattr(swapped.get_submodule(parent), attribute, reference)
    return swapped


def check_same_outputs(ours: nn.Module, reference: nn.Module, size: int) -> float:
    """Largest difference of the two models' features (eval mode), relative to their scale.

    The features before the classifier (``model.features`` or timm's ``forward_features``:
    the retrofit keeps the model's class): with random weights the logits are tiny, which
    would make any absolute tolerance meaningless.
    """
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = (
            m.forward_features(example) if hasattr(m, "forward_features") else m.features(example)
            for m in (ours.eval(), reference.eval())
        )
    return float((a - b).abs().max() / a.abs().max())


def devices(choice: str) -> list[str]:
    if choice == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {choice}: CUDA is not available here")
    return [choice]


def render(rows: list[Row], name: str, size: int, groups: int) -> Table:
    positions = " and ".join(MODELS[name][1])
    table = Table(
        title=f"{name} {size}x{size}, ULSAM g={groups} after {positions}",
        title_justify="left",
        caption=(
            "ms per forward pass (eval, fp32); ratio: median over the original's median, "
            "measured interleaved with it in the same run"
        ),
        caption_justify="left",
    )
    for header in ("device", "batch", "threads", "model", "median ms", "p10 ms", "p90 ms"):
        table.add_column(header, justify="right" if "ms" in header or header == "batch" else "left")
    table.add_column("ratio", justify="right")
    previous: tuple[str, int] | None = None
    for row in rows:
        key = (row.device, row.batch)
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        table.add_row(
            row.device,
            str(row.batch),
            str(row.threads) if row.device == "cpu" else "-",
            row.model,
            f"{row.timing.median_ms:.2f}",
            f"{row.timing.p10_ms:.2f}",
            f"{row.timing.p90_ms:.2f}",
            "1.000" if row.ratio is None else f"{row.ratio:.3f} ({100 * (row.ratio - 1):+.1f}%)",
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batches", default="1,32", help="comma-separated (default 1,32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model first")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--groups", type=int, default=4, help="g of every ULSAM")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, or auto (cpu, and cuda if any)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference ULSAM rows")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    size = (3, args.size, args.size)
    err = Console(stderr=True)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    results: dict[str, list[Row]] = {}
    for name in names:
        if MODELS[name][0] == "timm" and importlib.util.find_spec("timm") is None:
            err.print(f"{name}: skipped, needs timm: pip install 'ulsam-inject[timm]'")
            continue
        results[name] = bench_model(name, args, batches, size, err)
    if args.json:
        json.dump(
            [{"model_name": n, **row.to_dict()} for n, rows in results.items() for row in rows],
            sys.stdout,
            indent=2,
        )
        print()
        return
    for name, rows in results.items():
        Console(width=140).print(render(rows, name, args.size, args.groups))


def bench_model(
    name: str,
    args: argparse.Namespace,
    batches: list[int],
    size: tuple[int, int, int],
    err: Console,
) -> list[Row]:
    """The rows of one model: the original, then each retrofit with its ratio."""
    torch.manual_seed(0)
    original = build(name)
    positions = list(MODELS[name][1])
    ours = inject(original, at=positions, groups=args.groups, input_size=size).model.eval()
    # The same model with each block an identity: what the surgery itself costs (the changed
    # stages run as small torch.fx graph modules), not ULSAM's work.
    plain = identity_blocks(copy.deepcopy(ours)).eval()
    reference = None
    if not args.no_reference:
        reference = with_reference_blocks(ours).eval()
        difference = check_same_outputs(ours, reference, args.size)
        err.print(f"{name}: ours vs reference ULSAM, max relative difference {difference:.1e}")
        if difference > 1e-3:
            raise SystemExit("the reference blocks do not compute what ours do")

    rows: list[Row] = []
    for device in devices(args.device):
        for batch in batches:
            contenders = [("identities, no ULSAM", plain), ("ULSAM (ours)", ours)]
            if reference is not None:
                contenders.append(("reference ULSAM", reference))
            for i, (label, model) in enumerate(contenders):
                err.print(f"{name}, {device}, batch {batch}: original vs {label} ...")
                report: LatencyReport = measure_latency(
                    original,
                    model,
                    size,
                    batch=batch,
                    device=device,
                    threads=args.threads,
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
                if i == 0:
                    rows.append(Row(device, batch, report.threads, "original", report.before, None))
                rows.append(Row(device, batch, report.threads, label, report.after, report.ratio))
    return rows


if __name__ == "__main__":
    main()

"""Check ``ulsam_inject.cost.count`` against torchvision's published GFLOPS, for every model.

For each classification model in ``torchvision.models`` and each of its weights entries, the
model is built as that entry's builder would build it (``image_size`` for ViT,
``input_size`` for MaxViT, ``transform_input`` for GoogLeNet / Inception) but with its
parameters on the meta device (shapes only: no memory, no init, no download), and counted at
the entry's input size (``transforms().crop_size``). torchvision's ``meta["_ops"]`` is GMACs
at that size with 3 decimals; a model matches when our MACs / 1e9, rounded to 3 decimals,
equal it. ``FlopCounterMode`` total / 2 on the same meta model is shown as an independent
check. The seconds are those of ``count`` alone (trace + shapes + rules), one run; with
``--real`` the parameters are real (random init) instead, which counts as fast (RegNet-Y
128GF at 384x384: 0.18 s either way on 2 CPU cores) but builds slowly.

Usage::

    PYTHONPATH=. python benchmarks/check_torchvision_ops.py            # all models
    PYTHONPATH=. python benchmarks/check_torchvision_ops.py resnet18 vit_b_16
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ulsam_inject.cost.count import count


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Create every parameter on the meta device: no memory, no init (builders may use torch).

    Buffers (batch-norm statistics: small) stay real, as a traced model's would be.
    """
    register_parameter = nn.Module.register_parameter

    def parameter(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    nn.Module.register_parameter = parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]


def builder_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """The architecture arguments torchvision's builder sets when given ``weights``."""
    kwargs: dict[str, Any] = {}
    if weights.meta.get("categories"):  # vgg16's FEATURES weights keep the 1000-class head
        kwargs["num_classes"] = len(weights.meta["categories"])
    if name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    elif name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    return kwargs


def flop_counter_macs(model: nn.Module, size: int) -> int | None:
    buffers = {name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()}
    try:
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(
                model, buffers, (torch.empty(1, 3, size, size, device="meta"),)
            )
    except Exception:
        return None
    return counter.get_total_flops() // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--no-flop-counter", action="store_true", help="skip the second check")
    parser.add_argument(
        "--real", action="store_true", help="build real (randomly initialized) parameters"
    )
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    names = options.models or torchvision.models.list_models(module=torchvision.models)
    header = (
        f"{'model':<20} {'weights':<26} {'input':>7} {'ours GMACs':>12} {'published':>10} "
        f"{'match':>5} {'FlopCounter':>11} {'seconds':>8}  uncounted"
    )
    print(header)
    print("-" * len(header))
    matched = total = 0
    mismatches = []
    cache: dict[tuple[str, str], tuple[int, float, int | None, tuple[str, ...]]] = {}
    for name in names:
        for weights in torchvision.models.get_model_weights(name):
            size = weights.transforms().crop_size[0]
            kwargs = builder_kwargs(name, weights)
            key = (name, repr(sorted(kwargs.items())) + str(size))
            if key not in cache:
                with nullcontext() if options.real else meta_parameters():
                    model = torchvision.models.get_model(name, **kwargs).eval()
                start = time.perf_counter()
                cost = count(model, (3, size, size))
                seconds = time.perf_counter() - start
                check = None if options.no_flop_counter else flop_counter_macs(model, size)
                cache[key] = (cost.macs, seconds, check, cost.uncounted)
            macs, seconds, check, uncounted = cache[key]
            ours = round(macs / 1e9, 3)
            published = weights.meta["_ops"]
            match = ours == round(published, 3)
            matched += match
            total += 1
            if not match:
                mismatches.append(f"{name}/{weights.name}")
            fc = "-" if check is None else ("same" if check == macs else f"{check / 1e9:.3f}")
            print(
                f"{name:<20} {weights.name:<26} {size:>7} {ours:>12.3f} {published:>10.3f} "
                f"{'yes' if match else 'NO':>5} {fc:>11} {seconds:>8.2f}  {', '.join(uncounted)}",
                flush=True,
            )
    print(
        f"{matched}/{total} match"
        + (f"; mismatches: {', '.join(mismatches)}" if mismatches else "")
    )


if __name__ == "__main__":
    main()

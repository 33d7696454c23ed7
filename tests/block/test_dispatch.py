"""One decision picks the block's code path; every device, dtype and autocast setting works.

The fast paths run only where they were written and measured (CPU float32, CUDA eval);
everything else takes the plain ops, which are correct by construction. CUDA tests skip
without a GPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from block_helpers import random_block
from torch.utils.flop_counter import FlopCounterMode

from ulsam_inject import ULSAM, inject
from ulsam_inject.block.dispatch import BlockPath, choose_path, dispatch_mode_active
from ulsam_inject.block.inference import fold_sources

pytestmark = pytest.mark.usefixtures("one_thread")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def path_of(block: ULSAM, x: torch.Tensor) -> BlockPath:
    return choose_path(block, x, fold_sources(block))


def grads(
    block: ULSAM, x: torch.Tensor, step: Callable[[ULSAM, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Output and gradients (input and parameters) of ``step(block, x).float().sum()``."""
    x = x.detach().clone().requires_grad_()
    block.zero_grad()
    out = step(block, x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * weights).sum().backward()
    assert x.grad is not None
    found = {"out": out.detach().float(), "x": x.grad.float()}
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        found[name] = p.grad.float()
    return found


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far ``a`` is from ``b``, in units of ``b``'s size."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.03, torch.bfloat16: 0.15}
"""Relative error allowed against float64, per dtype the computation runs in. bfloat16
keeps 8 significant bits: a gradient summed over a few thousand bf16 products (cuDNN's
bf16 backward on an H200: 12.8% on a 4-element bias gradient) is that far off; float16
keeps 11, a fifth of that."""

# On batch statistics BatchNorm cancels a per-channel shift and scale of its input: the
# true gradients of the conv biases are 0 and the depthwise weight's is tiny (through eps
# alone), so their relative error is meaningless; they are held to an absolute bound.
CANCELLED_IN_TRAINING = ("dw.weight", "dw.bias", "pw.bias")


def assert_grads_match(
    found: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], tol: float, train: bool
) -> None:
    scale = max(float(v.abs().max()) for v in exact.values())
    for name, value in found.items():
        assert torch.isfinite(value).all(), name
        if train and name in CANCELLED_IN_TRAINING:
            error = float((value.double().cpu() - exact[name].double()).abs().max()) / scale
        else:
            error = relative_error(value, exact[name])
        assert error <= tol, f"{name}: error {error:.3g} > {tol}"


def call(block: ULSAM, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = block(x)
    return out


# -- the decision ---------------------------------------------------------------------------


def test_fast_paths_only_where_measured() -> None:
    block = random_block(16, 4).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert path_of(block, x) is BlockPath.CPU_STREAMING
        assert path_of(block, x.contiguous(memory_format=torch.channels_last)) is (
            BlockPath.CPU_STREAMING
        )
    assert path_of(block, x.requires_grad_()) is BlockPath.CPU_TRAINING
    assert path_of(block.train(), x.detach()) is BlockPath.CPU_TRAINING
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert path_of(block, x) is BlockPath.PLAIN
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        other = copy.deepcopy(block).to(dtype)
        assert path_of(other, x.detach().to(dtype)) is BlockPath.PLAIN
    assert path_of(block, x.detach().double()) is BlockPath.PLAIN  # block and input differ
    meta = copy.deepcopy(block).to("meta")
    assert path_of(meta, torch.empty(2, 16, 5, 5, device="meta")) is BlockPath.PLAIN


def test_dispatch_modes_are_detected() -> None:
    """Guards the private torch query behind ``dispatch_mode_active``: if torch changes it,
    this fails instead of a FLOP counter silently seeing the fast path's ops."""
    assert not dispatch_mode_active()
    block = random_block(16, 4).eval()
    x = torch.randn(1, 16, 6, 6)
    with FlopCounterMode(display=False) as counter:
        assert dispatch_mode_active()
        assert path_of(block, x) is BlockPath.PLAIN
        block(x)
    # The plain ops: two 1x1 convs of C*H*W multiply-adds each, 2 FLOPs per multiply-add.
    assert counter.get_total_flops() == 2 * 2 * 16 * 6 * 6


# -- the fused CUDA path's math, checked on the CPU through Triton's interpreter -----------

FUSED_CASES = [
    ((2, 32, 7, 9), 4, "float32", False),
    ((2, 32, 7, 9), 4, "float32", True),
    ((2, 36, 5, 5), 3, "float32", False),  # channel tiles of 16 with 12 live
    ((1, 16, 1, 1), 4, "float32", False),
    ((3, 12, 2, 3), 12, "float32", False),
    ((2, 16, 5, 5), 1, "bfloat16", False),
    ((1, 40, 12, 13), 2, "float16", False),  # a wide map: one channel at a time, 3 tiles
]

INTERPRETED = """
import json, sys
import torch
from block_helpers import random_block
from ulsam_inject.block import gpu
from ulsam_inject.block.inference import fold_sources, folded

errors = []
for shape, groups, dtype, channels_last in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    for seed in range(2):
        block = random_block(shape[1], groups, seed=seed).eval().to(dtype)
        torch.manual_seed(seed)
        x = torch.randn(shape).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = gpu.gpu_inference_forward(x, folded(block, fold_sources(block)))
            exact = block.double().forward_plain(x.double())
        error = float((out.double() - exact).norm() / exact.norm())
        errors.append([str(out.dtype), list(out.shape), error])
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreted() -> list[list[object]]:
    """The Triton kernel run by Triton's CPU interpreter, in a fresh process: the
    interpreter must be chosen before Triton's own library functions are first imported."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CUDA tests run the kernel for real")
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parents[1])])
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED, json.dumps(FUSED_CASES)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found: list[list[object]] = json.loads(done.stdout)
    return found


@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_kernel_equals_plain(interpreted: list[list[object]], case: int) -> None:
    shape, _, dtype, _ = FUSED_CASES[case]
    for dtype_found, shape_found, error in interpreted[2 * case : 2 * case + 2]:
        assert dtype_found == f"torch.{dtype}" and shape_found == list(shape)
        assert isinstance(error, float) and error <= TOLERANCE[getattr(torch, dtype)] / 10


# -- half precision, autocast, layouts, meta -------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float64(dtype: torch.dtype, train: bool) -> None:
    """fp16/bf16 blocks give finite gradients that match a float64 copy."""
    block = random_block(32, 4, seed=1).train(train)
    x = torch.randn(2, 32, 7, 7)
    exact = grads(copy.deepcopy(block).double(), x.double(), call)
    found = grads(block.to(dtype), x.to(dtype), call)
    assert_grads_match(found, exact, TOLERANCE[dtype], train)


@pytest.mark.parametrize("train", [False, True])
def test_cpu_autocast_training_step(train: bool) -> None:
    """Forward and backward inside ``torch.autocast("cpu", torch.bfloat16)``: the output
    dtype is what the plain ops give there, gradients are float32 and near float32's."""
    block = random_block(64, 4, seed=2).train(train)
    x = torch.randn(4, 64, 8, 8)

    def autocast(b: ULSAM, inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(b, inp)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = copy.deepcopy(block).forward_plain(x).dtype
    exact = grads(copy.deepcopy(block).double(), x.double(), call)
    mixed = grads(block, x, autocast)
    assert autocast(block, x).dtype == expected_dtype
    assert_grads_match(mixed, exact, TOLERANCE[torch.bfloat16], train)


def test_retrofitted_mobilenet_trains_under_cpu_autocast() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    model = inject(net, at=["features.13", "features.16"], input_size=(3, 64, 64)).model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
    loss.backward()
    blocks = [m for m in model.modules() if isinstance(m, ULSAM)]
    assert len(blocks) == 2
    for block in blocks:
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = blocks[0].pw.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, blocks[0].pw.weight)


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_gradients_match_contiguous(train: bool) -> None:
    block = random_block(16, 4, seed=4).train(train)
    x = torch.randn(3, 16, 6, 5)
    expected = grads(copy.deepcopy(block), x, call)
    found = grads(block, x.contiguous(memory_format=torch.channels_last), call)
    assert_grads_match(found, expected, 1e-4, train)


@pytest.mark.parametrize("train", [False, True])
def test_meta_device_forward_and_backward(train: bool) -> None:
    block = ULSAM(24, 4).to("meta").train(train)
    x = torch.empty(2, 24, 7, 7, device="meta", requires_grad=True)
    out = block(x)
    out.sum().backward()
    assert out.shape == x.shape and out.device.type == "meta"
    assert x.grad is not None and x.grad.shape == x.shape
    assert block.pw.weight.grad is not None and block.pw.weight.grad.shape == (4, 6, 1, 1)


# -- CUDA (skipped without a GPU) ----------------------------------------------------------


CUDA_SANITY = {torch.float32: 0.03, torch.float16: 0.1, torch.bfloat16: 0.3}
"""Bounds on the relative error of CUDA gradients against float64: a sanity check on
PyTorch's own fp16/bf16/TF32 kernels, which the block's CUDA training path is. Seen on an
H200 (torch 2.11): fp16 0.054 (a conv bias), bf16 0.222 (a BatchNorm bias)."""


@cuda
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(train: bool, dtype: torch.dtype) -> None:
    block = random_block(64, 4, seed=5).train(train)
    x = torch.randn(8, 64, 14, 14)
    exact = grads(copy.deepcopy(block).double(), x.double(), call)
    gpu_block = block.cuda().to(dtype)
    gpu_x = x.cuda().to(dtype)
    if not train:
        with torch.no_grad():
            assert path_of(gpu_block, gpu_x) is BlockPath.CUDA_FUSED
            out = gpu_block(gpu_x)
            assert out.dtype == dtype
            error = relative_error(out, exact["out"])
            assert error <= TOLERANCE[dtype] / 10, f"eval output: error {error:.3g}"
    found = grads(gpu_block, gpu_x, call)
    plain = grads(copy.deepcopy(gpu_block), gpu_x, lambda b, inp: b.forward_plain(inp))
    assert_grads_match(found, plain, 1e-6, train)  # the default path is the plain ops here
    assert_grads_match(found, exact, CUDA_SANITY[dtype], train)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_cuda_autocast_matches_float64(dtype: torch.dtype, train: bool) -> None:
    block = random_block(64, 4, seed=6).train(train)
    x = torch.randn(8, 64, 14, 14)
    exact = grads(copy.deepcopy(block).double(), x.double(), call)

    def autocast(b: ULSAM, inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return call(b, inp)

    found = grads(block.cuda(), x.cuda(), autocast)
    assert_grads_match(found, exact, CUDA_SANITY[dtype], train)


@cuda
def test_cuda_retrofit_trains_under_autocast() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    model = inject(net, at=["features.13", "features.16"], input_size=(3, 64, 64)).model
    model = model.cuda().train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.arange(8, device="cuda") % 10
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)

"""The ULSAM block itself: arguments, fast paths against the plain computation, caching,
and the tools that must see through it (torch.fx, torch.compile, torch.export, pickling)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from block_helpers import close, plain, random_block
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import ulsam_inject.block.inference as inference_module
import ulsam_inject.block.training as training_module
from ulsam_inject.block.module import (
    DEFAULT_MOMENTUM,
    REFERENCE_MOMENTUM,
    ULSAM,
    check_groups,
    divisors,
)
from ulsam_inject.errors import BlockConfigError, UlsamUsageError

STATE_KEYS = [
    "dw.weight",
    "dw.bias",
    "dw_bn.weight",
    "dw_bn.bias",
    "dw_bn.running_mean",
    "dw_bn.running_var",
    "dw_bn.num_batches_tracked",
    "pw.weight",
    "pw.bias",
    "pw_bn.weight",
    "pw_bn.bias",
    "pw_bn.running_mean",
    "pw_bn.running_var",
    "pw_bn.num_batches_tracked",
]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- arguments -----------------------------------------------------------------------------


def test_divisors_and_check_groups() -> None:
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]
    check_groups(96, 16)
    with pytest.raises(BlockConfigError, match=r"at features\.3"):
        check_groups(96, 5, where="features.3")


@pytest.mark.parametrize(
    ("channels", "groups", "message"),
    [
        (96, 5, "groups=5 does not divide channels=96; valid groups: 1, 2, 3, 4, 6, 8, 12, 16, 24"),
        (10, 0, "groups=0 does not divide channels=10; valid groups: 1, 2, 5, 10"),
        (10, -2, "groups=-2 does not divide channels=10; valid groups: 1, 2, 5, 10"),
        (10, 2.0, "groups=2.0 does not divide channels=10"),
        (10, True, "groups=True does not divide channels=10"),
        (0, 1, "channels must be a positive integer, got 0"),
        (-4, 2, "channels must be a positive integer, got -4"),
    ],
)
def test_bad_constructor_arguments(channels: int, groups: int, message: str) -> None:
    with pytest.raises(BlockConfigError) as info:
        ULSAM(channels, groups)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UlsamUsageError)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (8, 5, 5),
            "expects a 4-D (batch, channels, height, width) input, got 3-D shape (8, 5, 5)",
        ),
        ((1, 8, 5, 5, 1), "got 5-D shape (1, 8, 5, 5, 1)"),
        ((2, 6, 5, 5), "built for 8 channels, got an input with 6 channels (shape (2, 6, 5, 5))"),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_bad_inputs(shape: tuple[int, ...], message: str, train: bool) -> None:
    block = ULSAM(8, 2).train(train)
    with pytest.raises(BlockConfigError) as info:
        block(torch.randn(shape))
    assert message in str(info.value)


def test_training_needs_two_values_per_channel() -> None:
    """As the reference (BatchNorm's own check), and before any statistics move."""
    block = ULSAM(8, 2).train()
    before = copy.deepcopy(block.state_dict())
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 8, 1, 1\)"):
        block(torch.randn(1, 8, 1, 1))
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key
    block.eval()(torch.randn(1, 8, 1, 1))  # fine on running statistics


def test_default_momentum_is_pytorchs() -> None:
    """New blocks: 0.1 (PyTorch's convention); the reference's 0.9 only when converted."""
    block = ULSAM(16, 4)
    assert DEFAULT_MOMENTUM == 0.1 and REFERENCE_MOMENTUM == 0.9
    assert block.dw_bn.momentum == 0.1 and block.pw_bn.momentum == 0.1
    assert "0.1" in (ULSAM.__doc__ or "") and "0.9" in (ULSAM.__doc__ or "")
    x = torch.randn(4, 16, 5, 5) * 2 + 3
    block.train()(x)
    dw = block.dw(x)
    expected = 0.9 * torch.zeros(16) + 0.1 * dw.mean((0, 2, 3))
    assert block.dw_bn.running_mean is not None
    assert close(block.dw_bn.running_mean, expected, 1e-6)
    assert ULSAM(16, 4, momentum=0.5).pw_bn.momentum == 0.5


def test_repr_and_parameter_count() -> None:
    block = ULSAM(512, 4)
    assert "channels=512, groups=4" in repr(block)
    assert sum(p.numel() for p in block.parameters()) == 5 * 512 + 3 * 4
    assert tuple(block.pw.weight.shape) == (4, 128, 1, 1)


# -- fast paths against the plain computation ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4, 8]),
    width=st.integers(1, 3),
    batch=st.integers(1, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_inference_path_equals_plain(
    groups: int, width: int, batch: int, h: int, w: int, seed: int
) -> None:
    """Folded BN + separable pool + matmul (no grad) vs the unfolded modules in eval mode."""
    block = random_block(groups * width, groups, seed).double().eval()
    x = torch.randn(batch, groups * width, h, w, dtype=torch.float64)
    with torch.no_grad():
        assert close(streaming(block, x), plain(block, x), 1e-12)


def test_inference_path_in_chunks_equals_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches larger than one chunk (and a last, partial chunk)."""
    monkeypatch.setattr(inference_module, "CHUNK_ELEMENTS", 3 * 16 * 5 * 4)
    block = random_block(16, 4, 1).double().eval()
    x = torch.randn(7, 16, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert close(streaming(block, x), plain(block, x), 1e-12)
        x = x.contiguous(memory_format=torch.channels_last)
        assert close(streaming(block, x), plain(block, x), 1e-12)


def streaming(block: ULSAM, x: torch.Tensor) -> torch.Tensor:
    """The CPU streaming path on ``x`` whatever its dtype (dispatch takes it for float32
    only; float64 here lets the comparison with the plain computation be tight)."""
    return inference_module.inference_forward(
        x, inference_module.folded(block, inference_module.fold_sources(block))
    )


def check_autograd_path(
    block: ULSAM, x: torch.Tensor, *, tol: float = 1e-11, input_grad: bool = True
) -> None:
    """Output, input and parameter gradients and buffers of the CPU training path (called
    directly: dispatch takes it for float32 only) vs forward_plain."""
    block.zero_grad()
    twin = copy.deepcopy(block)
    a = x.clone().requires_grad_(input_grad)
    b = x.clone().requires_grad_(input_grad)
    out_fast = block._forward_autograd(a)
    out_plain = plain(twin, b)
    assert close(out_fast, out_plain, tol)
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    if input_grad:
        assert a.grad is not None and b.grad is not None
        assert close(a.grad, b.grad, tol)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None and q.grad is not None:
            assert close(p.grad, q.grad, tol), name
    for (name, u), v in zip(block.state_dict().items(), twin.state_dict().values()):
        assert close(u, v, tol), name


def test_inference_workspaces_are_per_shape_and_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workspaces kept between calls: shapes that alternate (more of them than are kept),
    and threads running blocks at once, each get right results."""
    monkeypatch.setattr(inference_module, "WORKSPACES", 2)
    blocks = [random_block(c, 4, c).double().eval() for c in (8, 12, 16)]
    inputs = [torch.randn(b, blk.channels, h, w, dtype=torch.float64)
              for blk, (b, h, w) in zip(blocks, [(2, 5, 4), (1, 3, 7), (3, 6, 6)])]  # fmt: skip
    expected = [plain(blk, x) for blk, x in zip(blocks, inputs)]
    with torch.no_grad():
        for _ in range(2):
            for blk, x, want in zip(blocks, inputs, expected):
                assert close(streaming(blk, x), want, 1e-12)

    # Threads on one block and one shape, each with its own input: one workspace shared
    # between them would mix their planes.
    block = blocks[2]
    own = [torch.randn(2, 16, 24, 24, dtype=torch.float64) for _ in range(3)]
    wanted = [plain(block, x) for x in own]

    def run(i: int) -> bool:
        with torch.no_grad():
            return all(close(streaming(block, own[i]), wanted[i], 1e-12) for _ in range(30))

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(run, [0, 1, 2]))


def test_a_workspace_made_under_inference_mode_serves_calls_outside_it() -> None:
    """Evaluation under ``torch.inference_mode`` then under ``no_grad`` (the order a test
    suite or a user's notebook takes) reuses the workspace: it must accept writes."""
    block = random_block(8, 4, 8).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    want = plain(block, x)
    with torch.inference_mode():
        assert close(streaming(block, x), want, 1e-12)
    with torch.no_grad():
        assert close(streaming(block, x), want, 1e-12)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4, 8]),
    width=st.integers(1, 3),
    batch=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_autograd_path_equals_plain(
    groups: int, width: int, batch: int, h: int, w: int, train: bool, seed: int
) -> None:
    if train and batch * h * w < 2:
        return
    block = random_block(groups * width, groups, seed).double().train(train)
    check_autograd_path(block, torch.randn(batch, groups * width, h, w, dtype=torch.float64))


@pytest.mark.parametrize("train", [True, False])
def test_autograd_path_in_chunks_equals_plain(monkeypatch: pytest.MonkeyPatch, train: bool) -> None:
    """The streaming passes of the training function over several chunks, the last partial."""
    monkeypatch.setattr(training_module, "CHUNK_ELEMENTS", 2 * 12 * 4 * 5)
    block = random_block(12, 3, 11).double().train(train)
    check_autograd_path(block, torch.randn(5, 12, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "setup",
    [
        lambda b: b.dw_bn.eval(),  # frozen BatchNorm statistics inside a training block
        lambda b: b.pw_bn.eval(),
        lambda b: setattr(b.dw_bn, "momentum", None),  # cumulative moving average
        lambda b: setattr(b.dw_bn, "track_running_stats", False),
        lambda b: [p.requires_grad_(False) for p in b.dw.parameters()],
        lambda b: b.pw.weight.requires_grad_(False),
    ],
    ids=["dw_bn-eval", "pw_bn-eval", "momentum-None", "untracked", "dw-frozen", "pw-frozen"],
)
def test_autograd_path_respects_batchnorm_settings(setup: Callable[[ULSAM], object]) -> None:
    block = random_block(12, 3, 2).double().train()
    setup(block)
    for _ in range(2):
        check_autograd_path(block, torch.randn(2, 12, 4, 5, dtype=torch.float64))


def test_gradients_without_input_gradient_and_in_eval_mode() -> None:
    block = random_block(12, 4, 3).double()
    x = torch.randn(2, 12, 4, 5, dtype=torch.float64)
    check_autograd_path(block.train(), x, input_grad=False)
    check_autograd_path(block.eval(), x)  # eval with gradients: running statistics, no fold


def test_no_grad_and_grad_paths_agree() -> None:
    """The same block, same input: no_grad, inference_mode, with grad; eval and train."""
    block = random_block(32, 4, 4).eval()
    x = torch.randn(3, 32, 6, 7)
    with torch.no_grad():
        no_grad = block(x)
    with torch.inference_mode():
        inference = block(x)
    with_grad = block(x.clone().requires_grad_())
    frozen = copy.deepcopy(block).requires_grad_(False)(x)  # grad mode, nothing needs it
    assert close(no_grad, with_grad, 1e-6) and close(no_grad, inference, 0)
    assert close(no_grad, frozen, 0) and close(no_grad, plain(block, x), 1e-5)
    trained = copy.deepcopy(block).train()
    with torch.no_grad():
        out_no_grad = trained(x)
    out_grad = block.train()(x.clone().requires_grad_())
    assert close(out_no_grad, out_grad, 1e-6)
    for key, value in trained.state_dict().items():
        assert close(value, block.state_dict()[key], 0), key


def test_memory_format_is_kept() -> None:
    block = random_block(16, 4, 5)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    for train in (False, True):
        block.train(train)
        with torch.no_grad():
            out = block(x)
        out_grad = block(x.clone().requires_grad_())
        for result in (out, out_grad):
            assert result.is_contiguous(memory_format=torch.channels_last)
            assert close(result, plain(copy.deepcopy(block).eval(), x), 1e-5) or train
    block.eval()
    y = torch.randn(2, 16, 5, 6)
    assert block(y).is_contiguous()
    a = y.clone().requires_grad_()
    block.train()(a).sum().backward()
    assert a.grad is not None and a.grad.is_contiguous()


def test_double_backward_is_refused_clearly() -> None:
    block = ULSAM(8, 2).train()
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# -- the folded-parameter cache ------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.dw.weight.mul_(-2),
        lambda b: b.pw.bias.add_(1),
        lambda b: b.dw_bn.running_var.mul_(3),
        lambda b: b.pw_bn.running_mean.add_(0.5),
        lambda b: setattr(b.dw_bn, "eps", 0.5),
        lambda b: setattr(b.pw.weight, "data", b.pw.weight.data * 3),
        lambda b: b.load_state_dict(random_block(16, 4, 9).state_dict()),
        lambda b: setattr(b, "dw_bn", random_block(16, 4, 9).dw_bn),
    ],
    ids=["inplace", "bias", "running-var", "running-mean", "eps", "data", "load", "submodule"],
)
def test_cache_sees_every_change(change: Callable[[ULSAM], object]) -> None:
    block = random_block(16, 4, 6).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        before = block(x)
        change(block)
        after = block(x)
        expected = plain(block, x)
    assert close(after, expected, 1e-5) and not close(after, before, 1e-3)


def test_cache_follows_training_and_dtype_changes() -> None:
    block = random_block(16, 4, 7)
    x = torch.randn(4, 16, 5, 5)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            block.eval()(x)
        block.train()(x).pow(2).mean().backward()
        opt.step()
        block.eval()
        with torch.no_grad():
            assert close(block(x), plain(block, x), 1e-5)
    block.double()
    with torch.no_grad():
        out = block(x.double())
    assert out.dtype == torch.float64 and close(out, plain(block, x.double()), 1e-12)


def test_cache_is_not_state() -> None:
    """Nothing but the declared parameters and buffers: state_dict, pickling, deepcopy."""
    block = random_block(16, 4, 8).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = block(x)  # fills the cache
    assert list(block.state_dict()) == STATE_KEYS
    assert set(vars(block)) - set(vars(ULSAM(16, 4))) == set()
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        with torch.no_grad():
            assert torch.equal(other(x), expected)
            other.dw.weight.mul_(2)  # the copy has its own weights...
            assert torch.equal(block(x), expected)  # ...and the original is untouched
            assert close(other(x), plain(other, x), 1e-5)


def test_state_dict_round_trip() -> None:
    block = random_block(24, 6, 10)
    fresh = ULSAM(24, 6)
    fresh.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 24, 5, 5)
    for train in (False, True):
        assert torch.equal(fresh.train(train)(x), block.train(train)(x))
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    again = ULSAM(24, 6)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(again.eval()(x), block.eval()(x))


# -- tools that look through the block -------------------------------------------------------


def small_model(channels: int = 8, groups: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), random_block(channels, groups))
    return model.eval()


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ULSAM) or super().is_leaf_module(m, module_qualified_name)


def test_fx_leaf() -> None:
    """With ULSAM as a leaf (how the surgery code traces), the graph calls it as a module,
    and the traced model runs the block's own code in train and eval mode."""
    model = small_model()
    graph = LeafTracer().trace(model)
    traced = fx.GraphModule(model, graph)
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in calls] == ["0", "1"]
    assert isinstance(traced.get_submodule("1"), ULSAM)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(traced(x), model(x))
    traced.train()
    model.train()
    assert close(traced(x), model(x), 1e-6)


def test_fx_default_trace_inlines_the_plain_computation() -> None:
    """Plain ``symbolic_trace`` goes through the block: its modules become graph calls."""
    model = small_model()
    traced = fx.symbolic_trace(model)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    assert {"1.dw", "1.dw_bn", "1.pw", "1.pw_bn"} <= targets
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert close(traced(x), model(x), 1e-5)


def test_flop_counter_sees_the_convolutions() -> None:
    """Dispatch modes see the plain ops: 2*C*H*W multiply-adds per sample, as documented."""
    block = ULSAM(32, 4).eval()
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(2, 32, 7, 5))
    assert counter.get_total_flops() == 2 * (2 * 2 * 32 * 7 * 5)


def test_torch_export_eval() -> None:
    model = small_model(16, 4)
    x = torch.randn(2, 3, 7, 5)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.conv2d.default", "aten.max_pool2d.default", "aten.softmax.int"} <= targets
    y = torch.randn(2, 3, 7, 5)  # exported for this shape: other values, same shape
    with torch.no_grad():
        assert close(program.module()(y), model(y), 1e-5)


def test_torch_compile_eval() -> None:
    """Inductor on CPU (generated C++): the compiled block gives the eager block's output."""
    block = random_block(16, 4, 11).eval()
    x = torch.randn(2, 16, 6, 5)
    compiled = torch.compile(block)
    with torch.no_grad():
        assert close(compiled(x), block(x), 1e-5)


def test_torch_compile_train_step() -> None:
    """A training step through dynamo and AOT autograd (``aot_eager``: inductor's front end
    without the C++ compile): gradients and running statistics as in eager mode."""
    block = random_block(16, 4, 12).double().train()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    compiled(a).pow(2).sum().backward()
    eager(b).pow(2).sum().backward()
    assert a.grad is not None and b.grad is not None and close(a.grad, b.grad, 1e-10)
    for (name, p), q in zip(block.named_parameters(), eager.parameters()):
        assert p.grad is not None and q.grad is not None and close(p.grad, q.grad, 1e-10), name
    for (name, u), v in zip(block.state_dict().items(), eager.state_dict().values()):
        assert close(u, v, 1e-12), name


def test_attention_maps_are_the_ones_forward_applies() -> None:
    torch.manual_seed(0)
    block = ULSAM(12, groups=3).eval()
    x = torch.randn(2, 12, 5, 6)
    maps = block.attention_maps(x)
    assert maps.shape == (2, 3, 5, 6)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 3))
    scale = 1 + maps.repeat_interleave(4, dim=1)
    torch.testing.assert_close(block.forward_plain(x), x * scale)
    with pytest.raises(BlockConfigError, match="built for 12 channels"):
        block.attention_maps(torch.randn(1, 8, 5, 5))

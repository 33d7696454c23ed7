"""measure_latency: original and retrofitted side by side, interleaved, models unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from ulsam_inject import ULSAM, inject, measure_latency
from ulsam_inject.errors import InputSizeError, UlsamUsageError
from ulsam_inject.measure.bench import LatencyReport, Timing, _timing

SIZE = (3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A tiny model that logs each call (its label and the input's shape) in ``log``."""

    def __init__(self, label: str, log: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        self.label = label
        self.log = log
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.label, tuple(x.shape)))
        return self.drop(self.bn(self.conv(x)))


def tiny_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    before = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    after = nn.Sequential(*before, ULSAM(16, groups=4))
    return before, after


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_report_fields_and_ratio() -> None:
    before, after = tiny_pair()
    report = measure_latency(
        before, after, SIZE, batch=2, warmup=1, repeats=5, threads=1, device="cpu"
    )
    assert isinstance(report, LatencyReport)
    assert (report.device, report.threads, report.batch, report.input_size) == ("cpu", 1, 2, SIZE)
    for timing in (report.before, report.after):
        assert timing.samples == 5
        assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert report.ratio == report.after.median_ms / report.before.median_ms
    document = json.loads(json.dumps(report.to_dict()))
    assert document["schema"] == "ulsam-inject.bench/1"
    assert document["ratio"] == pytest.approx(report.ratio)
    assert document["input_size"] == list(SIZE)
    assert set(document["before"]) == {"median_ms", "p10_ms", "p90_ms", "samples"}


@pytest.mark.slow  # times a whole MobileNetV2 before and after
def test_retrofitted_mobilenet_against_its_original() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None, width_mult=0.25)
    result = inject(net, at="features.13", input_size=(3, 64, 64), report=False)
    report = measure_latency(net, result.model, (3, 64, 64), warmup=1, repeats=2, threads=1)
    assert report.before.samples == report.after.samples == 2
    for timing in (report.before, report.after):
        # Percentiles are of the samples themselves; the median of two is their mean.
        assert 0 < timing.p10_ms <= timing.p90_ms and timing.median_ms > 0
    assert report.ratio == pytest.approx(report.after.median_ms / report.before.median_ms)


def test_runs_are_interleaved_after_warmup_with_the_batch_asked_for() -> None:
    log: list[tuple[str, tuple[int, ...]]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    measure_latency(a, b, SIZE, batch=3, device="cpu", warmup=2, repeats=4)  # not a copy
    assert all(shape == (3, *SIZE) for _, shape in log)
    order = "".join(label for label, _ in log)
    assert order == "abab" + "ab" + "ba" + "ab" + "ba"


def test_progress_is_reported_after_each_timed_pair() -> None:
    calls: list[tuple[int, int]] = []
    before, after = tiny_pair()
    measure_latency(before, after, SIZE, warmup=0, repeats=3, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_models_are_not_changed() -> None:
    before, after = tiny_pair()
    before.train()
    after.train()
    after[1].eval()  # a mixed model: each flag comes back as it was
    flags = [[m.training for m in model.modules()] for model in (before, after)]
    states = [snapshot(before), snapshot(after)]
    grads = [p.requires_grad for p in after.parameters()]
    rng = torch.get_rng_state()
    measure_latency(before, after, SIZE, batch=4, warmup=2, repeats=3)
    assert [[m.training for m in model.modules()] for model in (before, after)] == flags
    for model, state in zip((before, after), states):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key  # BN running stats untouched
    assert [p.requires_grad for p in after.parameters()] == grads
    assert all(p.grad is None for p in after.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream too
    assert torch.is_grad_enabled()


def test_flags_and_threads_restored_when_a_model_fails() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    before, _ = tiny_pair()
    before.train()
    broken = Broken().train()
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(before, broken, SIZE, threads=threads + 1, warmup=1, repeats=1)
    assert before.training and broken.training
    assert all(m.training for m in before.modules())
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_threads_are_set_for_the_run_and_restored(threads: int) -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x * 2

    torch.set_num_threads(3)
    report = measure_latency(Probe(), Probe(), SIZE, threads=threads, warmup=1, repeats=2)
    assert report.threads == threads
    assert set(seen) == {threads}
    assert torch.get_num_threads() == 3


def test_default_threads_are_torchs() -> None:
    before, after = tiny_pair()
    report = measure_latency(before, after, SIZE, warmup=0, repeats=1)
    assert report.threads == torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch": 0},
        {"repeats": 0},
        {"warmup": -1},
        {"threads": 0},
        {"device": "no-such-device"},
        {"device": "meta"},
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict[str, object]) -> None:
    before, after = tiny_pair()
    with pytest.raises(UlsamUsageError, match=r"must be >= 1|device"):
        measure_latency(before, after, SIZE, **kwargs)  # type: ignore[arg-type]


def test_bad_input_size() -> None:
    before, after = tiny_pair()
    with pytest.raises(InputSizeError, match=r"input size must be \(channels, height, width\)"):
        measure_latency(before, after, (3, 32), repeats=1)  # type: ignore[arg-type]


def test_auto_device_is_cuda_where_available() -> None:
    before, after = tiny_pair()
    report = measure_latency(before, after, SIZE, warmup=0, repeats=1)
    assert report.device.split(" ")[0] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error() -> None:
    before, after = tiny_pair()
    with pytest.raises(UlsamUsageError, match="CUDA is not available"):
        measure_latency(before, after, SIZE, device="cuda", repeats=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_leaves_the_cpu_models_alone() -> None:
    before, after = tiny_pair()
    before.train()
    report = measure_latency(before, after, SIZE, device="cuda", batch=2, warmup=2, repeats=3)
    assert report.device.startswith("cuda")
    assert report.before.samples == 3 and report.after.median_ms > 0
    assert all(p.device.type == "cpu" for p in (*before.parameters(), *after.parameters()))
    assert before.training


def test_timing_statistics() -> None:
    samples = [i / 1e3 for i in range(1, 12)]  # 1 ... 11 ms, shuffled
    timing = _timing(samples[5:] + samples[:5])
    assert timing == Timing(median_ms=pytest.approx(6.0), p10_ms=2.0, p90_ms=10.0, samples=11)
    single = _timing([0.004])
    assert single.median_ms == single.p10_ms == single.p90_ms == pytest.approx(4.0)

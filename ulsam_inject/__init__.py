"""ulsam_inject: retrofit ULSAM attention into compact pretrained CNNs with torch.fx.

Example:
    >>> import torch, torchvision
    >>> from ulsam_inject import inject
    >>> result = inject(torchvision.models.mobilenet_v2().eval(), at="features.13")
    >>> result.model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from ulsam_inject import errors
from ulsam_inject.block.module import ULSAM
from ulsam_inject.cost.count import Cost, count
from ulsam_inject.errors import UlsamError, UlsamUsageError
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import Traced
from ulsam_inject.heatmaps import Explanation, explain
from ulsam_inject.io.artifact import export_program, load, load_retrofit, read_recipe, save
from ulsam_inject.io.onnx_export import export_onnx
from ulsam_inject.measure.bench import LatencyReport, measure_latency
from ulsam_inject.surgery.inject import Retrofit, inject
from ulsam_inject.surgery.plan import Placement, Plan, make_plan
from ulsam_inject.surgery.positions import resolve_positions
from ulsam_inject.surgery.report import Report
from ulsam_inject.surgery.seeing import find_stages, trace_model
from ulsam_inject.sweeps.run import SweepResult, sweep
from ulsam_inject.train import EvaluateReport, FinetuneResult, evaluate, finetune

__all__ = [
    "ULSAM",
    "Cost",
    "EvaluateReport",
    "Explanation",
    "FinetuneResult",
    "LatencyReport",
    "Placement",
    "Plan",
    "Report",
    "Retrofit",
    "Stage",
    "SweepResult",
    "Traced",
    "UlsamError",
    "UlsamUsageError",
    "count",
    "errors",
    "evaluate",
    "explain",
    "export_onnx",
    "export_program",
    "find_stages",
    "finetune",
    "inject",
    "load",
    "load_retrofit",
    "make_plan",
    "measure_latency",
    "read_recipe",
    "resolve_positions",
    "save",
    "sweep",
    "trace_model",
]
__version__ = "0.1.0"

"""ulsam_inject: retrofit ULSAM attention into compact pretrained CNNs with torch.fx.

Example:
    >>> import torch, torchvision
    >>> from ulsam_inject import inject
    >>> result = inject(torchvision.models.mobilenet_v2().eval(), at="features.13")
    >>> result.model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from . import errors
from .artifact import export_program, load, save
from .bench import LatencyReport, measure_latency
from .block import ULSAM
from .cost import Cost, count
from .errors import UlsamError, UlsamUsageError
from .inject import Retrofit, inject
from .plan import Placement, Plan, make_plan
from .positions import resolve_positions
from .report import Report
from .stages import Stage, find_stages
from .trace import Traced, trace_model

__all__ = [
    "ULSAM",
    "Cost",
    "LatencyReport",
    "Placement",
    "Plan",
    "Report",
    "Retrofit",
    "Stage",
    "Traced",
    "UlsamError",
    "UlsamUsageError",
    "count",
    "errors",
    "export_program",
    "find_stages",
    "inject",
    "load",
    "make_plan",
    "measure_latency",
    "resolve_positions",
    "save",
    "trace_model",
]
__version__ = "0.1.0"

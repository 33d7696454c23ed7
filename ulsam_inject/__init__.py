"""ulsam_inject: retrofit ULSAM attention into compact pretrained CNNs with torch.fx."""

from .block import ULSAM
from .errors import UlsamError, UlsamUsageError

__all__ = ["ULSAM", "UlsamError", "UlsamUsageError"]
__version__ = "0.1.0"

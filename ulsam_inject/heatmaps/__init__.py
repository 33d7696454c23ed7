"""Explaining models: heat maps (grad-cam's CAM methods) and ULSAM's own attention maps.

:func:`explain` runs them for several models on several images and draws one figure;
``ulsam-inject explain`` is its command. Needs ``pip install 'ulsam-inject[explain]'``
(grad-cam and matplotlib), imported only when a map is computed or drawn.
"""

from ulsam_inject.heatmaps.explanation import (
    Explanation,
    ModelMap,
    Prediction,
    Subject,
    explain,
    explain_subjects,
)
from ulsam_inject.heatmaps.maps import METHODS, MapStats

__all__ = [
    "METHODS",
    "Explanation",
    "MapStats",
    "ModelMap",
    "Prediction",
    "Subject",
    "explain",
    "explain_subjects",
]

"""The ULSAM block: the module, the authors' per-subspace layout, and its execution paths.

Knows nothing of graphs or models. :class:`ULSAM` lives in :mod:`.module`; the reference
layout in :mod:`.reference`; the eager inference and training paths in :mod:`.inference`
and :mod:`.training`; the separable 3x3 max in :mod:`.maxpool`.
"""

from ulsam_inject.block.module import ULSAM

__all__ = ["ULSAM"]

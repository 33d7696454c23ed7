"""Fine-tuning and evaluation on top of the surgery: data configs, schedule, loops, torchrun.

``finetune(model, train_data, val_data, **settings) -> FinetuneResult`` and
``evaluate(models, data) -> EvaluateReport`` work on any map-style datasets; the CLI's
``finetune`` and ``evaluate`` commands are thin layers over them.
"""

from ulsam_inject.train.evaluate import EvaluateReport, evaluate
from ulsam_inject.train.finetune import EpochRecord, FinetuneResult, FinetuneSettings, finetune

__all__ = [
    "EpochRecord",
    "EvaluateReport",
    "FinetuneResult",
    "FinetuneSettings",
    "evaluate",
    "finetune",
]

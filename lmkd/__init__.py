"""lmkd: knowledge distillation for Hugging Face language models."""

from lmkd.core.errors import LmkdError
from lmkd.models.loading import import_deepspeed_only_when_used
from lmkd.models.student import make_student
from lmkd.train.config import DistillationConfig
from lmkd.train.trainer import DistillationTrainer

import_deepspeed_only_when_used()  # saving or training a model imports DeepSpeed only when a run uses it

__all__ = ["DistillationConfig", "DistillationTrainer", "LmkdError", "make_student"]
__version__ = "0.1.0"

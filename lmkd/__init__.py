"""lmkd: knowledge distillation for Hugging Face language models."""

from .config import DistillationConfig
from .errors import LmkdError
from .modeling import import_deepspeed_only_when_used
from .student import make_student
from .trainer import DistillationTrainer

import_deepspeed_only_when_used()  # saving or training a model imports DeepSpeed only when a run uses it

__all__ = ["DistillationConfig", "DistillationTrainer", "LmkdError", "make_student"]
__version__ = "0.1.0"

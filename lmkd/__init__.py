"""lmkd: knowledge distillation for Hugging Face language models."""

from .config import DistillationConfig
from .errors import LmkdError
from .student import make_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "LmkdError", "make_student"]
__version__ = "0.1.0"

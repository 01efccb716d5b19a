"""DistillationConfig: the Seq2SeqTrainingArguments of an ordinary HF run plus the KD fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments

from .errors import LmkdError
from .losses import KD_LOSSES

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
MLM_KD_POSITIONS = ("all", "masked")


@dataclass
class DistillationConfig(Seq2SeqTrainingArguments):
    """Training arguments for :class:`lmkd.DistillationTrainer`.

    Everything of ``Seq2SeqTrainingArguments`` (learning rate, batch size, bf16, ...) plus the
    knowledge-distillation fields below.  The loss per step is::

        (1 - kd_alpha) * CE(labels, student) / n_ce  +  kd_alpha * KD(teacher, student) / n_kd

    with ``n_ce``/``n_kd`` the number of positions each term is taken over in the whole
    (accumulated, all-process) batch.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher checkpoint (hub id or local dir). Not needed when a model object is "
                          "passed to DistillationTrainer(teacher_model=...) or when kd_alpha is 0."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "dtype the frozen teacher runs in: auto (the student's), float32, bfloat16 or float16. "
                          "A lower precision halves teacher memory; softmaxes stay in float32."},
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "Token-level divergence: forward_kl (Hinton), reverse_kl, jsd (generalized JSD, "
                          "see jsd_beta) or mse (logit matching)."},
    )
    kd_alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the KD term in [0, 1]; 1 - kd_alpha weights hard-label CE. "
                          "0 = plain fine-tuning with no teacher forward (the baseline), 1 = KD only."},
    )
    kd_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature tau > 0 for the KL losses; the KD term is scaled by tau^2 "
                          "so its gradient keeps its size (Hinton). DistilBERT used 2."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "beta of the generalized JSD in [0, 1]: 0 = forward KL, 1 = reverse KL (TRL/GKD)."},
    )
    mlm_kd_positions: str = field(
        default="all",
        metadata={"help": "Masked LM only: distil on all non-padding positions (all, as DistilBERT) or only "
                          "on the masked ones (masked). CE is always on the masked positions."},
    )

    def __post_init__(self):
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise LmkdError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}; it weights KD against CE")
        if not self.kd_temperature > 0:
            raise LmkdError(f"kd_temperature must be > 0, got {self.kd_temperature}; 1 is the plain softmax, "
                            "DistilBERT used 2")
        if self.kd_loss not in KD_LOSSES:
            raise LmkdError(f"unknown kd_loss {self.kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise LmkdError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise LmkdError(f"unknown teacher_dtype {self.teacher_dtype!r}; choose one of {', '.join(TEACHER_DTYPES)}")
        if self.mlm_kd_positions not in MLM_KD_POSITIONS:
            raise LmkdError(f"unknown mlm_kd_positions {self.mlm_kd_positions!r}; choose all or masked")
        super().__post_init__()

"""Teacher ensembles: several frozen teachers acting as one (:class:`EnsembleTeacher`, whose
logits are those of the weighted average of the teachers' softened distributions), and
:func:`load_teacher`, which builds one from a run's comma-separated ``teacher_model_name_or_path``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from lmkd.core.errors import LmkdError
from lmkd.losses import at_least_float32
from lmkd.models.loading import load_model, load_tokenizer, model_kind
from lmkd.models.vocabulary import shared_vocab_size, vocab_size_of
from lmkd.teacher.frozen import check_teacher_kind, forward_at_floor, teacher_paths

logger = logging.getLogger(__name__)


@dataclass
class EnsembleOutput(ModelOutput):
    """What :class:`EnsembleTeacher` returns: the logits of the mixed distribution.

    Attributes:
        logits: ``tau * log(sum_i w_i * softmax(z_i / tau))``, float32 at least.
    """

    logits: torch.Tensor | None = None


class EnsembleTeacher(nn.Module):
    """Several frozen teachers acting as one: ``forward`` returns the logits

        tau * log( sum_i w_i * softmax(z_i / tau) )

    so a temperature-``tau`` KD loss (forward/reverse KL, JSD) sees exactly the weighted average of
    the teachers' softened distributions (``softmax(logits / tau)`` is that average).  Logit
    matching (``kd_loss: mse``) is refused: the average of distributions is not an average of
    logits.  Each teacher is checked against the student's vocabulary by :func:`load_teacher`.

    Args:
        teachers: at least two frozen teachers, of one model kind with one output size.
        weights: one weight > 0 per teacher, normalised to sum 1 (None: equal).
        temperature: ``tau``; must be the trainer's ``kd_temperature``.

    Raises:
        LmkdError: fewer than two teachers, bad weights, a temperature <= 0, mixed kinds or
            output sizes.
    """

    def __init__(self, teachers, weights=None, *, temperature: float):
        super().__init__()
        teachers = list(teachers)
        if len(teachers) < 2:
            raise LmkdError("a teacher ensemble needs at least two teachers")
        weights = [1.0] * len(teachers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(teachers) or any(not w > 0 for w in weights):
            raise LmkdError(
                f"give one weight > 0 per teacher ({len(teachers)} teachers, weights {weights})"
            )
        if not temperature > 0:
            raise LmkdError(f"temperature must be > 0, got {temperature}")
        kinds = {model_kind(t) for t in teachers}
        if len(kinds) > 1:
            raise LmkdError(
                f"the ensemble mixes model kinds ({', '.join(sorted(kinds))}); use teachers of one kind"
            )
        sizes = [vocab_size_of(t) for t in teachers]
        if len(set(sizes)) > 1:
            raise LmkdError(
                f"the ensemble's teachers have different output sizes {sizes}; use teachers with one "
                "vocabulary (or label set) of one size"
            )
        self.teachers = nn.ModuleList(teachers)
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.temperature = float(temperature)
        self.lmkd_kind = kinds.pop()  # lmkd.models.loading.model_kind reads this
        for t in teachers:
            forward_at_floor(t)

    @property
    def config(self):
        return self.teachers[0].config

    def get_output_embeddings(self):
        return self.teachers[0].get_output_embeddings()

    def prepare_decoder_input_ids_from_labels(self, labels):
        """The decoder inputs the first teacher builds from ``labels`` (seq2seq).

        Args:
            labels: ``(B, T)`` label ids.

        Returns:
            The first teacher's decoder input ids.
        """
        return self.teachers[0].prepare_decoder_input_ids_from_labels(labels=labels)

    def forward(self, **inputs) -> EnsembleOutput:
        """The logits of the teachers' mixed softened distribution.

        Args:
            **inputs: the batch, passed to every teacher.

        Returns:
            An :class:`EnsembleOutput`.
        """
        tau, mix = self.temperature, None
        for w, teacher in zip(self.weights, self.teachers):
            z = teacher(**inputs).logits
            z = at_least_float32(z)
            lp = torch.log_softmax(z / tau, dim=-1) + math.log(w)
            mix = lp if mix is None else torch.logaddexp(mix, lp)
        return EnsembleOutput(logits=tau * mix)


def load_teacher(args, student, tokenizer):
    """An :class:`EnsembleTeacher` when ``teacher_model_name_or_path`` lists several teachers (each
    checked against the student's vocabulary), else None (DistillationTrainer loads the one).

    Args:
        args: the run's :class:`lmkd.DistillationConfig`, which has refused the settings an
            ensemble cannot serve (feature losses, a logit cache, logit matching).
        student: the student (its kind and vocabulary).
        tokenizer: the student's tokenizer.

    Returns:
        The ensemble, or None (one teacher, or no KD term).

    Raises:
        LmkdError: a teacher of another kind, or a vocabulary that does not match the student's.
    """
    paths = teacher_paths(args)
    if len(paths) < 2 or not (args.kd_alpha > 0 or args.uses_features):
        return None
    kind = model_kind(student)
    teachers = []
    for path in paths:
        teacher = load_model(path, kind=kind)
        check_teacher_kind(teacher, kind, path)
        if model_kind(teacher) != kind:
            raise LmkdError(
                f"teacher {path} is a {model_kind(teacher)} model but the student a {kind} model"
            )
        shared_vocab_size(
            student, teacher, tokenizer, load_tokenizer(path, required=False)
        )  # raises on a mismatch
        teachers.append(teacher)
    weights = [float(w) for w in args.teacher_weights.split(",")] if args.teacher_weights else None
    logger.info(
        "teacher ensemble of %d: %s (weights %s)", len(paths), ", ".join(paths), weights or "equal"
    )
    return EnsembleTeacher(teachers, weights, temperature=args.kd_temperature)

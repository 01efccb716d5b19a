"""The vocabulary guard: do teacher and student speak the same vocabulary?

:func:`shared_vocab_size` decides from what is known -- both tokenizers (given, or saved next to the
models: :func:`tokenizer_of`), else the output sizes (:func:`vocab_size_of`) and the special-token ids
of the two configs -- and says which logits rows KD may compare; :func:`check_same_tokenizer` refuses
two different tokenizers.
"""

from __future__ import annotations

import logging
import os

from transformers import PreTrainedModel

from lmkd.core.constants import CLASSIFICATION
from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_tokenizer, model_kind, unwrap

logger = logging.getLogger("lmkd.models.loading")  # (the log lines kept their logger)


def vocab_size_of(model: PreTrainedModel) -> int:
    """Rows of the output layer (the logits' last dimension).

    Args:
        model: the model (or a wrapper).

    Returns:
        The output layer's rows; ``num_labels`` for a classifier, ``config.vocab_size`` without an
        output layer.
    """
    model = unwrap(model)
    if model_kind(model) == CLASSIFICATION:
        return model.config.num_labels
    head = model.get_output_embeddings()
    if head is None:
        return model.config.vocab_size
    # under DeepSpeed ZeRO-3 the weight is a partitioned placeholder; ds_shape is its real shape
    return tuple(getattr(head.weight, "ds_shape", head.weight.shape))[0]


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Raise when both tokenizers are known and their vocabularies differ.

    Args:
        student_tokenizer: the student's tokenizer, or None (unknown).
        teacher_tokenizer: the teacher's tokenizer, or None (unknown).

    Returns:
        None.

    Raises:
        LmkdError: both known, with different vocabularies.
    """
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise LmkdError(
                "teacher and student tokenizers differ (different vocabularies); token-level KD "
                "needs one tokenizer -- build the student from the teacher (lmkd make-student) "
                "or use sequence-level KD (lmkd generate)"
            )


#: config fields naming special tokens; teacher and student of one vocabulary agree on them
SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _special_ids(model) -> dict:
    cfg = getattr(unwrap(model), "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    out = {}
    for name in SPECIAL_TOKEN_FIELDS:
        value = getattr(cfg, name, None)
        if value is not None:
            out[name] = (
                sorted(int(v) for v in value) if isinstance(value, (list, tuple)) else [int(value)]
            )
    return out


def tokenizer_of(model):
    """The tokenizer saved next to a model loaded from a local directory (``config.name_or_path``).

    Args:
        model: the model (or a wrapper).

    Returns:
        The tokenizer, or None (a model built in Python, or a directory without tokenizer files).
    """
    path = getattr(getattr(unwrap(model), "config", None), "name_or_path", "") or ""
    if path and os.path.isdir(path):
        return load_tokenizer(path, required=False)
    return None


def shared_vocab_size(
    student, teacher, student_tokenizer=None, teacher_tokenizer=None
) -> int | None:
    """Check that teacher and student speak the same vocabulary, deciding from what is known.

    * both tokenizers known (given, or saved next to a model loaded from a directory): their
      vocabularies must be equal; output layers of different sizes are then sliced to the
      tokenizer's size when both are at least that large (padding rows, e.g. 151,936 vs 152,064);
    * otherwise: the output sizes must be equal (a size difference could be padding rows or a
      different, larger vocabulary, which only the teacher's tokenizer can tell) and the
      special-token ids in the two configs must agree.

    Logs which evidence it used.

    Args:
        student: the student model.
        teacher: the teacher model.
        student_tokenizer: the student's tokenizer (else the one saved next to it, if any).
        teacher_tokenizer: the teacher's tokenizer (else the one saved next to it, if any).

    Returns:
        None when the output layers have the same size, else the size to slice both logits to.

    Raises:
        LmkdError: the vocabularies differ or cannot be shown to be the same (saying which evidence it
            used).
    """
    vs, vt = vocab_size_of(student), vocab_size_of(teacher)
    teacher_tokenizer = (
        teacher_tokenizer if teacher_tokenizer is not None else tokenizer_of(teacher)
    )
    student_tokenizer = (
        student_tokenizer if student_tokenizer is not None else tokenizer_of(student)
    )
    if model_kind(student) == CLASSIFICATION and vs != vt:
        raise LmkdError(f"teacher has {vt} labels but student {vs}; give both the same label set")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(student_tokenizer, teacher_tokenizer)
        if vs == vt:
            logger.info("vocabulary check: the teacher's and the student's tokenizers are the same")
            return None
        if len(student_tokenizer) <= min(vs, vt):
            logger.info(
                "vocabulary check: the tokenizers are the same and the output layers (teacher %d, student "
                "%d) differ only by padding rows; KD uses the first %d",
                vt,
                vs,
                len(student_tokenizer),
            )
            return len(student_tokenizer)
        raise LmkdError(
            f"teacher vocabulary ({vt}) and student vocabulary ({vs}) are smaller than their one "
            f"tokenizer ({len(student_tokenizer)} tokens); resize the embeddings to the tokenizer"
        )
    missing = "the teacher's" if teacher_tokenizer is None else "the student's"
    if student_tokenizer is None and teacher_tokenizer is None:
        missing = "both models'"
    if vs != vt:
        raise LmkdError(
            f"teacher vocabulary ({vt}) and student vocabulary ({vs}) differ and {missing} tokenizer "
            "is unknown, so nothing shows the difference is only padding rows; pass the teacher's "
            "tokenizer (DistillationTrainer(..., teacher_tokenizer=TOKENIZER), or save it next to the "
            "teacher) or use one vocabulary"
        )
    ids_s, ids_t = _special_ids(student), _special_ids(teacher)
    differ = [
        f"{k} {ids_t[k]} vs {ids_s[k]}"
        for k in SPECIAL_TOKEN_FIELDS
        if k in ids_s and k in ids_t and ids_s[k] != ids_t[k]
    ]
    if differ:
        raise LmkdError(
            f"{missing} tokenizer is unknown and the configs name different special tokens (teacher "
            f"vs student: {', '.join(differ)}), so the vocabularies differ; token-level KD needs one "
            "tokenizer -- pass the teacher's tokenizer or use sequence-level KD (lmkd generate)"
        )
    logger.info(
        "vocabulary check: %s tokenizer is unknown; decided from the configs -- the same output size "
        "(%d) and the same special-token ids (%s)",
        missing,
        vs,
        ", ".join(f"{k}={v}" for k, v in ids_s.items() if k in ids_t) or "none set",
    )
    return None

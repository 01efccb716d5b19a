"""What kind of model is this, and loading models/tokenizers with one-line errors.

Four kinds cover the models lmkd distils; every other module asks this one instead of
switching on class names itself.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .constants import CAUSAL, CLASSIFICATION, DTYPE_NAMES, MLM, SEQ2SEQ
from .constants import TASK_KIND  # noqa: F401  (also read as lmkd.modeling.TASK_KIND by callers and tests)
from .errors import LmkdError

AUTO_CLASS = {
    SEQ2SEQ: AutoModelForSeq2SeqLM,
    CAUSAL: AutoModelForCausalLM,
    MLM: AutoModelForMaskedLM,
    CLASSIFICATION: AutoModelForSequenceClassification,
}

#: the torch dtype of each name in lmkd.constants.DTYPE_NAMES
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def _names(mapping) -> set[str]:
    out = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (tuple, list)) else [v])
    return out


_KIND_CLASSES = [
    (SEQ2SEQ, _names(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)),
    (CLASSIFICATION, _names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)),
    (MLM, _names(MODEL_FOR_MASKED_LM_MAPPING_NAMES)),
    (CAUSAL, _names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)),
]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/FSDP/compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def model_kind(model: torch.nn.Module) -> str:
    """``seq2seq``, ``causal``, ``mlm`` or ``classification`` for an HF model (or wrapper)."""
    model = unwrap(model)
    if getattr(model, "lmkd_kind", None):  # lmkd's own wrappers (lmkd.regimes) say what they hold
        return model.lmkd_kind
    name = type(model).__name__
    for kind, names in _KIND_CLASSES:
        if name in names:
            return kind
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    for suffix, kind in (("ForSequenceClassification", CLASSIFICATION), ("ForMaskedLM", MLM),
                         ("ForCausalLM", CAUSAL), ("LMHeadModel", CAUSAL)):
        if name.endswith(suffix):
            return kind
    raise LmkdError(f"lmkd cannot tell what kind of model {name} is; use a seq2seq LM, causal LM, "
                    "masked LM or sequence-classification model")


def saved_kind(model) -> str | None:
    """The kind of model a checkpoint was saved as (``config.architectures``), or None when unknown.
    ``from_pretrained`` with another auto class may load it anyway (a BART checkpoint loads as a
    ``BartForCausalLM``), so this is what tells a teacher of the wrong kind."""
    config = getattr(unwrap(model), "config", model)  # a model or its config
    archs = getattr(config, "architectures", None) or []
    for name in archs[:1]:
        for kind, names in _KIND_CLASSES:
            if name in names:
                return kind
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once): the size metric of evaluate and study."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_model_path(path: str) -> None:
    """One-line error for a local model path that does not exist or holds no model."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise LmkdError(f"{path} is not a model directory (no config.json); pass a dir written by "
                            "save_pretrained or a hub id")
    elif os.path.exists(path):
        raise LmkdError(f"{path} is a file, not a model directory; pass the directory save_pretrained wrote")
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise LmkdError(f"model path {path} does not exist; check the path (or give a hub id)")


def load_config(path: str):
    """``AutoConfig.from_pretrained`` with a one-line error: what a model is, without loading it."""
    check_model_path(str(path))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LmkdError(f"cannot read the model config of {path}: {str(e).splitlines()[0]}") from e


def load_model(path: str, kind: str | None = None, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    """``from_pretrained`` with the auto class of ``kind`` (inferred from the config if None)."""
    if isinstance(path, PreTrainedModel):
        return path
    check_model_path(str(path))
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES[dtype]
    if kind is None:
        kind = kind_from_config(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        return AUTO_CLASS[kind].from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LmkdError(f"cannot load a {kind} model from {path}: {str(e).splitlines()[0]}") from e


def kind_from_config(path: str) -> str:
    """Model kind from a checkpoint's config (its ``architectures`` entry, else encoder-decoder-ness)."""
    check_model_path(str(path))
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LmkdError(f"cannot read a model config from {path}: {str(e).splitlines()[0]}") from e
    for arch in config.architectures or []:
        for kind, names in _KIND_CLASSES:
            if arch in names:
                return kind
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def load_tokenizer(path: str, required: bool = True):
    """``AutoTokenizer.from_pretrained`` with a one-line error (or None when not ``required``)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        if not required:
            return None
        raise LmkdError(f"no tokenizer found in {path}: save one next to the model "
                        "(tokenizer.save_pretrained) or pass --tokenizer") from e


def vocab_size_of(model: PreTrainedModel) -> int:
    """Rows of the output layer (the logits' last dimension)."""
    model = unwrap(model)
    if model_kind(model) == CLASSIFICATION:
        return model.config.num_labels
    head = model.get_output_embeddings()
    if head is None:
        return model.config.vocab_size
    # under DeepSpeed ZeRO-3 the weight is a partitioned placeholder; ds_shape is its real shape
    return tuple(getattr(head.weight, "ds_shape", head.weight.shape))[0]


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Raise when both tokenizers are known and their vocabularies differ."""
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise LmkdError("teacher and student tokenizers differ (different vocabularies); token-level KD "
                            "needs one tokenizer -- build the student from the teacher (lmkd make-student) "
                            "or use sequence-level KD (lmkd generate)")


def shared_vocab_size(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> int | None:
    """Check that teacher and student speak the same vocabulary.

    Returns None when their output layers have the same size; the size to slice both logits to
    when they differ only by padding rows (same tokenizer, embedding matrices padded to different
    multiples such as 151,936 vs 152,064); raises :class:`LmkdError` when the vocabularies differ.
    """
    vs, vt = vocab_size_of(student), vocab_size_of(teacher)
    check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    if vs == vt:
        return None
    if model_kind(student) == CLASSIFICATION:
        raise LmkdError(f"teacher has {vt} labels but student {vs}; give both the same label set")
    tok = student_tokenizer or teacher_tokenizer
    if tok is not None and len(tok) <= min(vs, vt):
        return len(tok)
    raise LmkdError(f"teacher vocabulary ({vt}) and student vocabulary ({vs}) differ and no shared tokenizer "
                    "shows the difference is only padding rows; use the teacher's tokenizer for the student")

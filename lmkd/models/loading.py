"""What kind of model is this, and loading models/tokenizers with one-line errors.

Four kinds cover the models lmkd distils; every other module asks this one instead of
switching on class names itself.  Also :func:`import_deepspeed_only_when_used` (the package
facade calls it), so that saving or training a model does not import DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import sys

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

from lmkd.core.constants import CAUSAL, CLASSIFICATION, DTYPE_NAMES, MLM, SEQ2SEQ
from lmkd.core.errors import LmkdError

logger = logging.getLogger(__name__)


def import_deepspeed_only_when_used() -> None:
    """Keep DeepSpeed unimported (and its "Setting accelerator to CPU" warning unprinted) in runs
    that do not use it.

    accelerate's ``extract_model_from_parallel`` (behind every ``unwrap_model`` and
    ``save_pretrained``) imports deepspeed whenever it is installed, only to test
    ``isinstance(model, DeepSpeedEngine)``; a model can be an engine only once deepspeed is imported
    (a DeepSpeed run imports it before building one), so that check asks whether it is imported
    instead.  The other availability checks (transformers' and accelerate's own) only look for the
    package and stay as they are.

    Returns:
        None.
    """
    import accelerate.utils.other as other

    other.is_deepspeed_available = deepspeed_imported


def deepspeed_imported() -> bool:
    """Whether the deepspeed package has been imported in this process.

    Returns:
        True once ``deepspeed`` is in ``sys.modules``.
    """
    return "deepspeed" in sys.modules


AUTO_CLASS = {
    SEQ2SEQ: AutoModelForSeq2SeqLM,
    CAUSAL: AutoModelForCausalLM,
    MLM: AutoModelForMaskedLM,
    CLASSIFICATION: AutoModelForSequenceClassification,
}

#: the torch dtype of each name in lmkd.core.constants.DTYPE_NAMES
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
    """The model inside DDP/FSDP/compile wrappers.

    Args:
        model: a model, wrapped or not.

    Returns:
        The innermost model (``.module`` / ``._orig_mod`` followed to the end).
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def model_kind(model: torch.nn.Module) -> str:
    """The kind of an HF model (or wrapper).

    Args:
        model: the model; lmkd's own wrappers say what they hold (``lmkd_kind``).

    Returns:
        ``seq2seq``, ``causal``, ``mlm`` or ``classification``.

    Raises:
        LmkdError: a model of none of these kinds.
    """
    model = unwrap(model)
    if getattr(
        model, "lmkd_kind", None
    ):  # lmkd's own wrappers (lmkd.train.regimes) say what they hold
        return model.lmkd_kind
    name = type(model).__name__
    for kind, names in _KIND_CLASSES:
        if name in names:
            return kind
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    for suffix, kind in (
        ("ForSequenceClassification", CLASSIFICATION),
        ("ForMaskedLM", MLM),
        ("ForCausalLM", CAUSAL),
        ("LMHeadModel", CAUSAL),
    ):
        if name.endswith(suffix):
            return kind
    raise LmkdError(
        f"lmkd cannot tell what kind of model {name} is; use a seq2seq LM, causal LM, "
        "masked LM or sequence-classification model"
    )


def saved_kind(model) -> str | None:
    """The kind of model a checkpoint was saved as (``config.architectures``).

    ``from_pretrained`` with another auto class may load it anyway (a BART checkpoint loads as a
    ``BartForCausalLM``), so this is what tells a teacher of the wrong kind.

    Args:
        model: a model or its config.

    Returns:
        The kind of its first architecture, or None when unknown.
    """
    config = getattr(unwrap(model), "config", model)  # a model or its config
    archs = getattr(config, "architectures", None) or []
    for name in archs[:1]:
        for kind, names in _KIND_CLASSES:
            if name in names:
                return kind
    return None


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once): the size metric of evaluate and study.

    Args:
        model: the model.

    Returns:
        The number of parameters.
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_bytes(path: str) -> int | None:
    """Bytes of the weights ``from_pretrained`` loads from a saved model directory.

    Other files (tokenizer, checkpoints, ``round-*``/``member-*`` runs in subfolders) are not counted.

    Args:
        path: a saved model directory, or a hub id.

    Returns:
        The size of the top-level ``model.safetensors`` (else ``pytorch_model.bin``), or of the shards
        its index file lists; None for a hub id or a directory without weights.
    """
    import json

    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    if not os.path.isdir(path):
        return None
    for single, index in (
        (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
        (WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
    ):
        if os.path.isfile(os.path.join(path, single)):
            return os.path.getsize(os.path.join(path, single))
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            return sum(
                os.path.getsize(os.path.join(path, s))
                for s in shards
                if os.path.isfile(os.path.join(path, s))
            )
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, checked to exist here (a one-line error instead of torch's traceback at
    the first ``.to(device)``).

    Args:
        device: ``auto``/None, or a device name or object.

    Returns:
        For ``auto``/None: cuda when available, else cpu; otherwise the named device.

    Raises:
        LmkdError: not a torch device, or one this machine does not have (no CUDA GPU, too few of
            them, no MPS, ...).
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LmkdError(
            f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, ... or auto"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LmkdError(
                f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmkdError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LmkdError(
                f"--device {device}: MPS is not available on this machine; use --device cpu"
            )
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise LmkdError(
                f"--device {device}: no {dev.type} device is available here; use --device cpu"
            )
    return dev


def check_model_path(path: str) -> None:
    """One-line error for a local model path that does not exist or holds no model.

    Args:
        path: a model directory, or a hub id.

    Returns:
        None.

    Raises:
        LmkdError: a directory without ``config.json``, a file, or a path that does not exist (and does
            not look like a hub id).
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise LmkdError(
                f"{path} is not a model directory (no config.json); pass a dir written by "
                "save_pretrained or a hub id"
            )
    elif os.path.exists(path):
        raise LmkdError(
            f"{path} is a file, not a model directory; pass the directory save_pretrained wrote"
        )
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise LmkdError(f"model path {path} does not exist; check the path (or give a hub id)")


def load_config(path: str):
    """``AutoConfig.from_pretrained`` with a one-line error: what a model is, without loading it.

    Args:
        path: a model directory or hub id.

    Returns:
        The model's HF config.

    Raises:
        LmkdError: the config cannot be read (the path checked by :func:`check_model_path` first).
    """
    check_model_path(str(path))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LmkdError(f"cannot read the model config of {path}: {str(e).splitlines()[0]}") from e


def load_model(
    path: str, kind: str | None = None, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """``from_pretrained`` with the auto class of ``kind``.

    Args:
        path: a model directory or hub id (a model already loaded is returned as it is).
        kind: the model kind (inferred from the config if None; else checked by :func:`check_loads_as`).
        dtype: a torch dtype, a name of :data:`lmkd.core.constants.DTYPE_NAMES`, or ``auto``/None
            (the checkpoint's).

    Returns:
        The model.

    Raises:
        LmkdError: the path holds no model, a checkpoint of another kind, or one ``from_pretrained``
            cannot load.
    """
    if isinstance(path, PreTrainedModel):
        return path
    check_model_path(str(path))
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES[dtype]
    if kind is None:
        kind = kind_from_config(path)
    else:
        check_loads_as(load_config(str(path)), kind, str(path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        return AUTO_CLASS[kind].from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LmkdError(f"cannot load a {kind} model from {path}: {str(e).splitlines()[0]}") from e


def check_loads_as(config, kind: str, path: str) -> None:
    """Refuse to load a checkpoint saved as one kind of language model (``config.architectures``) as
    another.

    ``from_pretrained`` would do it, leaving out what the other kind has and starting what it lacks
    untrained (a BART checkpoint loads as a decoder-only ``BartForCausalLM`` without its encoder, a
    causal LM as a masked LM with a new head), and its scores, logits or cache would be wrong without
    a word.  Loading any checkpoint as a classifier is fine-tuning's usual start (a new head) and is
    allowed.

    Args:
        config: the checkpoint's config.
        kind: the kind it is to be loaded as.
        path: the checkpoint (for the message).

    Returns:
        None.

    Raises:
        LmkdError: it was saved as another kind of language model.
    """
    archs = getattr(config, "architectures", None) or []
    saved = saved_kind(config)
    if kind == CLASSIFICATION or saved is None or saved == kind:
        return
    if any(archs[0] in names for k, names in _KIND_CLASSES if k == kind):  # a class of both kinds
        return
    raise LmkdError(
        f"{path} is a {saved} model ({archs[0]}), not a {kind} model: loaded as one it would be "
        f"partly untrained; use a {kind} checkpoint, or the task of a {saved} model"
    )


def kind_from_config(path: str) -> str:
    """Model kind from a checkpoint's config.

    Args:
        path: a model directory or hub id.

    Returns:
        The kind of its ``architectures`` entry, else ``seq2seq`` for an encoder-decoder and ``causal``
        otherwise.

    Raises:
        LmkdError: the config cannot be read.
    """
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


#: files a saved tokenizer consists of (any one of them); a directory with none holds no tokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
    "target.spm",
    "tokenizer.model",
    "special_tokens_map.json",
)


def has_tokenizer_files(path: str) -> bool:
    """Whether ``path`` (a local directory) holds the files of a saved tokenizer.

    Args:
        path: a local directory or a hub id.

    Returns:
        Whether one of the tokenizer files is there; True for a hub id (``from_pretrained`` decides).
    """
    if not os.path.isdir(str(path)):
        return True  # a hub id: from_pretrained decides
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_tokenizer(path: str, required: bool = True):
    """``AutoTokenizer.from_pretrained`` with a one-line error.

    A model directory without tokenizer files has no tokenizer -- transformers 5 would build a
    near-empty one from the model config instead of failing -- so that is "not found" too.

    Args:
        path: a model or tokenizer directory, or a hub id.
        required: raise when there is none; else return None.

    Returns:
        The tokenizer, or None when there is none and it is not ``required``.

    Raises:
        LmkdError: no tokenizer found and ``required``.
    """
    try:
        if not has_tokenizer_files(path):
            raise OSError(f"{path} holds no tokenizer files")
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        if not required:
            return None
        raise LmkdError(
            f"no tokenizer found in {path}: save one next to the model "
            "(tokenizer.save_pretrained) or pass --tokenizer"
        ) from e


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

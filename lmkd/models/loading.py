"""What kind of model is this, and loading models/tokenizers with one-line errors.

Four kinds cover the models lmkd distils; every other module asks this one instead of
switching on class names itself.  Also :func:`import_deepspeed_only_when_used` (the package
facade calls it), so that saving or training a model does not import DeepSpeed.  The size of a
model is :mod:`lmkd.models.size`'s; the vocabulary guard (do teacher and student share a
vocabulary?) is :mod:`lmkd.models.vocabulary`'s.
"""

from __future__ import annotations

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

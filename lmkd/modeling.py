"""What kind of model is this, and loading models/tokenizers with one-line errors.

Four kinds cover the models lmkd distils; every other module asks this one instead of
switching on class names itself.
"""

from __future__ import annotations

import logging
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
from .errors import LmkdError

logger = logging.getLogger(__name__)

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


def weights_bytes(path: str) -> int | None:
    """Bytes of the weights ``from_pretrained`` loads from a saved model directory: the top-level
    ``model.safetensors`` (else ``pytorch_model.bin``), or the shards its index file lists.  Other
    files (tokenizer, checkpoints, ``round-*``/``member-*`` runs in subfolders) are not counted.
    None for a hub id or a directory without weights."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if not os.path.isdir(path):
        return None
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if os.path.isfile(os.path.join(path, single)):
            return os.path.getsize(os.path.join(path, single))
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            return sum(os.path.getsize(os.path.join(path, s)) for s in shards
                       if os.path.isfile(os.path.join(path, s)))
    return None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None: cuda when available, else cpu; otherwise the named device, checked to exist
    here (a one-line error instead of torch's traceback at the first ``.to(device)``)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LmkdError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, ... or auto") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LmkdError(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmkdError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LmkdError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise LmkdError(f"--device {device}: no {dev.type} device is available here; use --device cpu")
    return dev


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


#: files a saved tokenizer consists of (any one of them); a directory with none holds no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm", "tokenizer.model",
                   "special_tokens_map.json")


def has_tokenizer_files(path: str) -> bool:
    """Whether ``path`` (a local directory) holds the files of a saved tokenizer.  Hub ids: True."""
    if not os.path.isdir(str(path)):
        return True  # a hub id: from_pretrained decides
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_tokenizer(path: str, required: bool = True):
    """``AutoTokenizer.from_pretrained`` with a one-line error (or None when not ``required``).

    A model directory without tokenizer files has no tokenizer -- transformers 5 would build a
    near-empty one from the model config instead of failing -- so that is "not found" too."""
    try:
        if not has_tokenizer_files(path):
            raise OSError(f"{path} holds no tokenizer files")
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


#: config fields naming special tokens; teacher and student of one vocabulary agree on them
SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _special_ids(model) -> dict:
    cfg = getattr(unwrap(model), "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    out = {}
    for name in SPECIAL_TOKEN_FIELDS:
        value = getattr(cfg, name, None)
        if value is not None:
            out[name] = sorted(int(v) for v in value) if isinstance(value, (list, tuple)) else [int(value)]
    return out


def tokenizer_of(model):
    """The tokenizer saved next to a model loaded from a local directory (``config.name_or_path``),
    or None (a model built in Python, or a directory without tokenizer files)."""
    path = getattr(getattr(unwrap(model), "config", None), "name_or_path", "") or ""
    if path and os.path.isdir(path):
        return load_tokenizer(path, required=False)
    return None


def shared_vocab_size(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> int | None:
    """Check that teacher and student speak the same vocabulary, deciding from what is known.

    * both tokenizers known (given, or saved next to a model loaded from a directory): their
      vocabularies must be equal; output layers of different sizes are then sliced to the
      tokenizer's size when both are at least that large (padding rows, e.g. 151,936 vs 152,064);
    * otherwise: the output sizes must be equal (a size difference could be padding rows or a
      different, larger vocabulary, which only the teacher's tokenizer can tell) and the
      special-token ids in the two configs must agree.

    Returns None when the output layers have the same size, else the size to slice both logits to;
    raises :class:`LmkdError` (saying which evidence it used) when the vocabularies differ or
    cannot be shown to be the same.  Logs which evidence it used.
    """
    vs, vt = vocab_size_of(student), vocab_size_of(teacher)
    teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else tokenizer_of(teacher)
    student_tokenizer = student_tokenizer if student_tokenizer is not None else tokenizer_of(student)
    if model_kind(student) == CLASSIFICATION and vs != vt:
        raise LmkdError(f"teacher has {vt} labels but student {vs}; give both the same label set")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        check_same_tokenizer(student_tokenizer, teacher_tokenizer)
        if vs == vt:
            logger.info("vocabulary check: the teacher's and the student's tokenizers are the same")
            return None
        if len(student_tokenizer) <= min(vs, vt):
            logger.info("vocabulary check: the tokenizers are the same and the output layers (teacher %d, student "
                        "%d) differ only by padding rows; KD uses the first %d", vt, vs, len(student_tokenizer))
            return len(student_tokenizer)
        raise LmkdError(f"teacher vocabulary ({vt}) and student vocabulary ({vs}) are smaller than their one "
                        f"tokenizer ({len(student_tokenizer)} tokens); resize the embeddings to the tokenizer")
    missing = "the teacher's" if teacher_tokenizer is None else "the student's"
    if student_tokenizer is None and teacher_tokenizer is None:
        missing = "both models'"
    if vs != vt:
        raise LmkdError(f"teacher vocabulary ({vt}) and student vocabulary ({vs}) differ and {missing} tokenizer "
                        "is unknown, so nothing shows the difference is only padding rows; pass the teacher's "
                        "tokenizer (teacher_tokenizer=..., or save it next to the teacher) or use one vocabulary")
    ids_s, ids_t = _special_ids(student), _special_ids(teacher)
    differ = [f"{k} {ids_t[k]} vs {ids_s[k]}" for k in SPECIAL_TOKEN_FIELDS
              if k in ids_s and k in ids_t and ids_s[k] != ids_t[k]]
    if differ:
        raise LmkdError(f"{missing} tokenizer is unknown and the configs name different special tokens (teacher "
                        f"vs student: {', '.join(differ)}), so the vocabularies differ; token-level KD needs one "
                        "tokenizer -- pass the teacher's tokenizer or use sequence-level KD (lmkd generate)")
    logger.info("vocabulary check: %s tokenizer is unknown; decided from the configs -- the same output size "
                "(%d) and the same special-token ids (%s)", missing, vs,
                ", ".join(f"{k}={v}" for k, v in ids_s.items() if k in ids_t) or "none set")
    return None


# ---- how long an input may be: the one truncation rule ------------------------------------------
#
# Every path that tokenises text for a model (evaluate, generate, cache-logits, distill, on-policy
# KD, and the study through them) truncates to ``fit_length(the user's maximum, the model(s))``:
# the smaller of the two.  What a model takes is its table of learned or fixed positions
# (``max_position_embeddings``; GPT-2's ``n_positions`` maps to it), less what the architecture
# reserves (RoBERTa-style models number positions from ``padding_idx + 1``), and the tokenizer's
# ``model_max_length`` when that is a real limit.  Relative positions (T5) have no table.  The rows
# cut are counted and reported once per command (:func:`truncation_note`, :func:`describe_truncation`).

#: model types whose absolute positions start at ``padding_idx + 1`` (RoBERTa's
#: ``create_position_ids_from_input_ids``): their table holds ``max_position_embeddings - padding_idx - 1``
PADDING_OFFSET_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text", "ibert",
    "longformer", "xmod", "mpnet", "esm", "luke", "lilt", "markuplm", "layoutlmv3"})

#: a tokenizer's ``model_max_length`` at or above this is transformers' "no limit" placeholder
_NO_TOKENIZER_LIMIT = 10 ** 9


def _configs(model_or_config) -> list:
    """The config(s) behind a model, wrapper (ensemble, cohort), config, path, or a list of them."""
    if model_or_config is None:
        return []
    if isinstance(model_or_config, (list, tuple)):
        return [c for x in model_or_config for c in _configs(x)]
    if isinstance(model_or_config, (str, os.PathLike)):
        path = str(model_or_config)
        check_model_path(path)
        try:
            return [AutoConfig.from_pretrained(path)]
        except (OSError, ValueError) as e:
            raise LmkdError(f"cannot read a model config from {path}: {str(e).splitlines()[0]}") from e
    if isinstance(model_or_config, torch.nn.Module):
        model = unwrap(model_or_config)
        for name in ("teachers", "members"):  # lmkd's EnsembleTeacher / CohortModel: every one must fit
            inner = getattr(model, name, None)
            if isinstance(inner, torch.nn.ModuleList):
                return [c for m in inner for c in _configs(m)]
        return [model.config]
    return [model_or_config]


def position_table(config, decoder: bool = False) -> int | None:
    """Positions the model's position table holds (the decoder's with ``decoder=True``), None
    when it has none (relative positions: T5, DeBERTa without absolute positions)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=decoder) or config
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v2 with relative positions only
        return None
    n = getattr(config, "max_target_positions" if decoder else "max_source_positions", None)
    if n is None:
        n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def tokenizer_limit(tokenizer) -> int | None:
    """The tokenizer's ``model_max_length`` when it is a real limit (not the 'unset' placeholder)."""
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < _NO_TOKENIZER_LIMIT else None


def _smallest(values) -> int | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


def input_limit(model_or_config, tokenizer=None) -> int | None:
    """Tokens one input may hold, special tokens included, for every model given (a model, a
    wrapper, a config, a path or a list of them): the encoder's table for a seq2seq model, the
    table for an encoder or causal model, and the tokenizer's real ``model_max_length``; None when
    nothing limits it."""
    return _smallest([position_table(c) for c in _configs(model_or_config)] + [tokenizer_limit(tokenizer)])


def target_limit(model_or_config) -> int | None:
    """Tokens one seq2seq label sequence may hold (the decoder's table: the decoder reads the
    start token and all labels but the last); for a causal model the same as :func:`input_limit`."""
    return _smallest([position_table(c, decoder=getattr(c, "is_encoder_decoder", False))
                      for c in _configs(model_or_config)])


def fit_length(requested: int | None, model_or_config, tokenizer=None, what: str = "inputs") -> int | None:
    """The length to truncate to: the smaller of ``requested`` (the user's maximum; None: none)
    and what the model(s) take -- :func:`input_limit` for ``what="inputs"``, :func:`target_limit`
    for ``"targets"``.  None when neither limits it."""
    if what not in ("inputs", "targets"):
        raise ValueError(f"what must be 'inputs' or 'targets', not {what!r}")
    limit = input_limit(model_or_config, tokenizer) if what == "inputs" else target_limit(model_or_config)
    return _smallest([requested, limit])


def generation_lengths(model_or_config, tokenizer=None, max_source_length: int | None = None,
                       max_new_tokens: int = 128) -> tuple[int | None, int]:
    """(input length, new tokens) for generating with the model(s): the whole generated sequence
    must fit the table -- for a seq2seq model the start token and the new tokens fit the decoder's
    table (inputs fit the encoder's); for a causal model the prompt and the new tokens fit the one
    table (new tokens first, leaving at least one prompt token).  Raises when not one new token fits."""
    configs = _configs(model_or_config)
    seq2seq = any(getattr(c, "is_encoder_decoder", False) for c in configs)
    if seq2seq:
        dec = target_limit(configs)
        new = max_new_tokens if dec is None else min(max_new_tokens, dec - 1)
        src = fit_length(max_source_length, configs, tokenizer, "inputs")
    else:
        limit = input_limit(configs, tokenizer)
        new = max_new_tokens if limit is None else min(max_new_tokens, limit - 1)
        src = _smallest([max_source_length, None if limit is None else limit - new])
    if new < 1:
        raise LmkdError(f"the model's position table ({dec if seq2seq else limit} positions) leaves no room to "
                        "generate a token")
    return src, new


def truncation_note(what: str, rows: int, truncated: int, length: int | None, requested: int | None,
                    positions: int | None) -> dict:
    """The record of one truncation: ``what`` (inputs / targets / new tokens), ``rows`` seen,
    ``truncated`` of them cut to ``length`` tokens; ``requested`` (the user's maximum) and
    ``positions`` (what the model takes; None: no limit).  :func:`describe_truncation` words it."""
    return {"what": what, "rows": rows, "truncated": truncated, "length": length, "requested": requested,
            "model_positions": positions}


def describe_truncation(note: dict) -> str:
    """One line: 'N of M inputs truncated to L tokens (the model takes L positions)' -- or
    '(the maximum asked for)' when the user's maximum was the smaller."""
    if note["what"] == "new tokens":
        if note["length"] == note["requested"]:
            return f"up to {note['length']} new tokens"
        return (f"max_new_tokens {note['requested']} lowered to {note['length']} (the model takes "
                f"{note['model_positions']} positions, the start token or prompt included)")
    if note["length"] is None:
        return f"{note['rows']} {note['what']}, none truncated (no maximum and no position table)"
    by_model = note["model_positions"] is not None and (note["requested"] is None
                                                        or note["length"] < note["requested"])
    why = f"the model takes {note['model_positions']} positions" if by_model else "the maximum asked for"
    return f"{note['truncated']} of {note['rows']} {note['what']} truncated to {note['length']} tokens ({why})"


def encode_fitted(tokenizer, texts: list[str], length: int | None, target: bool = False) -> tuple[dict, list[int]]:
    """``tokenizer(texts)`` (as ``text_target`` when ``target``) truncated to ``length`` tokens
    (None: not truncated), as a dict of lists, and the indices of the texts that were cut."""
    texts = [str(t) for t in texts]
    call = (lambda xs, **kw: tokenizer(text_target=xs, **kw)) if target else (lambda xs, **kw: tokenizer(xs, **kw))
    full = dict(call(texts, verbose=False))
    if length is None:
        return full, []
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > length]
    if long:
        cut = call([texts[i] for i in long], max_length=length, truncation=True)
        for key, values in full.items():
            for j, i in enumerate(long):
                values[i] = cut[key][j]
    return full, long

"""Models for serving: int8 PyTorch, CTranslate2 and ONNX Runtime -- written and read back here.

Each export is a directory holding the engine's files, the tokenizer and ``lmkd_export.json``
(engine, quantisation, the model it came from and its parameter count); the source model's HF config
and generation config sit in ``hf/``.  :func:`load` reads any of them -- or a plain HF directory --
into an object :mod:`lmkd.models.generation` runs like an HF model (``generate`` for seq2seq and causal LMs,
a forward pass returning ``.logits`` for classifiers and causal LMs), so ``lmkd evaluate`` scores every
format with the same code.

* ``torch-int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8 weights,
  activations quantised on the fly; CPU only; GPT-2's ``Conv1D`` layers are made ``nn.Linear`` first),
  saved as its state dict;
* ``ct2-int8`` / ``ct2-int8_float32`` / ``ct2-float16`` / ``ct2-float32``: CTranslate2's converter
  (encoder-decoders: BART, mBART, Marian, T5, ...; causal LMs: GPT-2, Llama); decoding runs in
  CTranslate2's own C++ loop; a causal LM's perplexity comes from its ``score_batch``
  (:meth:`CT2Causal.token_log_probs`);
* ``onnx`` / ``onnx-int8``: ``torch.onnx.export`` of a sequence classifier, run by ONNX Runtime;
  ``onnx-int8`` is ORT's dynamic int8 quantisation of it.

``pip install 'lmkd[deploy]'`` installs ctranslate2, onnxruntime and onnx; they are imported only
here, and only when used.

The package: :mod:`.formats` (the formats table, the files of an export, the packages of each
engine), :mod:`.base` (what the non-PyTorch engines share), :mod:`.torch_int8`, :mod:`.ct2_convert`
and :mod:`.ct2` (CTranslate2: conversion, then the engines), :mod:`.onnx`; this module writes an
export (:func:`export`) and reads one back (:func:`load`), and says what a loaded model is
(:func:`parameters`, :func:`weights_bytes`, :func:`is_torch`, :func:`scores_tokens`).
"""

from __future__ import annotations

import json
import os

import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.models.engines.base import Engine, hf_config
from lmkd.models.engines.ct2 import CT2Causal, CT2Seq2Seq
from lmkd.models.engines.ct2_convert import convert_ct2, ct2_causal_problem
from lmkd.models.engines.formats import (
    CT2_CAUSAL_TYPES,
    CT2_SEQ2SEQ_TYPES,
    EXPORT_FILE,
    FORMATS,
    HF_DIR,
    PACKAGES,
    WEIGHTS,
    engine_of,
    require,
)
from lmkd.models.engines.onnx import OrtClassifier, export_onnx
from lmkd.models.engines.torch_int8 import load_torch_int8, quantize_int8
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.models.size import count_parameters
from lmkd.models.size import weights_bytes as hf_weights_bytes

__all__ = [
    "CT2_CAUSAL_TYPES",
    "CT2_SEQ2SEQ_TYPES",
    "EXPORT_FILE",
    "FORMATS",
    "HF_DIR",
    "PACKAGES",
    "WEIGHTS",
    "CT2Causal",
    "CT2Seq2Seq",
    "Engine",
    "OrtClassifier",
    "check_exportable",
    "convert_ct2",
    "ct2_causal_problem",
    "engine_of",
    "export",
    "export_info",
    "export_onnx",
    "hf_config",
    "is_torch",
    "load",
    "load_torch_int8",
    "parameters",
    "quantize_int8",
    "require",
    "scores_tokens",
    "weights_bytes",
]


def check_exportable(fmt: str, config, kind: str) -> None:
    """One line, before any work, when ``fmt`` cannot take a ``kind`` model of this config.

    Args:
        fmt: the export format (a key of :data:`FORMATS`).
        config: the model's HF config.
        kind: the model kind (``seq2seq``, ``causal``, ``classification``).

    Returns:
        None.

    Raises:
        LmkdError: an unknown format; a format that does not take this kind (naming those that do);
            a causal LM CTranslate2 export of a type other than :data:`CT2_CAUSAL_TYPES`, or one the
            converter would get wrong (:func:`ct2_causal_problem`); an encoder-decoder type
            CTranslate2 does not convert (:data:`CT2_SEQ2SEQ_TYPES`); a Marian model whose ``<pad>``
            is not the last token (the converter drops the last vocabulary row); the engine's
            packages missing (:func:`require`).
    """
    if fmt not in FORMATS:
        raise LmkdError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if kind not in FORMATS[fmt]:
        takes = " and ".join(k for k in FORMATS[fmt])
        alt = [f for f, kinds in FORMATS.items() if kind in kinds]
        raise LmkdError(
            f"{fmt} exports {takes} models, not this {config.model_type} {kind} model; for it use "
            f"{', '.join(alt)}"
        )
    engine = engine_of(fmt)
    if engine == "ctranslate2" and kind == CAUSAL:
        if config.model_type not in CT2_CAUSAL_TYPES:
            raise LmkdError(
                f"CTranslate2 export of a {config.model_type!r} causal LM is not supported (lmkd exports "
                f"{', '.join(CT2_CAUSAL_TYPES)} causal LMs to CTranslate2); export with torch-int8 instead"
            )
        problem = ct2_causal_problem(config)
        if problem:
            raise LmkdError(
                f"CTranslate2 cannot convert this {config.model_type} model exactly: {problem}; export "
                "with torch-int8 instead"
            )
    elif engine == "ctranslate2":
        if config.model_type not in CT2_SEQ2SEQ_TYPES:
            raise LmkdError(
                f"CTranslate2 cannot convert a {config.model_type!r} encoder-decoder (it converts "
                f"{', '.join(CT2_SEQ2SEQ_TYPES)}); export with torch-int8 instead"
            )
        if config.model_type == "marian" and config.pad_token_id != config.vocab_size - 1:
            # the converter drops the last vocabulary row as Marian's <pad> (opus-mt puts it last)
            raise LmkdError(
                f"CTranslate2 converts Marian models whose <pad> is the last token (opus-mt's layout); "
                f"this one has pad id {config.pad_token_id} of {config.vocab_size}: export with "
                "torch-int8, or use a BART-style model"
            )
    require(engine)


# ---- writing -------------------------------------------------------------------------------------


def _write_meta(out: str, fmt: str, source: str, model, tokenizer, kind: str, **extra) -> None:
    from lmkd.core.io import atomic_write_json

    os.makedirs(os.path.join(out, HF_DIR), exist_ok=True)
    model.config.save_pretrained(os.path.join(out, HF_DIR))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(os.path.join(out, HF_DIR))
    tokenizer.save_pretrained(out)
    engine = engine_of(fmt)
    atomic_write_json(
        os.path.join(out, EXPORT_FILE),
        {
            "format": fmt,
            "engine": engine,
            "weights": WEIGHTS[engine],
            "source": str(source),
            "kind": kind,
            "parameters": count_parameters(model),
            **extra,
        },
        indent=1,
    )


def export(source: str, out: str, fmt: str, kind: str, sample_text: str = "a sample input") -> None:
    """Write the saved HF model ``source`` (a directory) to ``out`` in ``fmt`` (see :data:`FORMATS`).

    Besides the engine's files, ``out`` gets the tokenizer, the source's HF config and generation
    config in ``hf/``, and :data:`EXPORT_FILE` (format, engine, weights file, source, kind, parameter
    count, quantisation).

    Args:
        source: the saved HF model directory.
        out: the export directory (made if missing).
        fmt: the export format.
        kind: the model kind (``seq2seq``, ``causal``, ``classification``).
        sample_text: the text of the sample inputs an ONNX export traces.

    Returns:
        None.

    Raises:
        LmkdError: ``fmt`` cannot take this model (:func:`check_exportable`), or CTranslate2's
            converter refuses it.
    """
    model = load_model(source, kind=kind).eval()
    tokenizer = load_tokenizer(source)
    check_exportable(fmt, model.config, kind)
    os.makedirs(out, exist_ok=True)
    engine = engine_of(fmt)
    if engine == "torch-int8":
        q = quantize_int8(model)
        torch.save(q.state_dict(), os.path.join(out, WEIGHTS[engine]))
        _write_meta(
            out,
            fmt,
            source,
            model,
            tokenizer,
            kind,
            quantization="int8 dynamic (torch.ao, nn.Linear)",
        )
    elif engine == "ctranslate2":
        quantization = fmt[len("ct2-") :]
        convert_ct2(source, out, quantization)
        _write_meta(out, fmt, source, model, tokenizer, kind, quantization=quantization)
    else:
        export_onnx(model, tokenizer, out, int8=fmt == "onnx-int8", sample_text=sample_text)
        _write_meta(
            out,
            fmt,
            source,
            model,
            tokenizer,
            kind,
            quantization="int8 dynamic (onnxruntime)" if fmt == "onnx-int8" else "float32",
        )


# ---- reading -------------------------------------------------------------------------------------


def export_info(path: str) -> dict | None:
    """What an export directory holds.

    Args:
        path: a model path: an lmkd export, a plain CTranslate2 directory, an HF model directory or
            a hub id.

    Returns:
        ``lmkd_export.json`` of an lmkd export; for a plain CTranslate2 directory a description in
        the same keys (format ``ct2``, kind ``seq2seq`` with shared or source vocabularies,
        ``causal`` with one vocabulary; no source or parameter count); None for anything else (an
        HF model directory, a hub id).
    """
    path = str(path)
    meta = os.path.join(path, EXPORT_FILE)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return json.load(f)
    if os.path.isfile(os.path.join(path, "model.bin")) and any(
        os.path.isfile(os.path.join(path, n))
        for n in (
            "shared_vocabulary.json",
            "shared_vocabulary.txt",
            "source_vocabulary.json",
            "source_vocabulary.txt",
        )
    ):
        return {
            "format": "ct2",
            "engine": "ctranslate2",
            "weights": "model.bin",
            "source": None,
            "kind": SEQ2SEQ,
            "parameters": None,
        }
    if os.path.isfile(os.path.join(path, "model.bin")) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("vocabulary.json", "vocabulary.txt")
    ):
        # one vocabulary: a decoder-only model (a CTranslate2 Generator)
        return {
            "format": "ct2",
            "engine": "ctranslate2",
            "weights": "model.bin",
            "source": None,
            "kind": CAUSAL,
            "parameters": None,
        }
    return None


def weights_bytes(path: str) -> int | None:
    """Bytes of a model's weights on disk.

    Args:
        path: an export or an HF model directory.

    Returns:
        The size of the engine's weights file of an export, else
        :func:`lmkd.models.loading.weights_bytes` (None where that cannot tell).
    """
    info = export_info(path)
    if info is None:
        return hf_weights_bytes(path)
    return os.path.getsize(os.path.join(path, info["weights"]))


def parameters(model) -> int | None:
    """Parameters of a loaded model.

    Args:
        model: a model from :func:`load`.

    Returns:
        Counted for a PyTorch model, as recorded at export otherwise (an int8 model holds as many
        weights as its fp32 source, packed); None for a plain CTranslate2 directory, which records none.
    """
    recorded = getattr(model, "lmkd_parameters", None)
    if getattr(model, "lmkd_engine", None):
        return recorded
    return count_parameters(model)


def is_torch(model) -> bool:
    """Whether ``model`` is a PyTorch model with logits for teacher-forced scores (fidelity).

    Args:
        model: a model from :func:`load`.

    Returns:
        True for an HF model and a ``torch-int8`` export, False for a model run by another engine.
    """
    return not getattr(model, "lmkd_engine", None) or model.lmkd_engine == "torch-int8"


def scores_tokens(model) -> bool:
    """Whether ``model`` gives teacher-forced token scores.

    Args:
        model: a model from :func:`load`.

    Returns:
        True where it has logits (:func:`is_torch`) or, a causal LM run by CTranslate2, the
        log-probability of each token (perplexity, no fidelity).
    """
    return is_torch(model) or hasattr(model, "token_log_probs")


def load(path: str, kind: str, dtype=None, device: torch.device | str = "cpu"):
    """Load a model to evaluate, whatever its format.

    Args:
        path: an lmkd export or a CTranslate2 directory (run by its engine on ``device`` where it
            can), else a model :func:`lmkd.models.loading.load_model` takes.
        kind: the model kind the task needs.
        dtype: the precision of an HF model; an export's was fixed at export (None or ``"auto"`` only).
        device: where the model runs.

    Returns:
        ``(model, tokenizer)``; a model run by an engine carries ``lmkd_engine`` and
        ``lmkd_parameters`` (see :func:`parameters`).

    Raises:
        LmkdError: the export holds another kind of model; a ``dtype`` given for an export; a
            ``torch-int8`` or ONNX Runtime export on a device other than CPU; the engine's packages
            missing (:func:`require`); CTranslate2 cannot load it.
    """
    info = export_info(path)
    if info is None:
        return load_model(path, kind=kind, dtype=dtype).to(device).eval(), load_tokenizer(path)
    device = torch.device(device)
    if info["kind"] != kind:
        raise LmkdError(
            f"{path} holds a {info['kind']} model exported for {info['engine']}; this task needs a "
            f"{kind} model"
        )
    if dtype not in (None, "auto"):
        raise LmkdError(
            f"{path} is a {info['engine']} export whose precision was fixed at export "
            f"({info.get('quantization', 'as converted')}); drop --dtype"
        )
    tokenizer = load_tokenizer(path)
    engine = info["engine"]
    require(engine)
    if engine == "torch-int8":
        if device.type != "cpu":
            raise LmkdError(
                f"{path} is a PyTorch dynamic-int8 model, which runs on CPU only; use --device cpu"
            )
        model = load_torch_int8(path, kind)
    elif engine == "ctranslate2":
        model = (CT2Causal if kind == CAUSAL else CT2Seq2Seq)(path, tokenizer, device)
    else:
        if device.type != "cpu":
            raise LmkdError(
                f"{path} is an ONNX Runtime export, run here on CPU only; use --device cpu"
            )
        model = OrtClassifier(path)
    model.lmkd_engine, model.lmkd_parameters = engine, info.get("parameters")
    return model, tokenizer

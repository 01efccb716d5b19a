"""What an lmkd export is: the formats ``lmkd compress --export`` writes, the files an export
carries, the engine of each format and the packages each engine needs."""

from __future__ import annotations

from lmkd.core.constants import CAUSAL, CLASSIFICATION, SEQ2SEQ
from lmkd.core.errors import LmkdError

#: the file every lmkd export carries
EXPORT_FILE = "lmkd_export.json"
#: the source model's HF config (and generation config) inside an export
HF_DIR = "hf"
#: every format ``lmkd compress --export`` writes, and the model kinds it takes
FORMATS = {
    "torch-int8": (SEQ2SEQ, CAUSAL, CLASSIFICATION),
    "ct2-int8": (SEQ2SEQ, CAUSAL),
    "ct2-int8_float32": (SEQ2SEQ, CAUSAL),
    "ct2-float16": (SEQ2SEQ, CAUSAL),
    "ct2-float32": (SEQ2SEQ, CAUSAL),
    "onnx": (CLASSIFICATION,),
    "onnx-int8": (CLASSIFICATION,),
}
#: the weights file of each engine (what "bytes on disk" counts)
WEIGHTS = {"torch-int8": "model_int8.pt", "ctranslate2": "model.bin", "onnxruntime": "model.onnx"}
#: model types CTranslate2's transformers converter takes as encoder-decoders
CT2_SEQ2SEQ_TYPES = (
    "bart",
    "mbart",
    "marian",
    "t5",
    "mt5",
    "m2m_100",
    "nllb-moe",
    "pegasus",
    "whisper",
)
#: causal LM types lmkd exports to CTranslate2 (a ``Generator``): those whose conversion lmkd tests
#: token for token against PyTorch.  The converter registers more (OPT, GPT-J, GPT-NeoX, Bloom,
#: Mistral, Qwen2/3, Gemma, Phi, Falcon, ...), untested here under transformers 5: not offered.
CT2_CAUSAL_TYPES = ("gpt2", "llama")
#: the packages each engine needs
PACKAGES = {"ctranslate2": ("ctranslate2",), "onnxruntime": ("onnxruntime", "onnx")}


def engine_of(fmt: str) -> str:
    """The engine that runs an export format.

    Args:
        fmt: an export format (a key of :data:`FORMATS`, e.g. ``"ct2-int8"``).

    Returns:
        ``"ctranslate2"`` for a ``ct2-*`` format, ``"onnxruntime"`` for an ``onnx*`` one, else
        ``"torch-int8"`` (the keys of :data:`WEIGHTS` and of :data:`PACKAGES`).
    """
    return (
        "ctranslate2"
        if fmt.startswith("ct2-")
        else "onnxruntime"
        if fmt.startswith("onnx")
        else "torch-int8"
    )


def require(engine: str) -> None:
    """A one-line error when the packages of ``engine`` are not installed.

    Args:
        engine: an engine name (see :func:`engine_of`); one without packages in :data:`PACKAGES`
            (``torch-int8``) always passes.

    Returns:
        None.

    Raises:
        LmkdError: a package it needs is missing; the message names the ``pip install`` that fixes it.
    """
    import importlib.util

    missing = [p for p in PACKAGES.get(engine, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise LmkdError(
            f"{engine} needs the {' and '.join(missing)} package(s): pip install 'lmkd[deploy]' "
            f"(or pip install {' '.join(missing)})"
        )

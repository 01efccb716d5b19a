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
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from lmkd.core.constants import CAUSAL, CLASSIFICATION, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.models.loading import AUTO_CLASS, count_parameters, load_config, load_model, load_tokenizer
from lmkd.models.loading import weights_bytes as hf_weights_bytes

#: the file every lmkd export carries
EXPORT_FILE = "lmkd_export.json"
#: the source model's HF config (and generation config) inside an export
HF_DIR = "hf"
#: every format ``lmkd compress --export`` writes, and the model kinds it takes
FORMATS = {"torch-int8": (SEQ2SEQ, CAUSAL, CLASSIFICATION), "ct2-int8": (SEQ2SEQ, CAUSAL),
           "ct2-int8_float32": (SEQ2SEQ, CAUSAL), "ct2-float16": (SEQ2SEQ, CAUSAL), "ct2-float32": (SEQ2SEQ, CAUSAL),
           "onnx": (CLASSIFICATION,), "onnx-int8": (CLASSIFICATION,)}
#: the weights file of each engine (what "bytes on disk" counts)
WEIGHTS = {"torch-int8": "model_int8.pt", "ctranslate2": "model.bin", "onnxruntime": "model.onnx"}
#: model types CTranslate2's transformers converter takes as encoder-decoders
CT2_SEQ2SEQ_TYPES = ("bart", "mbart", "marian", "t5", "mt5", "m2m_100", "nllb-moe", "pegasus", "whisper")
#: causal LM types lmkd exports to CTranslate2 (a ``Generator``): those whose conversion lmkd tests
#: token for token against PyTorch.  The converter registers more (OPT, GPT-J, GPT-NeoX, Bloom,
#: Mistral, Qwen2/3, Gemma, Phi, Falcon, ...), untested here under transformers 5: not offered.
CT2_CAUSAL_TYPES = ("gpt2", "llama")
#: the packages each engine needs
PACKAGES = {"ctranslate2": ("ctranslate2",), "onnxruntime": ("onnxruntime", "onnx")}


def engine_of(fmt: str) -> str:
    return "ctranslate2" if fmt.startswith("ct2-") else "onnxruntime" if fmt.startswith("onnx") else "torch-int8"


def require(engine: str) -> None:
    """A one-line error when the packages of ``engine`` are not installed."""
    import importlib.util

    missing = [p for p in PACKAGES.get(engine, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise LmkdError(f"{engine} needs the {' and '.join(missing)} package(s): pip install 'lmkd[deploy]' "
                        f"(or pip install {' '.join(missing)})")


def check_exportable(fmt: str, config, kind: str) -> None:
    """One line, before any work, when ``fmt`` cannot take a ``kind`` model of this config."""
    if fmt not in FORMATS:
        raise LmkdError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if kind not in FORMATS[fmt]:
        takes = " and ".join(k for k in FORMATS[fmt])
        alt = [f for f, kinds in FORMATS.items() if kind in kinds]
        raise LmkdError(f"{fmt} exports {takes} models, not this {config.model_type} {kind} model; for it use "
                        f"{', '.join(alt)}")
    engine = engine_of(fmt)
    if engine == "ctranslate2" and kind == CAUSAL:
        if config.model_type not in CT2_CAUSAL_TYPES:
            raise LmkdError(f"CTranslate2 export of a {config.model_type!r} causal LM is not supported (lmkd exports "
                            f"{', '.join(CT2_CAUSAL_TYPES)} causal LMs to CTranslate2); export with torch-int8 instead")
        problem = _ct2_causal_problem(config)
        if problem:
            raise LmkdError(f"CTranslate2 cannot convert this {config.model_type} model exactly: {problem}; export "
                            "with torch-int8 instead")
    elif engine == "ctranslate2":
        if config.model_type not in CT2_SEQ2SEQ_TYPES:
            raise LmkdError(f"CTranslate2 cannot convert a {config.model_type!r} encoder-decoder (it converts "
                            f"{', '.join(CT2_SEQ2SEQ_TYPES)}); export with torch-int8 instead")
        if config.model_type == "marian" and config.pad_token_id != config.vocab_size - 1:
            # the converter drops the last vocabulary row as Marian's <pad> (opus-mt puts it last)
            raise LmkdError(f"CTranslate2 converts Marian models whose <pad> is the last token (opus-mt's layout); "
                            f"this one has pad id {config.pad_token_id} of {config.vocab_size}: export with "
                            "torch-int8, or use a BART-style model")
    require(engine)


def _ct2_causal_problem(config) -> str | None:
    """What of a GPT-2 / Llama config CTranslate2's converter would drop or get wrong, or None."""
    if config.model_type == "gpt2":
        act = config.activation_function
        if act not in ("gelu", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "quick_gelu", "relu",
                       "silu", "swish"):
            return f"its activation {act!r} has no CTranslate2 counterpart"
        plain = getattr(config, "scale_attn_weights", True) and not getattr(config, "scale_attn_by_inverse_layer_idx",
                                                                             False)
        if not plain:  # the converter ignores both settings (seen: log-probs off by 0.4-1.7 nats)
            return "its attention scores are scaled other than by 1/sqrt(head size), which the converter ignores"
        if getattr(config, "add_cross_attention", False):
            return "it has cross-attention"
    if config.model_type == "llama":  # (biases, rope_theta and linear RoPE it converts exactly: checked by hand)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
            return (f"its head size {head_dim} is not hidden size / heads ({config.hidden_size} / "
                    f"{config.num_attention_heads}), which the converter assumes")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            return f"its RoPE scaling {rope_type!r} is not one the converter implements for Llama"
    return None


# ---- writing -------------------------------------------------------------------------------------


def _write_meta(out: str, fmt: str, source: str, model, tokenizer, kind: str, **extra) -> None:
    from lmkd.core.io import atomic_write_json

    os.makedirs(os.path.join(out, HF_DIR), exist_ok=True)
    model.config.save_pretrained(os.path.join(out, HF_DIR))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(os.path.join(out, HF_DIR))
    tokenizer.save_pretrained(out)
    engine = engine_of(fmt)
    atomic_write_json(os.path.join(out, EXPORT_FILE), {
        "format": fmt, "engine": engine, "weights": WEIGHTS[engine], "source": str(source),
        "kind": kind,
        "parameters": count_parameters(model), **extra}, indent=1)


def export(source: str, out: str, fmt: str, kind: str, sample_text: str = "a sample input") -> None:
    """Write the saved HF model ``source`` (a directory) to ``out`` in ``fmt`` (see :data:`FORMATS`)."""
    model = load_model(source, kind=kind).eval()
    tokenizer = load_tokenizer(source)
    check_exportable(fmt, model.config, kind)
    os.makedirs(out, exist_ok=True)
    engine = engine_of(fmt)
    if engine == "torch-int8":
        q = quantize_int8(model)
        torch.save(q.state_dict(), os.path.join(out, WEIGHTS[engine]))
        _write_meta(out, fmt, source, model, tokenizer, kind, quantization="int8 dynamic (torch.ao, nn.Linear)")
    elif engine == "ctranslate2":
        quantization = fmt[len("ct2-"):]
        _convert_ct2(source, out, quantization)
        _write_meta(out, fmt, source, model, tokenizer, kind, quantization=quantization)
    else:
        _export_onnx(model, tokenizer, out, int8=fmt == "onnx-int8", sample_text=sample_text)
        _write_meta(out, fmt, source, model, tokenizer, kind,
                    quantization="int8 dynamic (onnxruntime)" if fmt == "onnx-int8" else "float32")


def quantize_int8(model):
    """``model`` with every ``nn.Linear`` replaced by its dynamically quantised int8 form (CPU).
    GPT-2's ``Conv1D`` layers (a linear layer with its weight stored transposed) become ``nn.Linear``
    first, or only its LM head would be quantised; ``model`` itself is left as it was."""
    import copy

    from torch.ao.quantization import quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    model = model.to("cpu").eval()
    if any(isinstance(m, Conv1D) for m in model.modules()):
        model = copy.deepcopy(model)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    linear = torch.nn.Linear(child.nx, child.nf)
                    with torch.no_grad():
                        linear.weight.copy_(child.weight.t())
                        linear.bias.copy_(child.bias)
                    setattr(parent, name, linear)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _convert_ct2(source: str, out: str, quantization: str) -> None:
    import ctranslate2.converters

    class _Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            # transformers 5 dropped BartConfig.normalize_before, which the converter reads; HF's BART
            # is post-norm (mBART's loader sets True itself), so the missing field means False
            if model.config.model_type == "bart" and not hasattr(model.config, "normalize_before"):
                model.config.normalize_before = False
            if model.config.model_type == "mbart":
                # mBART is pre-LN (a LayerNorm before each sub-layer and one after each stack), and its
                # loader reads the same missing field
                model.config.normalize_before = True
                # the loader leaves the decoder start to a target prefix (MBart-25's language code) unless
                # the tokenizer class says otherwise; a model whose decoder starts at </s> (lmkd's from-
                # scratch mBART, the study's teacher) must start there without a prefix
                if (getattr(model.config, "tokenizer_class", None) is None
                        and model.config.decoder_start_token_id == model.config.eos_token_id):
                    model.config.tokenizer_class = "PreTrainedTokenizerFast"
            return model

        def _load(self):
            spec = super()._load()
            # the converter derives T5's head size as d_model / num_heads; a T5 whose heads lmkd pruned
            # (or an mT5 built that way) has d_kv apart from it: say it in every attention spec
            config = load_config(source)
            if config.model_type in ("t5", "mt5") and config.num_heads * config.d_kv != config.d_model:
                import numpy as np

                for stack in (spec.encoder, spec.decoder):
                    for layer in stack.layer:
                        for attention in (getattr(layer, "self_attention", None), getattr(layer, "attention", None)):
                            if attention is not None:  # the attribute the spec takes as head_dim=
                                object.__setattr__(attention, "head_dim", np.dtype("int32").type(config.d_kv))
            return spec

    try:
        _Converter(source).convert(out, quantization=quantization, force=True)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as e:
        raise LmkdError(f"CTranslate2 cannot convert {source}: {str(e).splitlines()[0]}") from e


def _export_onnx(model, tokenizer, out: str, int8: bool, sample_text: str) -> None:
    enc = tokenizer([sample_text, sample_text + " " + sample_text], return_tensors="pt", padding=True)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    path = os.path.join(out, WEIGHTS["onnxruntime"])
    fp32 = path if not int8 else os.path.join(out, "model_fp32.onnx")

    class _Logits(torch.nn.Module):  # a tensor out, not a ModelOutput
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).logits

    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), tuple(enc[n] for n in names), fp32, input_names=names,
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, dynamo=False)
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" notice
        try:
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(level)
        os.remove(fp32)


# ---- reading -------------------------------------------------------------------------------------


def export_info(path: str) -> dict | None:
    """``lmkd_export.json`` of an lmkd export, a description of a plain CTranslate2 directory, or
    None for anything else (an HF model directory, a hub id)."""
    path = str(path)
    meta = os.path.join(path, EXPORT_FILE)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return json.load(f)
    if os.path.isfile(os.path.join(path, "model.bin")) and any(
            os.path.isfile(os.path.join(path, n)) for n in ("shared_vocabulary.json", "shared_vocabulary.txt",
                                                             "source_vocabulary.json", "source_vocabulary.txt")):
        return {"format": "ct2", "engine": "ctranslate2", "weights": "model.bin", "source": None, "kind": SEQ2SEQ,
                "parameters": None}
    if os.path.isfile(os.path.join(path, "model.bin")) and any(
            os.path.isfile(os.path.join(path, n)) for n in ("vocabulary.json", "vocabulary.txt")):
        # one vocabulary: a decoder-only model (a CTranslate2 Generator)
        return {"format": "ct2", "engine": "ctranslate2", "weights": "model.bin", "source": None, "kind": CAUSAL,
                "parameters": None}
    return None


def weights_bytes(path: str) -> int | None:
    """Bytes of a model's weights on disk: the engine's weights file of an export, else
    :func:`lmkd.models.loading.weights_bytes`."""
    info = export_info(path)
    if info is None:
        return hf_weights_bytes(path)
    return os.path.getsize(os.path.join(path, info["weights"]))


def parameters(model) -> int | None:
    """Parameters of a loaded model: counted for a PyTorch model, as recorded at export otherwise
    (an int8 model holds as many weights as its fp32 source, packed)."""
    recorded = getattr(model, "lmkd_parameters", None)
    if getattr(model, "lmkd_engine", None):
        return recorded
    return count_parameters(model)


def is_torch(model) -> bool:
    """Whether ``model`` is a PyTorch model with logits for teacher-forced scores (fidelity)."""
    return not getattr(model, "lmkd_engine", None) or model.lmkd_engine == "torch-int8"


def scores_tokens(model) -> bool:
    """Whether ``model`` gives teacher-forced token scores: logits (:func:`is_torch`) or, a causal LM
    run by CTranslate2, the log-probability of each token (perplexity, no fidelity)."""
    return is_torch(model) or hasattr(model, "token_log_probs")


def load(path: str, kind: str, dtype=None, device: torch.device | str = "cpu"):
    """(model, tokenizer) of ``path``: an lmkd export or a CTranslate2 directory (run by its engine
    on ``device`` where it can), else :func:`lmkd.models.loading.load_model` moved to ``device``."""
    info = export_info(path)
    if info is None:
        return load_model(path, kind=kind, dtype=dtype).to(device).eval(), load_tokenizer(path)
    device = torch.device(device)
    if info["kind"] != kind:
        raise LmkdError(f"{path} holds a {info['kind']} model exported for {info['engine']}; this task needs a "
                        f"{kind} model")
    if dtype not in (None, "auto"):
        raise LmkdError(f"{path} is a {info['engine']} export whose precision was fixed at export "
                        f"({info.get('quantization', 'as converted')}); drop --dtype")
    tokenizer = load_tokenizer(path)
    engine = info["engine"]
    require(engine)
    if engine == "torch-int8":
        if device.type != "cpu":
            raise LmkdError(f"{path} is a PyTorch dynamic-int8 model, which runs on CPU only; use --device cpu")
        model = _load_torch_int8(path, kind)
    elif engine == "ctranslate2":
        model = (CT2Causal if kind == CAUSAL else CT2Seq2Seq)(path, tokenizer, device)
    else:
        if device.type != "cpu":
            raise LmkdError(f"{path} is an ONNX Runtime export, run here on CPU only; use --device cpu")
        model = OrtClassifier(path)
    model.lmkd_engine, model.lmkd_parameters = engine, info.get("parameters")
    return model, tokenizer


def _hf_config(path: str):
    from transformers import AutoConfig

    hf = os.path.join(path, HF_DIR)
    if not os.path.isfile(os.path.join(hf, "config.json")):
        return None
    return AutoConfig.from_pretrained(hf)


def _load_torch_int8(path: str, kind: str):
    config = _hf_config(path)
    model = AUTO_CLASS[kind].from_config(config).eval()
    model = quantize_int8(model)
    state = torch.load(os.path.join(path, WEIGHTS["torch-int8"]), map_location="cpu", weights_only=False)
    model.load_state_dict(state)
    if os.path.isfile(os.path.join(path, HF_DIR, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(os.path.join(path, HF_DIR))
    return model


class _Engine(torch.nn.Module):
    """What :mod:`lmkd.models.generation` and :mod:`lmkd.models.truncation` ask of a model: ``config``, a device
    (one empty tensor), ``eval()``.

    The engine (a CTranslate2 translator or generator, an ONNX Runtime session) is made on first use
    and can be released with :meth:`close`: measured on this 2-core CPU, while a CTranslate2 translator
    that has run exists, a PyTorch model in the same process decodes 1.4-2x slower per token (even on
    one thread; deleting the translator restores it, unloading its weights does not), so
    :func:`lmkd.scoring.metrics.measure_speed` closes an engine after each of its turns."""

    def __init__(self, config, device: torch.device):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self._open()
        return self._engine

    def _open(self):
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (and its threads); the next call makes it again."""
        self._engine = None

    @property
    def device(self) -> torch.device:
        """Where inputs go (``model(**batch.to(model.device))``, as for an HF model)."""
        return self.anchor.device


def _open_ct2(cls, path: str, device: torch.device):
    """A CTranslate2 ``Translator`` / ``Generator`` of ``path`` on ``device``, with the threads PyTorch gets."""
    threads = torch.get_num_threads()  # the same threads PyTorch gets: a fair comparison
    try:
        return cls(path, device=device.type if device.type == "cuda" else "cpu", device_index=device.index or 0,
                   intra_threads=threads, inter_threads=1)
    except (RuntimeError, ValueError) as e:
        raise LmkdError(f"CTranslate2 cannot load {path}: {str(e).splitlines()[0]}") from e


def _generation_config(path: str):
    from transformers import GenerationConfig

    hf = os.path.join(path, HF_DIR)
    return (GenerationConfig.from_pretrained(hf) if os.path.isfile(os.path.join(hf, "generation_config.json"))
            else GenerationConfig())


class _CT2Engine(_Engine):
    """What both CTranslate2 engines share: the HF config and generation config an lmkd export
    carries (or a stand-in for a plain CTranslate2 directory), the tokenizer, and the CTranslate2
    object (``CT2_CLASS``: ``Translator`` / ``Generator``) made on first use."""

    CT2_CLASS = ""

    def __init__(self, path: str, tokenizer, device: torch.device):
        config = _hf_config(path)
        if config is None:  # a CTranslate2 directory not written by lmkd
            config = self._plain_config(tokenizer)
        super().__init__(config, torch.device("cpu") if device.type != "cuda" else device)
        self.tokenizer = tokenizer
        self.path, self.device_spec = str(path), device
        self._engine = self._open()  # a model that cannot be loaded says so now
        self.generation_config = _generation_config(path)

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        raise NotImplementedError

    def _open(self):
        import ctranslate2

        return _open_ct2(getattr(ctranslate2, self.CT2_CLASS), self.path, self.device_spec)

    @staticmethod
    def _rows(input_ids, attention_mask) -> list[torch.Tensor]:
        """Per row, the positions of its real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return [m.bool().nonzero().flatten() for m in attention_mask.cpu()]

    def _tokens(self, ids: torch.Tensor, rows: list[torch.Tensor]) -> list[list[str]]:
        """The token strings of each row's real tokens (what CTranslate2 takes)."""
        return [self.tokenizer.convert_ids_to_tokens(ids[i, idx].tolist()) for i, idx in enumerate(rows)]

    def _decoding_options(self) -> dict:
        """The model's own generation config as CTranslate2's decoding options (as HF applies it)."""
        gc = self.generation_config
        return dict(length_penalty=gc.length_penalty if gc.length_penalty is not None else 1.0,
                    no_repeat_ngram_size=gc.no_repeat_ngram_size or 0,
                    repetition_penalty=gc.repetition_penalty or 1.0, max_batch_size=0)


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """``rows`` of token ids padded on the right with ``pad`` into one ``[len(rows), longest]`` tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


class CT2Seq2Seq(_CT2Engine):
    """A CTranslate2 ``Translator`` behind HF's ``generate(input_ids, attention_mask, ...)``: the
    same token ids in, the same ``[decoder start] + tokens`` out, so lmkd's generation loops, their
    truncation rule and the fixed-length speed runner work unchanged.  The model's own generation
    config (length penalty, no-repeat n-grams, repetition penalty) applies, as it does in HF."""

    CT2_CLASS = "Translator"

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        return SimpleNamespace(is_encoder_decoder=True, model_type="ctranslate2", decoder_start_token_id=None)

    @property
    def translator(self):
        return self.engine

    def generate(self, input_ids, attention_mask=None, num_beams: int = 1, max_new_tokens: int = 128,
                 min_new_tokens: int = 0, do_sample: bool = False, **_) -> torch.Tensor:
        ids = input_ids.cpu()
        sources = self._tokens(ids, self._rows(ids, attention_mask))
        gc = self.generation_config
        # HF's forced_eos_token_id makes the last of max_new_tokens an EOS: decode one fewer and add it
        # (not when the length is fixed -- min_new_tokens == max_new_tokens -- where HF decodes them all)
        forced_eos = gc.forced_eos_token_id is not None and min_new_tokens < max_new_tokens
        limit = max_new_tokens - 1 if forced_eos else max_new_tokens
        results = self.translator.translate_batch(
            sources, beam_size=num_beams, max_decoding_length=limit, min_decoding_length=min_new_tokens,
            **self._decoding_options())
        start = getattr(self.config, "decoder_start_token_id", None)
        start = self.tokenizer.pad_token_id if start is None else start
        rows = [[start] + self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
        if forced_eos:
            eos = gc.forced_eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            rows = [r + [eos] if len(r) == limit + 1 else r for r in rows]
        return _padded(rows, self.tokenizer.pad_token_id or 0)


class CT2Causal(_CT2Engine):
    """A CTranslate2 ``Generator`` of a causal LM, called like the HF model:

    * :meth:`token_log_probs` -- ``log p(token t | tokens < t)`` of every real token after the first
      (``score_batch`` on exactly the given tokens: nothing prepended, the first token not scored, as
      :mod:`lmkd.evaluate.fidelity` scores a PyTorch causal LM), which ``lmkd evaluate`` turns into perplexity;
    * ``forward(input_ids, attention_mask)`` -- ``.logits`` from ``forward_batch`` (what the speed
      runner of ``--task causal-lm`` times, as it times a PyTorch model's forward pass);
    * ``generate(input_ids, attention_mask, max_new_tokens, min_new_tokens, num_beams)`` -- the
      input ids (as given, padding included) followed by the new ids, EOS kept and the rows padded
      after it, as HF's ``generate`` returns them.

    The model's own generation config (EOS ids, pad id, repetition penalty, no-repeat n-grams, length
    penalty) applies, as it does in HF."""

    CT2_CLASS = "Generator"

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        return SimpleNamespace(is_encoder_decoder=False, model_type="ctranslate2",
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    @property
    def generator(self):
        return self.engine

    def token_log_probs(self, input_ids, attention_mask=None) -> torch.Tensor:
        """``[batch, length - 1]``: at ``t - 1``, the log-probability of the token at ``t`` given the
        real tokens before it (the causal alignment of :mod:`lmkd.data.positions`); 0 where ``t`` is padding
        or a row's first real token."""
        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        out = torch.zeros(ids.shape[0], max(ids.shape[1] - 1, 0), dtype=torch.float32)
        scored = [i for i, idx in enumerate(rows) if len(idx) >= 2]
        if scored:
            tokens = self._tokens(ids, rows)
            results = self.generator.score_batch([tokens[i] for i in scored], max_batch_size=0, max_input_length=0)
            for i, r in zip(scored, results):
                out[i, rows[i][1:] - 1] = torch.tensor(r.log_probs, dtype=torch.float32)
        return out

    def forward(self, input_ids, attention_mask=None, **_) -> SimpleNamespace:
        """``.logits`` ``[batch, length, vocabulary]`` at the real tokens' positions (0 at padding)."""
        import numpy as np

        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        view = self.generator.forward_batch([ids[i, idx].tolist() for i, idx in enumerate(rows)])
        device = self.device
        # CTranslate2's memory, shared (CPU: numpy's array interface; GPU: __cuda_array_interface__): copied
        # once below, into a tensor of the input's layout -- the speed runner times this as a forward pass
        logits = torch.as_tensor(view, device=device) if device.type == "cuda" else torch.from_numpy(np.asarray(view))
        right_padded = all(len(idx) == 0 or int(idx[-1]) == len(idx) - 1 for idx in rows)
        if right_padded and logits.shape[1] == ids.shape[1]:
            out = logits.clone()
            for i, idx in enumerate(rows):
                out[i, len(idx):] = 0
        else:
            out = torch.zeros(*ids.shape, logits.shape[-1], dtype=logits.dtype, device=device)
            for i, idx in enumerate(rows):
                out[i, idx.to(device)] = logits[i, :len(idx)]
        return SimpleNamespace(logits=out)

    def _eos_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def generate(self, input_ids, attention_mask=None, num_beams: int = 1, max_new_tokens: int = 128,
                 min_new_tokens: int = 0, do_sample: bool = False, **_) -> torch.Tensor:
        if do_sample:
            raise LmkdError("a CTranslate2 causal LM export decodes greedily or by beam search here, not by sampling")
        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        prompts = self._tokens(ids, rows)
        gc, eos = self.generation_config, self._eos_ids()
        # the prompt is forwarded at once and not returned: max/min_length count the new tokens only
        results = self.generator.generate_batch(
            prompts, max_length=max_new_tokens, min_length=min_new_tokens, beam_size=num_beams,
            include_prompt_in_result=False, end_token=eos or None, return_end_token=True, **self._decoding_options())
        pad = gc.pad_token_id if gc.pad_token_id is not None else eos[0] if eos else (self.tokenizer.pad_token_id or 0)
        return torch.cat([ids, _padded([r.sequences_ids[0] for r in results], pad)], dim=1)


class OrtClassifier(_Engine):
    """An ONNX Runtime session of a sequence classifier, called like the HF model (``.logits``)."""

    def __init__(self, path: str):
        super().__init__(_hf_config(path), torch.device("cpu"))
        self.path = path
        self._engine = self._open()
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _open(self):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(os.path.join(self.path, WEIGHTS["onnxruntime"]), opts,
                                            providers=["CPUExecutionProvider"])

    @property
    def session(self):
        return self.engine

    def forward(self, **batch):
        feed = {n: batch[n].cpu().numpy() for n in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))


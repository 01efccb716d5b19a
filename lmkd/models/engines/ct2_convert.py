"""What CTranslate2's converter can take (:func:`ct2_causal_problem`), and the conversion itself
(:func:`convert_ct2`), mended where the converter and transformers 5 disagree."""

from __future__ import annotations

from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_config


def ct2_causal_problem(config) -> str | None:
    """What of a GPT-2 / Llama config CTranslate2's converter would drop or get wrong.

    Args:
        config: the HF config of a causal LM.

    Returns:
        One phrase saying what would go wrong (an activation without a CTranslate2 counterpart,
        attention scaled other than by 1/sqrt(head size), cross-attention, a Llama head size other
        than hidden size / heads, a RoPE scaling the converter does not implement), or None when
        the conversion is exact (or the model type is neither ``gpt2`` nor ``llama``).
    """
    if config.model_type == "gpt2":
        act = config.activation_function
        if act not in (
            "gelu",
            "gelu_fast",
            "gelu_new",
            "gelu_python",
            "gelu_pytorch_tanh",
            "quick_gelu",
            "relu",
            "silu",
            "swish",
        ):
            return f"its activation {act!r} has no CTranslate2 counterpart"
        plain = getattr(config, "scale_attn_weights", True) and not getattr(
            config, "scale_attn_by_inverse_layer_idx", False
        )
        if not plain:  # the converter ignores both settings (seen: log-probs off by 0.4-1.7 nats)
            return "its attention scores are scaled other than by 1/sqrt(head size), which the converter ignores"
        if getattr(config, "add_cross_attention", False):
            return "it has cross-attention"
    if (
        config.model_type == "llama"
    ):  # (biases, rope_theta and linear RoPE it converts exactly: checked by hand)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
            return (
                f"its head size {head_dim} is not hidden size / heads ({config.hidden_size} / "
                f"{config.num_attention_heads}), which the converter assumes"
            )
        rope = (
            getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        )
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            return f"its RoPE scaling {rope_type!r} is not one the converter implements for Llama"
    return None


def convert_ct2(source: str, out: str, quantization: str) -> None:
    """Convert a saved HF model to CTranslate2 with its ``TransformersConverter``, mended where it and
    transformers 5 disagree: BART's missing ``normalize_before`` (post-norm), mBART's (pre-norm) and
    its decoder start (no target prefix for a model whose decoder starts at ``</s>``), and T5 heads
    whose ``d_kv`` is not ``d_model / num_heads`` (pruned heads).

    Args:
        source: the saved HF model directory.
        out: the directory to write (overwritten).
        quantization: CTranslate2's quantisation (``int8``, ``int8_float32``, ``float16``, ``float32``).

    Returns:
        None.

    Raises:
        LmkdError: the converter refuses the model (its first line of the reason).
    """
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
                if (
                    getattr(model.config, "tokenizer_class", None) is None
                    and model.config.decoder_start_token_id == model.config.eos_token_id
                ):
                    model.config.tokenizer_class = "PreTrainedTokenizerFast"
            return model

        def _load(self):
            spec = super()._load()
            # the converter derives T5's head size as d_model / num_heads; a T5 whose heads lmkd pruned
            # (or an mT5 built that way) has d_kv apart from it: say it in every attention spec
            config = load_config(source)
            if (
                config.model_type in ("t5", "mt5")
                and config.num_heads * config.d_kv != config.d_model
            ):
                import numpy as np

                for stack in (spec.encoder, spec.decoder):
                    for layer in stack.layer:
                        for attention in (
                            getattr(layer, "self_attention", None),
                            getattr(layer, "attention", None),
                        ):
                            if attention is not None:  # the attribute the spec takes as head_dim=
                                object.__setattr__(
                                    attention, "head_dim", np.dtype("int32").type(config.d_kv)
                                )
            return spec

    try:
        _Converter(source).convert(out, quantization=quantization, force=True)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as e:
        raise LmkdError(f"CTranslate2 cannot convert {source}: {str(e).splitlines()[0]}") from e

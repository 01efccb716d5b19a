"""make_student: a smaller student built by copying chosen teacher layers.

DistilBERT (Sanh et al., 2019) initialises its student from every other teacher layer; Shleifer &
Rush (2020, "shrink and fine-tune") copy chosen encoder and decoder layers of BART/Pegasus/Marian.
One table says, per architecture, where each layer stack lives and which config field counts it;
the copying itself is the same code for every model.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import PreTrainedModel

from .errors import LmkdError
from .modeling import unwrap

#: model_type -> {stack name: (module path of the layer list inside the state dict, config field)}
LAYER_STACKS: dict[str, dict[str, tuple[str, str]]] = {
    **{t: {"layers": ("encoder.layer", "num_hidden_layers")}
       for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2")},
    "distilbert": {"layers": ("transformer.layer", "n_layers")},
    **{t: {"encoder": ("encoder.block", "num_layers"), "decoder": ("decoder.block", "num_decoder_layers")}
       for t in ("t5", "mt5", "umt5")},
    **{t: {"encoder": ("encoder.layers", "encoder_layers"), "decoder": ("decoder.layers", "decoder_layers")}
       for t in ("bart", "mbart", "marian", "pegasus", "blenderbot", "m2m_100", "nllb-moe", "plbart")},
    "gpt2": {"layers": ("h", "n_layer")},
    "gpt_neo": {"layers": ("h", "num_layers")},
    **{t: {"layers": ("layers", "num_hidden_layers")}
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
                 "gpt_neox", "olmo", "olmo2", "cohere", "starcoder2", "smollm3", "granite")},
}

# Per-layer config lists that must shrink with the stack (e.g. sliding/full attention patterns).
_PER_LAYER_FIELDS = ("layer_types",)


def stacks_of(model_or_config) -> dict[str, tuple[str, str]]:
    config = getattr(model_or_config, "config", model_or_config)
    stacks = LAYER_STACKS.get(config.model_type)
    if stacks is None:
        raise LmkdError(f"make_student does not know where the layers of a {config.model_type!r} model are; "
                        f"supported: {', '.join(sorted(LAYER_STACKS))}")
    return stacks


def every_other(n: int) -> list[int]:
    """DistilBERT's choice: layers 0, 2, 4, ... (12 -> 6 layers, 3 -> 2, 1 -> 1)."""
    return list(range(0, n, 2))


def make_student(
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    encoder_layers: list[int] | None = None,
    decoder_layers: list[int] | None = None,
) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only the chosen layers of each stack.

    ``layers`` applies to single-stack models (BERT, GPT-2, Llama); ``encoder_layers`` and
    ``decoder_layers`` to encoder-decoders.  A stack left unspecified keeps every other layer.
    Embeddings, final norms and heads are copied as they are.  Student layer ``i`` of a stack is
    teacher layer ``chosen[i]`` bit for bit.  The chosen indices are recorded in the student's
    config as ``lmkd_layer_map`` (used by the feature losses) and the result is a plain HF model.
    """
    teacher = unwrap(teacher)
    stacks = stacks_of(teacher)
    requested = {"layers": layers, "encoder": encoder_layers, "decoder": decoder_layers}
    for name, chosen in requested.items():
        if chosen is not None and name not in stacks:
            raise LmkdError(f"a {teacher.config.model_type} model has no {name!r} layer stack; "
                            f"use {' / '.join('--' + s + '-layers' if s != 'layers' else '--layers' for s in stacks)}")

    config = copy.deepcopy(teacher.config)
    layer_map: dict[str, list[int]] = {}
    for name, (_, field) in stacks.items():
        n = getattr(config, field)
        if n is None and field == "num_decoder_layers":  # T5 configs may leave it unset (= num_layers)
            n = config.num_layers
        chosen = list(requested[name]) if requested[name] is not None else every_other(n)
        if not chosen:
            raise LmkdError(f"the student needs at least one {name} layer")
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise LmkdError(f"{name} layer index {bad[0]} is out of range: the teacher has {n} {name} layers "
                            f"(0..{n - 1})")
        layer_map[name] = chosen
        setattr(config, field, len(chosen))
        for per_layer in _PER_LAYER_FIELDS:
            values = getattr(config, per_layer, None)
            if isinstance(values, list) and len(values) == n and len(stacks) == 1:
                setattr(config, per_layer, [values[i] for i in chosen])
    if all(len(layer_map[s]) >= getattr(teacher.config, f) for s, (_, f) in stacks.items()
           if getattr(teacher.config, f) is not None):
        raise LmkdError("the student would not be smaller than the teacher: choose fewer layers")
    config.lmkd_layer_map = layer_map

    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)
    t_state = teacher.state_dict()
    patterns = {name: re.compile(r"(^|\.)" + re.escape(path) + r"\.(\d+)\.") for name, (path, _) in stacks.items()}
    new_state = {}
    for key, value in student.state_dict().items():
        src = key
        for name, pat in patterns.items():
            m = pat.search(key)
            if m:
                i = int(m.group(2))
                src = key[: m.start(2)] + str(layer_map[name][i]) + key[m.end(2):]
                if src not in t_state:  # e.g. T5's relative attention bias lives in block 0 only
                    src = key[: m.start(2)] + "0" + key[m.end(2):]
                break
        if src not in t_state or t_state[src].shape != value.shape:
            raise LmkdError(f"cannot copy {key} from the teacher (no matching weight {src})")
        new_state[key] = t_state[src].detach().clone()
    student.load_state_dict(new_state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

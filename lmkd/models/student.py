"""make_student: a smaller student built by copying chosen teacher layers.

DistilBERT (Sanh et al., 2019) initialises its student from every other teacher layer; Shleifer &
Rush (2020, "shrink and fine-tune") copy chosen encoder and decoder layers of BART/Pegasus/Marian.
One table says, per architecture, where each layer stack lives and which config field counts it;
the copying itself is the same code for every model.

The student-shape search of ``lmkd study`` lives here too: :func:`copied_layers_within` (the most
teacher layers that fit in a parameter budget, spread by :func:`spread_layers`) and
:func:`scaled_student_config` (a fresh, narrower config of the teacher's family when no copy fits).
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import PreTrainedModel

from lmkd.core.errors import LmkdError
from lmkd.models.loading import AUTO_CLASS, model_kind, unwrap
from lmkd.models.size import count_parameters

#: model_type -> {stack name: (module path of the layer list inside the state dict, config field)}
LAYER_STACKS: dict[str, dict[str, tuple[str, str]]] = {
    **{
        t: {"layers": ("encoder.layer", "num_hidden_layers")}
        for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2")
    },
    "distilbert": {"layers": ("transformer.layer", "n_layers")},
    **{
        t: {
            "encoder": ("encoder.block", "num_layers"),
            "decoder": ("decoder.block", "num_decoder_layers"),
        }
        for t in ("t5", "mt5", "umt5")
    },
    **{
        t: {
            "encoder": ("encoder.layers", "encoder_layers"),
            "decoder": ("decoder.layers", "decoder_layers"),
        }
        for t in (
            "bart",
            "mbart",
            "marian",
            "pegasus",
            "blenderbot",
            "m2m_100",
            "nllb-moe",
            "plbart",
        )
    },
    "gpt2": {"layers": ("h", "n_layer")},
    "gpt_neo": {"layers": ("h", "num_layers")},
    **{
        t: {"layers": ("layers", "num_hidden_layers")}
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi",
            "phi3",
            "gpt_neox",
            "olmo",
            "olmo2",
            "cohere",
            "starcoder2",
            "smollm3",
            "granite",
        )
    },
}

# Per-layer config lists that must shrink with the stack (e.g. sliding/full attention patterns).
_PER_LAYER_FIELDS = ("layer_types",)


def stacks_of(model_or_config) -> dict[str, tuple[str, str]]:
    """Where the layer stacks of a model are (:data:`LAYER_STACKS` of its model type).

    Args:
        model_or_config: a model or its config.

    Returns:
        Per stack name (``layers``, or ``encoder`` and ``decoder``), the entry of :data:`LAYER_STACKS`.

    Raises:
        LmkdError: a model type whose layers make_student does not know.
    """
    config = getattr(model_or_config, "config", model_or_config)
    stacks = LAYER_STACKS.get(config.model_type)
    if stacks is None:
        raise LmkdError(
            f"make_student does not know where the layers of a {config.model_type!r} model are; "
            f"supported: {', '.join(sorted(LAYER_STACKS))}"
        )
    return stacks


def every_other(n: int) -> list[int]:
    """DistilBERT's choice: layers 0, 2, 4, ... (12 -> 6 layers, 3 -> 2, 1 -> 1).

    Args:
        n: the teacher's layers.

    Returns:
        The indices to keep.
    """
    return list(range(0, n, 2))


def _check_chosen(stack: str, chosen: list[int], n: int) -> None:
    """One-line errors for a layer list of ``stack`` ("layers", "encoder", "decoder") of a teacher
    stack of ``n`` layers: empty, out of range, repeated, or not in increasing order."""
    what = "layer" if stack == "layers" else f"{stack} layer"  # "layer 5", "encoder layer 5"
    flag = "--layers" if stack == "layers" else f"--{stack}-layers"
    listed = ",".join(str(i) for i in chosen)
    if not chosen:
        raise LmkdError(f"the student needs at least one {what}; {flag} is empty")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise LmkdError(
            f"{what} index {bad[0]} is out of range: the teacher has {n} {what}s (0..{n - 1})"
        )
    repeated = sorted({i for i in chosen if chosen.count(i) > 1})
    if repeated:
        raise LmkdError(
            f"{flag} {listed} names {what} {repeated[0]} more than once; list each teacher {what} "
            "once"
        )
    if chosen != sorted(chosen):
        raise LmkdError(
            f"{flag} {listed} is not in increasing order; list the teacher {what}s in the order they "
            f"run, e.g. {','.join(str(i) for i in sorted(chosen))}"
        )


def make_student(
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    encoder_layers: list[int] | None = None,
    decoder_layers: list[int] | None = None,
) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only the chosen layers of each stack.

    A stack left unspecified keeps every other layer.  Embeddings, final norms and heads are copied
    as they are.  Student layer ``i`` of a stack is teacher layer ``chosen[i]`` bit for bit.  The
    chosen indices are recorded in the student's config as ``lmkd_layer_map`` (used by the feature
    losses) and the result is a plain HF model.

    Args:
        teacher: the teacher model.
        layers: the layers to keep of a single-stack model (BERT, GPT-2, Llama).
        encoder_layers: the encoder layers to keep of an encoder-decoder.
        decoder_layers: the decoder layers to keep of an encoder-decoder.

    Returns:
        The student.

    Raises:
        LmkdError: a model type it does not know; an option that does not apply to the model's
            stacks; an empty, out-of-range, repeated or unordered layer list; a student that would not
            be smaller than the teacher; a weight that cannot be copied.
    """
    teacher = unwrap(teacher)
    stacks = stacks_of(teacher)
    requested = {"layers": layers, "encoder": encoder_layers, "decoder": decoder_layers}
    for name, chosen in requested.items():
        if chosen is not None and name not in stacks:
            flag = "--layers" if name == "layers" else f"--{name}-layers"
            has = "one stack of layers" if "layers" in stacks else "an encoder and a decoder"
            use = " / ".join("--layers" if s == "layers" else f"--{s}-layers" for s in stacks)
            raise LmkdError(
                f"a {teacher.config.model_type} model has {has}, so {flag} does not apply; use {use}"
            )

    config = copy.deepcopy(teacher.config)
    layer_map: dict[str, list[int]] = {}
    for name, (_, field) in stacks.items():
        n = getattr(config, field)
        if (
            n is None and field == "num_decoder_layers"
        ):  # T5 configs may leave it unset (= num_layers)
            n = config.num_layers
        chosen = list(requested[name]) if requested[name] is not None else every_other(n)
        _check_chosen(name, chosen, n)
        layer_map[name] = chosen
        setattr(config, field, len(chosen))
        for per_layer in _PER_LAYER_FIELDS:
            values = getattr(config, per_layer, None)
            if isinstance(values, list) and len(values) == n and len(stacks) == 1:
                setattr(config, per_layer, [values[i] for i in chosen])
    if all(
        len(layer_map[s]) >= getattr(teacher.config, f)
        for s, (_, f) in stacks.items()
        if getattr(teacher.config, f) is not None
    ):
        raise LmkdError("the student would not be smaller than the teacher: choose fewer layers")
    config.lmkd_layer_map = layer_map

    student = type(teacher)(config).to(dtype=next(teacher.parameters()).dtype)
    t_state = teacher.state_dict()
    patterns = {
        name: re.compile(r"(^|\.)" + re.escape(path) + r"\.(\d+)\.")
        for name, (path, _) in stacks.items()
    }
    new_state = {}
    for key, value in student.state_dict().items():
        src = key
        for name, pat in patterns.items():
            m = pat.search(key)
            if m:
                i = int(m.group(2))
                src = key[: m.start(2)] + str(layer_map[name][i]) + key[m.end(2) :]
                if src not in t_state:  # e.g. T5's relative attention bias lives in block 0 only
                    src = key[: m.start(2)] + "0" + key[m.end(2) :]
                break
        if src not in t_state or t_state[src].shape != value.shape:
            raise LmkdError(f"cannot copy {key} from the teacher (no matching weight {src})")
        new_state[key] = t_state[src].detach().clone()
    student.load_state_dict(new_state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


# ---- student shapes within a parameter budget ---------------------------------------------------

# Width/depth fields per config family, for students scaled down from the teacher's config.
_SHAPE_FIELDS = {
    "bart": dict(
        d="d_model",
        ffn=("encoder_ffn_dim", "decoder_ffn_dim"),
        heads=("encoder_attention_heads", "decoder_attention_heads"),
        layers=("encoder_layers", "decoder_layers"),
    ),
    "t5": dict(
        d="d_model",
        ffn=("d_ff",),
        heads=("num_heads",),
        layers=("num_layers", "num_decoder_layers"),
        kv="d_kv",
    ),
    "bert": dict(
        d="hidden_size",
        ffn=("intermediate_size",),
        heads=("num_attention_heads",),
        layers=("num_hidden_layers",),
    ),
}
_FAMILY = {
    **{
        t: "bart" for t in ("bart", "mbart", "marian", "pegasus", "m2m_100", "plbart", "blenderbot")
    },
    **{t: "t5" for t in ("t5", "mt5", "umt5")},
    **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}


def _count_on_meta(config, kind: str) -> int:
    """Parameters of a ``kind`` model built from ``config`` on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return count_parameters(AUTO_CLASS[kind].from_config(config))


def scaled_student_config(teacher, fraction: float):
    """The config of a fresh student with at most ``fraction`` of the teacher's parameters: the
    teacher's config with width (d_model / 2^k, heads and feed-forward scaled alike) and depth
    chosen to give the most parameters within the limit.

    Args:
        teacher: the teacher model.
        fraction: the largest share of its parameters.

    Returns:
        The student's config.

    Raises:
        LmkdError: a teacher type the study cannot scale down, or no student of its shape that fits.
    """
    config = teacher.config
    family = _FAMILY.get(config.model_type)
    if family is None:
        raise LmkdError(
            f"lmkd study cannot scale down a {config.model_type!r} teacher; supported: "
            f"{', '.join(sorted(_FAMILY))} (or build a student with lmkd make-student and distil it)"
        )
    f = _SHAPE_FIELDS[family]
    kind = model_kind(teacher)
    limit = fraction * count_parameters(teacher)
    d0 = getattr(config, f["d"])
    heads0 = getattr(config, f["heads"][0])
    ffn0 = getattr(config, f["ffn"][0])
    layers0 = max(getattr(config, n) or getattr(config, f["layers"][0]) for n in f["layers"])
    best = None
    for k in range(0, 4):
        d = d0 // (2**k)
        if d < 8 or d0 % (2**k):
            break
        heads = max(1, heads0 // (2**k)) if d % max(1, heads0 // (2**k)) == 0 else 1
        for layers in range(1, layers0 + 1):
            cfg = copy.deepcopy(config)
            setattr(cfg, f["d"], d)
            for n in f["heads"]:
                setattr(cfg, n, heads)
            for n in f["ffn"]:
                setattr(cfg, n, max(1, ffn0 // (2**k)))
            for n in f["layers"]:
                setattr(cfg, n, layers)
            if "kv" in f:
                setattr(cfg, f["kv"], d // heads)
            if hasattr(cfg, "lmkd_layer_map"):
                del cfg.lmkd_layer_map
            n_params = _count_on_meta(cfg, kind)
            if n_params <= limit and (best is None or n_params > best[0]):
                best = (n_params, cfg)
    if best is None:
        raise LmkdError(
            f"no student of this teacher's shape fits in {fraction:g} of its parameters (the "
            "embeddings alone are larger); pass a larger --student-sizes value"
        )
    return best[1]


def spread_layers(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices spread from the first to the last (k=1: the first), as Shleifer &
    Rush's shrink-and-fine-tune tables (12 -> 3: 0, 6, 11).

    Args:
        n: the teacher's layers.
        k: the layers to keep.

    Returns:
        The indices, increasing.
    """
    return [0] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def copied_layers_within(teacher, fraction: float) -> dict[str, list[int]] | None:
    """The encoder/decoder layers to copy from a seq2seq teacher (make_student) for the largest
    student within ``fraction`` of its parameters.

    Args:
        teacher: the seq2seq teacher.
        fraction: the largest share of its parameters.

    Returns:
        ``{"encoder": [...], "decoder": [...]}`` (layer indices, :func:`spread_layers`), or None when
        even one layer each is too big (then the study builds a fresh, narrower student).
    """
    stacks = stacks_of(teacher)
    if set(stacks) != {"encoder", "decoder"}:
        return None
    config = teacher.config
    counts = {name: getattr(config, f) or config.num_layers for name, (_, f) in stacks.items()}
    limit = fraction * count_parameters(teacher)
    best = None
    for ke in range(1, counts["encoder"] + 1):
        for kd in range(1, counts["decoder"] + 1):
            if (ke, kd) == (counts["encoder"], counts["decoder"]):
                continue
            cfg = copy.deepcopy(config)
            setattr(cfg, stacks["encoder"][1], ke)
            setattr(cfg, stacks["decoder"][1], kd)
            n = _count_on_meta(cfg, model_kind(teacher))
            if n <= limit and (best is None or n > best[0]):
                best = (
                    n,
                    {
                        "encoder": spread_layers(counts["encoder"], ke),
                        "decoder": spread_layers(counts["decoder"], kd),
                    },
                )
    return best[1] if best else None

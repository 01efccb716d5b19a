"""Feature distillation: the hidden-state (hint), attention-map and relation terms of the loss.

:class:`FeatureDistiller` holds what those terms need beyond the tensors -- which teacher layer
each student layer is compared with (``layer_map``, make-student's ``lmkd_layer_map``, else
evenly spaced), the learned hint projections when the hidden sizes differ, which outputs to ask
the models for -- and computes ``hidden_weight * hidden + attention_weight * attention +
relation_weight * relation`` of a micro-batch.  :class:`lmkd.DistillationTrainer` builds one when a
feature weight is > 0; its Trainer overrides call the functions at the end of this module for the
projections' optimizer groups, gradients across processes and checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch
from torch import nn
from transformers import PreTrainedModel

from lmkd import losses
from lmkd.core.constants import IGNORE_INDEX, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.data.positions import token_mask
from lmkd.models.loading import unwrap
from lmkd.models.student import stacks_of
from lmkd.train.config_checks import parse_layer_map
from lmkd.train.loss_stats import LossStats

logger = logging.getLogger(__name__)

#: file holding the hint projections in each checkpoint dir (never in the saved student)
PROJECTIONS_NAME = "lmkd_projections.pt"
#: the feature/relation terms, each logged as ``loss_<name>``
FEATURE_TERMS = ("hidden", "attention", "relation")
#: which output fields hold each layer stack's (hidden states, attention maps)
STACK_OUTPUTS = {
    "layers": ("hidden_states", "attentions"),
    "encoder": ("encoder_hidden_states", "encoder_attentions"),
    "decoder": ("decoder_hidden_states", "decoder_attentions"),
}


def _layer_counts(model_or_config) -> dict[str, int] | None:
    """{stack: number of layers} from the config of a model (or a config), None for an unknown type."""
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    try:
        stacks = stacks_of(config)
    except LmkdError:
        return None
    return {stack: getattr(config, field, None) for stack, (_, field) in stacks.items()}


def resolve_layer_pairs(
    args, layer_spec, student_config, stack: str, n_s: int, n_t: int
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of ``stack``.

    From ``layer_map`` (``layer_spec``, parsed), else the layers make_student copied
    (``lmkd_layer_map``), else evenly spaced ending at the last layer; negative indices resolved.

    Args:
        args: the run's :class:`lmkd.DistillationConfig` (its ``layer_map`` text, for errors).
        layer_spec: the parsed ``layer_map`` (stack or ``*`` -> pairs), or None.
        student_config: the student's config (its ``lmkd_layer_map``, when make-student wrote one).
        stack: the layer stack: ``layers``, ``encoder`` or ``decoder``.
        n_s: the student's layers in that stack.
        n_t: the teacher's layers in that stack.

    Returns:
        The pairs, with non-negative indices.

    Raises:
        LmkdError: ``layer_map`` says nothing about ``stack``, or a pair is out of range.
    """
    copied = getattr(student_config, "lmkd_layer_map", None)
    copied = copied.get(stack) if isinstance(copied, dict) else None
    if layer_spec is not None:
        pairs = layer_spec.get(stack, layer_spec.get("*"))
        where = f"layer_map {args.layer_map!r}"
        if pairs is None:
            raise LmkdError(f"{where} says nothing about the {stack} stack; add '{stack}=...'")
    elif copied is not None and len(copied) == n_s:
        pairs, where = list(enumerate(copied)), "the student's lmkd_layer_map (from make-student)"
    else:
        pairs = [(i, (i + 1) * n_t // n_s - 1) for i in range(n_s)]
        where = "the evenly spaced layer map"
    resolved = []
    for i, j in pairs:
        i2, j2 = i + n_s if i < 0 else i, j + n_t if j < 0 else j
        if not (0 <= i2 < n_s and 0 <= j2 < n_t):
            what = "" if stack == "layers" else f"{stack} "  # ("layers", not "layers layers")
            raise LmkdError(
                f"{where} pairs {what}layers {i}:{j}, but the student has {n_s} and the teacher "
                f"{n_t} {what}layers; set layer_map (e.g. '-1:-1')"
            )
        resolved.append((i2, j2))
    return resolved


def check_layer_maps(args, kind: str, student, teacher) -> None:
    """Resolve the layer map of every layer stack from the layer counts in the configs of
    ``student`` and ``teacher``, so that a map out of range is refused before any training (or any
    model load), not at the first step.  Models whose layers lmkd does not know are left to the
    first step; without feature terms nothing is checked.

    Args:
        args: the run's :class:`lmkd.DistillationConfig`.
        kind: the model kind (seq2seq: the encoder and decoder stacks; else one stack).
        student: the student model or config.
        teacher: the teacher model or config.

    Raises:
        LmkdError: a layer map out of range (:func:`resolve_layer_pairs`).
    """
    if not args.uses_features:
        return
    counts = [_layer_counts(m) for m in (student, teacher)]
    if None in counts:
        return
    spec = parse_layer_map(args.layer_map) if args.layer_map is not None else None
    student_config = getattr(unwrap(student), "config", student)
    for stack in ("encoder", "decoder") if kind == SEQ2SEQ else ("layers",):
        n_s, n_t = counts[0].get(stack), counts[1].get(stack)
        if isinstance(n_s, int) and isinstance(n_t, int) and n_s > 0 and n_t > 0:
            resolve_layer_pairs(args, spec, student_config, stack, n_s, n_t)


class FeatureDistiller:
    """The feature/relation terms of one run (``args`` a :class:`lmkd.DistillationConfig` with a
    hidden, attention or relation weight > 0).

    Building it switches both models to eager attention when attention maps are needed, and
    creates :attr:`projections` (one ``nn.Linear`` per layer stack, trained with the student, never
    saved with it) when the hint loss compares hidden states of different sizes.

    Args:
        args: the run's :class:`lmkd.DistillationConfig`.
        kind: the model kind (seq2seq: encoder and decoder stacks; else one stack).
        student: the student model (unwrapped here).
        teacher: the one Hugging Face teacher model.
        device: where the projections are created.
        deepspeed: whether the run uses DeepSpeed (which the projections do not support).

    Raises:
        LmkdError: the teacher is not one Hugging Face model (e.g. an ensemble), a model cannot use
            eager attention for the attention term, a layer map is out of range, or the hidden
            sizes differ under DeepSpeed.
    """

    def __init__(self, args, kind: str, student, teacher, *, device=None, deepspeed: bool = False):
        self.args, self.kind = args, kind
        self.student = unwrap(student)
        self.layer_spec = parse_layer_map(args.layer_map) if args.layer_map is not None else None
        self.projections = nn.ModuleDict()
        self._pairs: dict = {}
        teacher = unwrap(teacher)
        if not isinstance(teacher, PreTrainedModel):
            raise LmkdError(
                f"hidden/attention/relation losses need one Hugging Face teacher model, not a "
                f"{type(teacher).__name__} (e.g. a teacher ensemble); set their weights to 0"
            )
        if args.attention_weight > 0:
            for who, m in (("student", self.student), ("teacher", teacher)):
                if m.config._attn_implementation != "eager":
                    try:
                        m.set_attn_implementation("eager")
                    except (ValueError, ImportError) as e:
                        raise LmkdError(
                            f"attention_weight > 0 needs attention maps but the {who} cannot use "
                            f"eager attention ({str(e).splitlines()[0]}); set attention_weight 0"
                        ) from e
        self.check_layer_maps(teacher)
        if args.hidden_weight > 0:
            d_s = self.student.config.get_text_config().hidden_size
            d_t = teacher.config.get_text_config().hidden_size
            if d_s != d_t:
                if deepspeed:
                    raise LmkdError(
                        f"student hidden size {d_s} differs from the teacher's {d_t}: the hint "
                        "projection is not supported under DeepSpeed; use relation_weight (no "
                        "projection needed) or a student of the teacher's width"
                    )
                dtype = next(self.student.parameters()).dtype
                dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
                for stack in self.stacks():
                    self.projections[stack] = nn.Linear(d_s, d_t).to(device=device, dtype=dtype)
                logger.info(
                    "hidden sizes differ (student %d, teacher %d): training a linear projection per layer "
                    "stack (%s) for the hint loss",
                    d_s,
                    d_t,
                    ", ".join(self.projections),
                )

    def check_layer_maps(self, teacher) -> None:
        """:func:`check_layer_maps` of this run's student and ``teacher``.

        Args:
            teacher: the teacher model or config.

        Raises:
            LmkdError: a layer map out of range.
        """
        check_layer_maps(self.args, self.kind, self.student, teacher)

    def stacks(self) -> tuple[str, ...]:
        """The layer stacks compared: encoder and decoder of a seq2seq model, else its one stack."""
        return ("encoder", "decoder") if self.kind == SEQ2SEQ else ("layers",)

    def output_flags(self) -> dict:
        """Forward keywords asking for hidden states / attention maps, only those a loss needs."""
        a = self.args
        flags = {}
        if a.hidden_weight > 0 or a.relation_weight > 0:
            flags["output_hidden_states"] = True
        if a.attention_weight > 0:
            flags["output_attentions"] = True
        return flags

    def stack_masks(self, inputs: dict) -> dict[str, torch.Tensor]:
        """Per layer stack, the (batch, seq) mask of the real tokens its hidden states cover.

        Args:
            inputs: the collated batch (seq2seq: the decoder's mask is where ``labels`` are set).

        Returns:
            stack name -> boolean mask.
        """
        enc = token_mask(inputs)
        if self.kind == SEQ2SEQ:
            return {"encoder": enc, "decoder": inputs["labels"].ne(IGNORE_INDEX)}
        return {"layers": enc}

    def count_items(self, batch_samples: list, gather=None) -> dict[str, int]:
        """Tokens per stack and examples in the accumulated batch.

        Args:
            batch_samples: the micro-batches of one optimizer step.
            gather: sums the counts tensor over processes (None: this process's counts).

        Returns:
            stack name (and ``examples``) -> count.
        """
        names = list(self.stacks()) + ["examples"]
        counts = torch.zeros(len(names), dtype=torch.long)
        for batch in batch_samples:
            masks = self.stack_masks(batch)
            for k, name in enumerate(names[:-1]):
                counts[k] += int(masks[name].sum())
            counts[-1] += int(batch["input_ids"].shape[0])
        if gather is not None:
            counts = gather(counts)
        return dict(zip(names, counts.tolist()))

    def layer_pairs(self, stack: str, n_s: int, n_t: int) -> list[tuple[int, int]]:
        """(student layer, teacher layer) pairs of ``stack`` (:func:`resolve_layer_pairs`), cached.

        Args:
            stack: the layer stack.
            n_s: the student's layers in it.
            n_t: the teacher's layers in it.

        Returns:
            The pairs.

        Raises:
            LmkdError: a pair out of range.
        """
        key = (stack, n_s, n_t)
        if key not in self._pairs:
            self._pairs[key] = resolve_layer_pairs(
                self.args, self.layer_spec, self.student.config, stack, n_s, n_t
            )
        return self._pairs[key]

    def loss(
        self, outputs, t_outputs, inputs: dict, totals: dict | None = None
    ) -> tuple[torch.Tensor, LossStats]:
        """``hidden_weight * hidden + attention_weight * attention + relation_weight * relation``.

        Each term is the mean over all mapped (stack, layer) pairs of a per-token (hidden,
        attention) or per-example (relation) loss, normalised by ``totals`` like the KD term.  The
        logged ``loss_<term>`` is the mean over micro-batches of the micro-batch's own average.
        Afterwards the hidden states and attention maps are dropped from ``outputs``.

        Args:
            outputs: the student's outputs (with hidden states / attention maps).
            t_outputs: the teacher's outputs.
            inputs: the collated batch.
            totals: the tokens/examples of the whole accumulated batch (:meth:`count_items`;
                ``LossCounts.features``), None: this micro-batch's own.

        Returns:
            (the weighted feature loss, this micro-batch's logged terms).
        """
        args = self.args
        masks = self.stack_masks(inputs)
        local = {stack: int(m.sum()) for stack, m in masks.items()}
        local["examples"] = int(inputs["input_ids"].shape[0])
        totals = totals or local

        pairs = {}
        for stack in masks:
            hs_key, att_key = STACK_OUTPUTS[stack]
            key = hs_key if "output_hidden_states" in self.output_flags() else att_key
            s_out, t_out = outputs.get(key), t_outputs.get(key)
            if not s_out or not t_out:
                raise LmkdError(
                    f"the models returned no {key}; feature losses need models whose forward accepts "
                    f"output_hidden_states/output_attentions (and eager attention for attention maps)"
                )
            shift = 1 if key == hs_key else 0  # hidden_states[0] is the embedding output
            pairs[stack] = self.layer_pairs(stack, len(s_out) - shift, len(t_out) - shift)
        n_pairs = sum(len(p) for p in pairs.values())

        stats = LossStats()
        total = torch.zeros((), dtype=torch.float32, device=inputs["input_ids"].device)
        for name, weight in (
            ("hidden", args.hidden_weight),
            ("attention", args.attention_weight),
            ("relation", args.relation_weight),
        ):
            if weight <= 0:
                continue
            value, logged = 0.0, 0.0
            for stack, mask in masks.items():
                hs_key, att_key = STACK_OUTPUTS[stack]
                raw = 0.0
                for i, j in pairs[stack]:
                    if name == "hidden":
                        raw = raw + losses.hint_loss(
                            outputs[hs_key][i + 1],
                            t_outputs[hs_key][j + 1],
                            self.projections[stack] if stack in self.projections else None,
                            mask,
                            loss=args.hidden_loss,
                        )
                    elif name == "attention":
                        raw = raw + losses.attention_loss(
                            outputs[att_key][i],
                            t_outputs[att_key][j],
                            mask,
                            loss=args.attention_loss,
                        )
                    else:
                        raw = raw + losses.relation_loss(
                            outputs[hs_key][i + 1],
                            t_outputs[hs_key][j + 1],
                            mask,
                            loss=args.relation_loss,
                            pooling=args.relation_pooling,
                        )
                count = "examples" if name == "relation" else stack
                value = value + raw / max(totals[count], 1)
                logged += float(raw.detach()) / max(local[count], 1)
            total = total + weight * value / n_pairs
            getattr(stats, name).add(logged / n_pairs)
        # Keep hidden states/attention maps out of what prediction_step gathers as predictions.
        for keys in STACK_OUTPUTS.values():
            for k in keys:
                if k in outputs:
                    OrderedDict.__delitem__(outputs, k)  # ModelOutput forbids del
                    object.__setattr__(outputs, k, None)
        return total, stats


# ---- the hint projections in training: optimizer groups, gradients, checkpoints ---------------------


def projection_param_groups(projections: nn.ModuleDict, weight_decay: float) -> list[dict]:
    """The optimizer groups of the hint projections: their weights with ``weight_decay``, their
    biases without (as the Trainer groups the student's parameters).

    Args:
        projections: the hint projections.
        weight_decay: the weights' decay.

    Returns:
        Two parameter groups: the weights, then the biases.
    """
    params = dict(projections.named_parameters())
    return [
        {
            "params": [p for n, p in params.items() if not n.endswith("bias")],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0},
    ]


def average_projection_grads(projections: nn.ModuleDict, world_size: int) -> None:
    """Average the projections' gradients over the processes by hand: they live outside the
    DDP-wrapped model, so DDP does not.  A missing gradient counts as zeros.

    Args:
        projections: the hint projections.
        world_size: the number of processes.
    """
    for p in projections.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world_size


def save_projections(projections: nn.ModuleDict, checkpoint: str) -> None:
    """Write the projections into the checkpoint directory ``checkpoint`` (when it exists).

    Args:
        projections: the hint projections.
        checkpoint: the checkpoint directory.
    """
    if os.path.isdir(checkpoint):
        torch.save(projections.state_dict(), os.path.join(checkpoint, PROJECTIONS_NAME))


def load_projections(projections: nn.ModuleDict, checkpoint: str, device=None) -> None:
    """Restore the projections from the checkpoint directory ``checkpoint``; without their file
    there, say that they restart from a random initialisation.

    Args:
        projections: the hint projections, loaded in place.
        checkpoint: the checkpoint directory.
        device: where the saved tensors are mapped.
    """
    path = os.path.join(checkpoint, PROJECTIONS_NAME)
    if os.path.isfile(path):
        projections.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    else:
        logger.warning(
            "%s has no %s: the hint projections restart from a random initialisation",
            checkpoint,
            PROJECTIONS_NAME,
        )

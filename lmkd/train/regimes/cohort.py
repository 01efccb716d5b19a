"""Co-distillation / deep mutual learning (Zhang et al. 2018): ``cohort_size: K``.

K students trained together, no teacher: :class:`CohortModel` (the members as one module),
:class:`CoDistillationTrainer` (each member's CE + KD towards the others), and the run-level side
-- which checkpoints the members start from (:func:`cohort_paths`, :func:`load_cohort`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os

import torch
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import find_labels

from lmkd import losses
from lmkd.core.errors import LmkdError
from lmkd.data.positions import shifted_labels
from lmkd.models.loading import load_model, model_kind, unwrap
from lmkd.models.vocabulary import vocab_size_of
from lmkd.train.objective import ce_smoothing
from lmkd.train.regimes.base import RegimeTrainer

logger = logging.getLogger(__name__)


def has_dropout(model) -> bool:
    """Whether a forward of ``model`` in train mode is random: a dropout module with p > 0, or a
    dropout or LayerDrop rate (``dropout``, ``attention_dropout``, ``*_pdrop``, ``layerdrop``) > 0
    kept as a float by a module that applies it functionally (BART, Llama attention).

    Args:
        model: the model (possibly wrapped).

    Returns:
        True when some module drops out.
    """
    for m in unwrap(model).modules():
        if "Dropout" in type(m).__name__ and float(getattr(m, "p", 0) or 0) > 0:
            return True
        for name, value in vars(m).items():
            if (
                any(w in name for w in ("dropout", "pdrop", "layerdrop"))
                and isinstance(value, float)
                and value > 0
            ):
                return True
    return False


def same_weights(a, b) -> bool:
    """Whether two models hold bit-identical parameters and buffers.

    Args:
        a: one model (possibly wrapped).
        b: the other.

    Returns:
        True when their state dicts have the same keys, shapes and values.
    """
    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


def check_cohort_can_differ(members) -> None:
    """Refuse a cohort whose members cannot become different: identical starting weights and no
    dropout (the same batches, no randomness per member) keep them bit-identical, so every KD
    term is exactly 0 and the run is K copies of plain fine-tuning.

    Args:
        members: the cohort's students.

    Raises:
        LmkdError: no member has dropout and all start from identical weights.
    """
    if any(has_dropout(m) for m in members):
        return
    if all(same_weights(members[0], m) for m in members[1:]):
        raise LmkdError(
            f"the cohort's {len(members)} members start from identical weights and have no dropout, so "
            "they would stay identical (KD term exactly 0); give each member its own checkpoint "
            "(student_model_name_or_path: a,b,... one per member) or use a student with dropout"
        )


class CohortModel(nn.Module):
    """K students trained together (deep mutual learning).  One ``nn.Module`` so the Trainer's
    optimizer, device placement and DDP wrapping cover all of them; ``forward`` returns the list
    of the members' outputs.

    Args:
        members: the students (at least two, of one kind and one output size, able to differ:
            :func:`check_cohort_can_differ`).

    Raises:
        LmkdError: fewer than two members, mixed model kinds, different output sizes, or members
            that would stay identical.
    """

    main_input_name = "input_ids"

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise LmkdError("a cohort needs at least two students (cohort_size >= 2)")
        kinds = {model_kind(m) for m in members}
        if len(kinds) > 1:
            raise LmkdError(
                f"the cohort mixes model kinds ({', '.join(sorted(kinds))}); use students of one kind"
            )
        if len({vocab_size_of(m) for m in members}) > 1:
            raise LmkdError(
                "the cohort's students have different output sizes; use one vocabulary (label set)"
            )
        check_cohort_can_differ(members)
        self.members = nn.ModuleList(members)
        self.lmkd_kind = kinds.pop()

    @classmethod
    def copies(cls, student, k: int) -> CohortModel:
        """``k`` members that start as copies of ``student``; they diverge through their own dropout
        masks.  A student without dropout is refused (its copies would stay identical): pass
        differently initialised students to ``CohortModel([...])`` instead.

        Args:
            student: the model copied (it is member 0 itself).
            k: the number of members.

        Returns:
            The cohort.

        Raises:
            LmkdError: ``k`` < 2, or a student without dropout.
        """
        return cls([student] + [copy.deepcopy(student) for _ in range(k - 1)])

    @property
    def config(self):
        return self.members[0].config

    def forward(self, **inputs):
        """Every member's forward on the same inputs.

        Args:
            **inputs: the forward keywords.

        Returns:
            The members' outputs, in member order.
        """
        return [m(**inputs) for m in self.members]


class CoDistillationTrainer(RegimeTrainer):
    """Online co-distillation / deep mutual learning (Zhang et al. 2018): no pretrained teacher;
    member k's loss is ``(1 - kd_alpha) * CE_k + kd_alpha * KD(target_k, member k)``, with
    ``target_k`` the detached average of the other members' softened distributions (passed to the
    KD loss as the logits ``tau * log mean_{j != k} softmax(z_j / tau)``, so the temperature-``tau``
    loss sees exactly that average).  The trained loss is the sum over members (each member's
    gradient comes from its own terms only).  ``save_model`` writes every member to
    ``member-k`` (each a plain HF model) and member 0 also to the directory itself.

    Args:
        model: a :class:`CohortModel`, or one student made into ``args.cohort_size`` copies
            (:meth:`CohortModel.copies`).
        args: the run's :class:`lmkd.DistillationConfig`.
        **kwargs: RegimeTrainer's other arguments (no ``teacher_model``).

    Raises:
        LmkdError: one student with ``cohort_size`` < 2, a ``teacher_model`` given, or a config
            co-distillation cannot run.
    """

    regimes_run = ("cohort_size",)

    def __init__(self, model=None, args=None, **kwargs):
        if args is not None and not isinstance(model, CohortModel):
            if args.cohort_size < 2:
                raise LmkdError(
                    "co-distillation needs cohort_size >= 2 (or model=CohortModel([...]))"
                )
            model = CohortModel.copies(model, args.cohort_size)
        if kwargs.get("teacher_model") is not None:
            raise LmkdError("co-distillation trains without a teacher; drop teacher_model")
        super().__init__(model=model, args=args, **kwargs)
        if (
            self.args.label_names is None
        ):  # the Trainer looked for them in CohortModel.forward; use a member's
            self.label_names = find_labels(type(unwrap(self.model).members[0]))
        self.args.check_co_distillation()  # (the config ran it already when cohort_size > 1)

    @property
    def uses_teacher(self) -> bool:
        return False

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            member = unwrap(self.model).members[0]
            self._signature_columns = list(inspect.signature(member.forward).parameters) + list(
                {"label", "label_ids", *self.label_names}
            )
        super()._set_signature_columns_if_needed()

    def member_targets(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per member, the detached KD target logits ``tau * log mean_{j != k} softmax(z_j / tau)``.

        Args:
            logits: the members' (shifted) logits, in member order.

        Returns:
            The target logits of each member, in member order.
        """
        tau, k = self.args.kd_temperature, len(logits)
        with torch.no_grad():
            logp = torch.stack(
                [torch.log_softmax(z.detach().float() / tau, dim=-1) for z in logits]
            )
            out = []
            for i in range(k):
                others = torch.cat([logp[:i], logp[i + 1 :]])
                out.append(tau * (torch.logsumexp(others, dim=0) - math.log(k - 1)))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The members' summed CE + KD losses (each member's KD towards the others' detached average).

        Args:
            model: the :class:`CohortModel` (as the Trainer wrapped it).
            inputs: the collated batch.
            return_outputs: also return member 0's outputs.
            num_items_in_batch: the accumulated batch's :class:`lmkd.train.loss_stats.LossCounts`
                (None: this micro-batch's own).

        Returns:
            The loss, or (loss, member 0's outputs).
        """
        args = self.args
        members = unwrap(model).members
        outputs = model(**self.forward_inputs(members[0], inputs))
        logits = [self.shifted(o.logits) for o in outputs]
        ce_mask, kd_mask = self.position_masks(inputs)
        counts, scale = self.loss_counts(num_items_in_batch)
        n_ce, n_kd = (
            counts[:2]
            if counts is not None
            else (int(ce_mask.sum()) if ce_mask is not None else 0, int(kd_mask.sum()))
        )
        alpha, k = args.kd_alpha, len(logits)
        targets = self.member_targets(logits) if alpha > 0 else [None] * k
        stats = self.loss_stats["train" if model.training else "eval"]
        loss = logits[0].new_zeros((), dtype=torch.float32)
        labels = inputs.get("labels")
        labels = shifted_labels(self.kind, labels) if labels is not None else None
        for z, target in zip(logits, targets):
            if ce_mask is not None and alpha < 1:
                ce_sum = losses.cross_entropy(
                    z,
                    labels,
                    label_smoothing=ce_smoothing(args, model.training),
                )
                loss = loss + (1 - alpha) * ce_sum / max(n_ce, 1)
                stats.ce.add(ce_sum.item() / k, int(ce_mask.sum()) / k)
            if alpha > 0:
                kd_sum = losses.token_kd_loss(
                    z,
                    target,
                    kd_mask,
                    loss=args.kd_loss,
                    temperature=args.kd_temperature,
                    beta=args.jsd_beta,
                )
                loss = loss + alpha * kd_sum / max(n_kd, 1)
                stats.kd.add(kd_sum.item() / k, int(kd_mask.sum()) / k)
        if not torch.isfinite(loss):
            raise LmkdError(
                f"the loss became {loss.item()} at step {self.state.global_step}; lower the learning "
                "rate or check the data for empty targets"
            )
        loss = loss * scale
        return (loss, outputs[0]) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        members = unwrap(self.accelerator.unwrap_model(self.model)).members
        for k, member in enumerate(members):
            for path in [os.path.join(output_dir, f"member-{k}")] + (
                [output_dir] if k == 0 else []
            ):
                os.makedirs(path, exist_ok=True)
                member.save_pretrained(path)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(path)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        members = unwrap(model if model is not None else self.model).members
        for k, member in enumerate(members):
            path = os.path.join(resume_from_checkpoint, f"member-{k}")
            if not os.path.isdir(path):
                raise LmkdError(
                    f"{resume_from_checkpoint} has no {os.path.basename(path)}; it is not a checkpoint "
                    f"of a cohort of {len(members)}"
                )
            member.load_state_dict(type(member).from_pretrained(path).state_dict())


def cohort_paths(model_args, args) -> list[str]:
    """The student checkpoints of a run: one, or -- co-distillation -- one per cohort member
    (``student_model_name_or_path: a,b,c`` with ``cohort_size: 3``) or one for all of them.

    Args:
        model_args: the run's ModelArguments.
        args: the run's DistillationConfig.

    Returns:
        The checkpoint paths.
    """
    paths = [p.strip() for p in str(model_args.student_model_name_or_path).split(",") if p.strip()]
    if not paths:
        raise LmkdError("student_model_name_or_path is empty; name the student checkpoint")
    if len(paths) > 1 and args.cohort_size != len(paths):
        raise LmkdError(
            f"student_model_name_or_path names {len(paths)} students: that is a co-distillation cohort, "
            f"set cohort_size {len(paths)} (or name one student)"
        )
    return paths


def load_cohort(paths: list[str], kind: str, args) -> CohortModel:
    """The members of a co-distillation cohort: each from its own checkpoint, or -- one path for
    all -- K loads of it, member k under seed ``seed + k`` so that weights the checkpoint lacks
    (a new classification head) start differently.  A cohort that cannot differ is refused
    (:func:`check_cohort_can_differ`).

    Args:
        paths: the members' checkpoints (one per member, or one for all).
        kind: the model kind.
        args: the run's DistillationConfig (``cohort_size``, ``seed``).

    Returns:
        The :class:`CohortModel`.
    """
    members = []
    for k in range(args.cohort_size):
        torch.manual_seed(args.seed + k)
        members.append(load_model(paths[k] if len(paths) > 1 else paths[0], kind=kind))
    torch.manual_seed(args.seed)
    logger.info(
        "co-distillation cohort of %d: %s",
        len(members),
        ", ".join(paths)
        if len(paths) > 1
        else f"{len(members)} loads of {paths[0]} (seeds {args.seed}.."
        f"{args.seed + len(members) - 1} for weights it lacks)",
    )
    return CohortModel(members)

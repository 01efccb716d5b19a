"""Distillation regimes beyond one fixed teacher, on the same trainer, config and CLI.

* **Transfer sets** (unlabelled data): ``kd_alpha: 1`` trains on KD alone; a classification run with
  ``kd_alpha: 1`` never reads the label column (:func:`lmkd.train.run.unlabelled_data_args`).
  ``transfer_file`` mixes an unlabelled set into a labelled one (classification, causal-lm, mlm): its
  rows get KD but no CE, and the CE is averaged over the labelled rows only
  (:func:`lmkd.train.run.add_transfer_set`, :class:`TransferCollator`, :class:`RegimeTrainer`).  A seq2seq student needs target tokens to
  train on: either give an unlabelled seq2seq transfer set the teacher's outputs with ``lmkd
  generate`` and distil on them (sequence-level KD), or train on the inputs alone on-policy
  (``on_policy_fraction: 1``: the targets are the student's own samples, scored by the teacher).
* **Teacher ensembles**: :class:`lmkd.teacher.frozen.EnsembleTeacher` averages several teachers' softened
  distributions; ``teacher_model_name_or_path: a,b`` (+ ``teacher_weights``) builds one.
* **Born-again networks** (Furlanello et al. 2018): ``rounds: N`` (:func:`lmkd.train.run.run_born_again`,
  a driver of whole runs, so it lives with them).
* **Co-distillation / deep mutual learning** (Zhang et al. 2018): ``cohort_size: K``
  (:class:`CohortModel`, :class:`CoDistillationTrainer`).
* **On-policy KD** (GKD, Agarwal et al. 2024): ``on_policy_fraction: lambda``
  (:class:`OnPolicyDistillationTrainer`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import random

import torch
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import find_labels

from lmkd import losses
from lmkd.core.constants import CAUSAL, CLASSIFICATION, IGNORE_INDEX, MLM, SEQ2SEQ, TASK_KIND
from lmkd.data.dataset import PROMPT_LENGTH
from lmkd.core.errors import LmkdError
from lmkd.models.generation import eos_mask, eos_token_ids, generate_seeded, pad_token_id
from lmkd.models.loading import model_kind, unwrap, vocab_size_of
from lmkd.models.truncation import describe_truncation, generation_lengths, target_limit, truncation_note
from lmkd.data.positions import shifted_labels, token_mask
from lmkd.teacher.frozen import EnsembleTeacher
from lmkd.train.trainer import DistillationTrainer

logger = logging.getLogger(__name__)

#: batch key: per row, whether it has a label (rows of a transfer_file have none)
LABELLED = "lmkd_labelled"
#: batch key: present on a batch whose targets are the student's own generations
ON_POLICY = "lmkd_on_policy"
REGIME_KEYS = (LABELLED, ON_POLICY, PROMPT_LENGTH)  # (PROMPT_LENGTH: lmkd.data.dataset, each row's prompt in tokens)


# ---- unlabelled transfer sets (the data side: lmkd.train.run) ----------------------------------------


class TransferCollator:
    """Wraps a task's collator: takes the :data:`LABELLED` flag off every example, collates the rest,
    sets the labels of unlabelled rows to -100 (causal-lm/mlm; classification rows already have
    -100) and returns the flags as a boolean tensor under :data:`LABELLED`."""

    def __init__(self, collator, kind: str):
        self.collator, self.kind = collator, kind

    def __call__(self, features):
        flags = torch.tensor([bool(f.get(LABELLED, 1)) for f in features], dtype=torch.bool)
        batch = self.collator([{k: v for k, v in f.items() if k != LABELLED} for f in features])
        labels = batch.get("labels")
        if labels is not None and self.kind != CLASSIFICATION:
            batch["labels"] = labels.masked_fill(~flags[:, None], IGNORE_INDEX)
        batch[LABELLED] = flags
        return batch


class PromptLengthCollator:
    """Wraps a collator: takes :data:`lmkd.data.dataset.PROMPT_LENGTH` off every example and returns the
    prompt lengths as a tensor under that key (-1 for a row without one, e.g. of a transfer set)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        lengths = torch.tensor([int(f.get(PROMPT_LENGTH, -1)) for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != PROMPT_LENGTH} for f in features])
        batch[PROMPT_LENGTH] = lengths
        return batch


# ---- trainers ------------------------------------------------------------------------------------


class RegimeTrainer(DistillationTrainer):
    """DistillationTrainer that also understands the regime keys of a batch: rows without labels
    (:data:`LABELLED`, from ``transfer_file``) get KD on their tokens and no CE; a batch tagged
    :data:`ON_POLICY` gets no CE.  Without those keys it is exactly DistillationTrainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.teacher, EnsembleTeacher) and self.teacher.temperature != self.args.kd_temperature:
            raise LmkdError(f"EnsembleTeacher(temperature={self.teacher.temperature}) must use the trainer's "
                            f"kd_temperature {self.args.kd_temperature}")
        if isinstance(self.teacher, EnsembleTeacher) and self.args.kd_loss == "mse":
            raise LmkdError("a teacher ensemble averages distributions, not logits: use kd_loss forward_kl, "
                            "reverse_kl or jsd")
        if self.kind == MLM and self.args.mlm_kd_positions == "masked" and isinstance(self.data_collator,
                                                                                        TransferCollator):
            raise LmkdError("transfer_file with mlm needs mlm_kd_positions all (unlabelled rows have no masked "
                            "targets of their own)")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in (LABELLED, PROMPT_LENGTH):  # keep the flag and prompt lengths through remove_unused_columns
            if key not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, key]

    def forward_inputs(self, model, inputs: dict) -> dict:
        fwd = super().forward_inputs(model, inputs)
        for key in REGIME_KEYS:
            fwd.pop(key, None)
        return fwd

    def position_masks(self, inputs: dict):
        ce, kd = super().position_masks(inputs)
        if ON_POLICY in inputs:  # the targets are the student's own samples: KD only
            return None, kd
        flags = inputs.get(LABELLED)
        if flags is None:
            return ce, kd
        flags = flags.to(kd.device)
        if self.kind == CLASSIFICATION:
            return (flags if ce is not None else None), kd
        # causal/mlm: unlabelled rows have labels -100 (no CE); KD covers their real tokens
        tokens = token_mask(inputs, shift=self.kind == CAUSAL)
        return ce, kd | (tokens & ~flags[:, None])


class OnPolicyDistillationTrainer(RegimeTrainer):
    """On-policy KD (GKD, Agarwal et al. 2024) for causal and seq2seq students.

    Each micro-batch is, with probability ``on_policy_fraction`` (a coin of :meth:`on_policy_coin`, a
    function of the seed and the micro-batch's index in the run, so a resumed run draws what an
    uninterrupted one does, no torch random state is touched and ``on_policy_fraction: 0`` is
    exactly DistillationTrainer), replaced by the student's own samples (``do_sample``,
    ``on_policy_temperature``, full distribution, ``on_policy_max_new_tokens``; seq2seq: given the
    batch's inputs, causal: given each row's own prompt -- its ``prompt_column`` length, else its
    first ``on_policy_prompt_tokens`` tokens), generated in eval mode under the seed
    :attr:`last_generation_seed` (``seed + 1 + index``, in a forked RNG).  The teacher scores those tokens and the loss
    on them is ``kd_alpha * JSD_beta`` (``kd_loss: jsd``) with no CE; generated tokens up to and
    including the first EOS count.  Batches kept from the data train as usual (GKD's supervised
    KD).  The replacement happens before the token counts of the accumulated batch are taken, so
    gradient accumulation stays exact."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.kind not in (CAUSAL, SEQ2SEQ):
            raise LmkdError(f"on-policy KD needs a generative student (causal or seq2seq LM), not a {self.kind} "
                            "model; set on_policy_fraction 0")
        if self.teacher is None:
            raise LmkdError("on-policy KD scores the student's samples with a live teacher: set kd_alpha > 0 and "
                            "teacher_model_name_or_path (a logit_cache only covers the fixed data)")
        self.max_new_tokens = self.fitted_new_tokens()
        self.on_policy_batches = 0
        self.last_generation_seed: int | None = None
        self.batch_index: int | None = None  # the micro-batch being drawn, counted over the whole run

    def on_policy_coin(self, index: int) -> bool:
        """Whether micro-batch ``index`` (counted from the start of the run) is on-policy: a function of
        (seed, index) alone, so a resumed run draws exactly what an uninterrupted one does."""
        return random.Random(f"lmkd-on-policy:{self.args.seed}:{index}").random() < self.args.on_policy_fraction

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer.get_batch_samples, with the on-policy batches swapped in before counting tokens."""
        lam, batch_samples = self.args.on_policy_fraction, []
        first = self.state.global_step * self.args.gradient_accumulation_steps  # (restored on resume)
        for i in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            self.batch_index = first + i
            if lam > 0 and self.on_policy_coin(self.batch_index):
                batch = self.on_policy_batch(self.model, batch)
            elif self.kind == SEQ2SEQ and batch.get("labels") is None:
                raise LmkdError("seq2seq training data without targets can only train on-policy: set "
                                "on_policy_fraction 1, or give the data targets (lmkd generate)")
            batch_samples.append(batch)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def fitted_new_tokens(self) -> int:
        """``on_policy_max_new_tokens`` lowered, by the one truncation rule of lmkd.models.loading, so the
        student's samples fit the position tables of the student and the teacher that scores them:
        seq2seq -- start token + new tokens in the decoder's table; causal -- the prompt (at most
        ``on_policy_prompt_tokens``) + new tokens in the table.  Logged once when lowered."""
        a, models = self.args, [self.model, self.teacher]
        asked = a.on_policy_max_new_tokens
        limit = target_limit(models)  # the decoder's table (seq2seq), the one table (causal)
        if self.kind == SEQ2SEQ:
            new = generation_lengths(models, None, None, asked)[1]
        else:
            new = asked if limit is None else min(asked, limit - min(a.on_policy_prompt_tokens, limit - 1))
        if new < asked:
            logger.warning("on-policy KD: %s", describe_truncation(truncation_note("new tokens", 1, 1, new, asked,
                                                                                   limit)))
        return new

    def generation_kwargs(self) -> dict:
        a = self.args
        return dict(do_sample=True, temperature=a.on_policy_temperature, top_k=0, top_p=1.0, num_beams=1,
                    max_new_tokens=self.max_new_tokens)

    @torch.no_grad()
    def on_policy_batch(self, model, batch: dict) -> dict:
        """``batch`` with its targets replaced by the student's samples (tagged :data:`ON_POLICY`)."""

        student = unwrap(model)
        device = next(student.parameters()).device
        ids = batch["input_ids"].to(device)
        att = batch.get("attention_mask")
        att = att.to(device) if att is not None else torch.ones_like(ids)
        pad = pad_token_id(student)
        index = self.batch_index if self.batch_index is not None else self.on_policy_batches
        self.last_generation_seed = self.args.seed + 1 + index
        self.on_policy_batches += 1
        if self.kind != CAUSAL:
            out = generate_seeded(student, self.last_generation_seed, input_ids=ids, attention_mask=att,
                                  pad_token_id=pad, **self.generation_kwargs())
            new = out[:, 1:]  # after the decoder start token
            labels = new.masked_fill(~eos_mask(new, eos_token_ids(student)), losses.IGNORE_INDEX)
            return {"input_ids": ids, "attention_mask": att, "labels": labels,
                    ON_POLICY: torch.ones((), dtype=torch.bool)}
        # causal: each row continues its own prompt -- its prompt_column length, else its first
        # on_policy_prompt_tokens tokens (at most all but one) -- left-padded for generation
        rows = [row[m.bool()] for row, m in zip(ids, att)]
        given = batch.get(PROMPT_LENGTH)
        lengths = []
        for k, row in enumerate(rows):
            n = int(given[k]) if given is not None and int(given[k]) > 0 else min(self.args.on_policy_prompt_tokens,
                                                                                  len(row) - 1)
            lengths.append(max(1, min(n, len(row))))
        width = max(lengths)
        prompt = torch.full((len(rows), width), pad, dtype=ids.dtype, device=device)
        p_att = torch.zeros_like(prompt)
        for k, (row, n) in enumerate(zip(rows, lengths)):
            prompt[k, width - n:], p_att[k, width - n:] = row[:n], 1
        out = generate_seeded(student, self.last_generation_seed, input_ids=prompt, attention_mask=p_att,
                              pad_token_id=pad, **self.generation_kwargs())
        new = out[:, width:]
        valid = eos_mask(new, eos_token_ids(student))  # generated tokens up to and including the first EOS
        # the scored batch, right-padded: row k = its prompt, then its generated tokens
        t = new.shape[1]
        input_ids = torch.full((len(rows), width + t), pad, dtype=ids.dtype, device=device)
        labels = torch.full_like(input_ids, losses.IGNORE_INDEX)
        mask = torch.zeros_like(input_ids)
        for k, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[k, :n], mask[k, :n] = row[:n], 1
            input_ids[k, n:n + t] = new[k].masked_fill(~valid[k], pad)
            labels[k, n:n + t] = new[k].masked_fill(~valid[k], losses.IGNORE_INDEX)
            mask[k, n:n + t] = valid[k].long()
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                ON_POLICY: torch.ones((), dtype=torch.bool)}


def has_dropout(model) -> bool:
    """Whether a forward of ``model`` in train mode is random: a dropout module with p > 0, or a
    dropout or LayerDrop rate (``dropout``, ``attention_dropout``, ``*_pdrop``, ``layerdrop``) > 0
    kept as a float by a module that applies it functionally (BART, Llama attention)."""
    for m in unwrap(model).modules():
        if "Dropout" in type(m).__name__ and float(getattr(m, "p", 0) or 0) > 0:
            return True
        for name, value in vars(m).items():
            if any(w in name for w in ("dropout", "pdrop", "layerdrop")) and isinstance(value, float) and value > 0:
                return True
    return False


def same_weights(a, b) -> bool:
    """Whether two models hold bit-identical parameters and buffers."""
    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def check_cohort_can_differ(members) -> None:
    """Refuse a cohort whose members cannot become different: identical starting weights and no
    dropout (the same batches, no randomness per member) keep them bit-identical, so every KD
    term is exactly 0 and the run is K copies of plain fine-tuning."""
    if any(has_dropout(m) for m in members):
        return
    if all(same_weights(members[0], m) for m in members[1:]):
        raise LmkdError(f"the cohort's {len(members)} members start from identical weights and have no dropout, so "
                        "they would stay identical (KD term exactly 0); give each member its own checkpoint "
                        "(student_model_name_or_path: a,b,... one per member) or use a student with dropout")


class CohortModel(nn.Module):
    """K students trained together (deep mutual learning).  One ``nn.Module`` so the Trainer's
    optimizer, device placement and DDP wrapping cover all of them; ``forward`` returns the list
    of the members' outputs."""

    main_input_name = "input_ids"

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise LmkdError("a cohort needs at least two students (cohort_size >= 2)")
        kinds = {model_kind(m) for m in members}
        if len(kinds) > 1:
            raise LmkdError(f"the cohort mixes model kinds ({', '.join(sorted(kinds))}); use students of one kind")
        if len({vocab_size_of(m) for m in members}) > 1:
            raise LmkdError("the cohort's students have different output sizes; use one vocabulary (label set)")
        check_cohort_can_differ(members)
        self.members = nn.ModuleList(members)
        self.lmkd_kind = kinds.pop()

    @classmethod
    def copies(cls, student, k: int) -> CohortModel:
        """``k`` members that start as copies of ``student``; they diverge through their own dropout
        masks.  A student without dropout is refused (its copies would stay identical): pass
        differently initialised students to ``CohortModel([...])`` instead."""
        return cls([student] + [copy.deepcopy(student) for _ in range(k - 1)])

    @property
    def config(self):
        return self.members[0].config

    def forward(self, **inputs):
        return [m(**inputs) for m in self.members]


class CoDistillationTrainer(RegimeTrainer):
    """Online co-distillation / deep mutual learning (Zhang et al. 2018): no pretrained teacher;
    member k's loss is ``(1 - kd_alpha) * CE_k + kd_alpha * KD(target_k, member k)``, with
    ``target_k`` the detached average of the other members' softened distributions (passed to the
    KD loss as the logits ``tau * log mean_{j != k} softmax(z_j / tau)``, so the temperature-``tau``
    loss sees exactly that average).  The trained loss is the sum over members (each member's
    gradient comes from its own terms only).  ``save_model`` writes every member to
    ``member-k`` (each a plain HF model) and member 0 also to the directory itself."""

    def __init__(self, model=None, args=None, **kwargs):
        if args is not None and not isinstance(model, CohortModel):
            if args.cohort_size < 2:
                raise LmkdError("co-distillation needs cohort_size >= 2 (or model=CohortModel([...]))")
            model = CohortModel.copies(model, args.cohort_size)
        if kwargs.get("teacher_model") is not None:
            raise LmkdError("co-distillation trains without a teacher; drop teacher_model")
        super().__init__(model=model, args=args, **kwargs)
        if self.args.label_names is None:  # the Trainer looked for them in CohortModel.forward; use a member's
            self.label_names = find_labels(type(unwrap(self.model).members[0]))
        self.args.check_co_distillation()  # (the config ran it already when cohort_size > 1)

    @property
    def uses_teacher(self) -> bool:
        return False

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            member = unwrap(self.model).members[0]
            self._signature_columns = list(inspect.signature(member.forward).parameters) + list(
                {"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def member_targets(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per member, the detached KD target logits ``tau * log mean_{j != k} softmax(z_j / tau)``."""
        tau, k = self.args.kd_temperature, len(logits)
        with torch.no_grad():
            logp = torch.stack([torch.log_softmax(z.detach().float() / tau, dim=-1) for z in logits])
            out = []
            for i in range(k):
                others = torch.cat([logp[:i], logp[i + 1:]])
                out.append(tau * (torch.logsumexp(others, dim=0) - math.log(k - 1)))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        members = unwrap(model).members
        outputs = model(**self.forward_inputs(members[0], inputs))
        logits = [self.shifted(o.logits) for o in outputs]
        ce_mask, kd_mask = self.position_masks(inputs)
        counts, scale = self.loss_counts(num_items_in_batch)
        n_ce, n_kd = counts if counts is not None else (int(ce_mask.sum()) if ce_mask is not None else 0,
                                                         int(kd_mask.sum()))
        alpha, k = args.kd_alpha, len(logits)
        targets = self.member_targets(logits) if alpha > 0 else [None] * k
        stats = self.loss_stats["train" if model.training else "eval"]
        loss = logits[0].new_zeros((), dtype=torch.float32)
        labels = inputs.get("labels")
        labels = shifted_labels(self.kind, labels) if labels is not None else None
        for z, target in zip(logits, targets):
            if ce_mask is not None and alpha < 1:
                ce_sum = losses.cross_entropy(z, labels)
                loss = loss + (1 - alpha) * ce_sum / max(n_ce, 1)
                stats["ce_sum"] += ce_sum.item() / k
                stats["ce_n"] += int(ce_mask.sum()) / k
            if alpha > 0:
                kd_sum = losses.token_kd_loss(z, target, kd_mask, loss=args.kd_loss, temperature=args.kd_temperature,
                                              beta=args.jsd_beta)
                loss = loss + alpha * kd_sum / max(n_kd, 1)
                stats["kd_sum"] += kd_sum.item() / k
                stats["kd_n"] += int(kd_mask.sum()) / k
        if not torch.isfinite(loss):
            raise LmkdError(f"the loss became {loss.item()} at step {self.state.global_step}; lower the learning "
                            "rate or check the data for empty targets")
        loss = loss * scale
        return (loss, outputs[0]) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        members = unwrap(self.accelerator.unwrap_model(self.model)).members
        for k, member in enumerate(members):
            for path in ([os.path.join(output_dir, f"member-{k}")] + ([output_dir] if k == 0 else [])):
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
                raise LmkdError(f"{resume_from_checkpoint} has no {os.path.basename(path)}; it is not a checkpoint "
                                f"of a cohort of {len(members)}")
            member.load_state_dict(type(member).from_pretrained(path).state_dict())


def trainer_class(args, data_args=None):
    """The trainer ``lmkd distill`` uses for ``args`` (DistillationTrainer when no regime is on)."""
    if args.cohort_size > 1:
        return CoDistillationTrainer
    if args.on_policy_fraction > 0:
        return OnPolicyDistillationTrainer
    if data_args is not None and data_args.transfer_file:
        return RegimeTrainer
    return DistillationTrainer


def wrap_collator(collator, data_args):
    """The task's collator, wrapped in :class:`TransferCollator` when a transfer set is mixed in and
    in :class:`PromptLengthCollator` when the data name each row's prompt (``prompt_column``)."""
    if data_args.transfer_file:
        collator = TransferCollator(collator, TASK_KIND[data_args.task])
    return PromptLengthCollator(collator) if getattr(data_args, "prompt_column", None) else collator

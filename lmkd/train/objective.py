"""The CE + KD objective of one micro-batch, over whichever teacher signal the run has.

:class:`DistillationObjective` is what :meth:`lmkd.DistillationTrainer.compute_loss` calls.  Read
:meth:`DistillationObjective.__call__` top to bottom: the student's forward, its positions, then
one of three paths to the same loss ``(1 - alpha) * CE / n_ce + alpha * KD / n_kd``:

* **plain** (``kd_chunk_size: 0``, online teacher): full logits, :func:`lmkd.losses.cross_entropy`
  and :func:`lmkd.losses.token_kd_loss`;  ``kd_chunk_size: auto`` (the default) picks plain or
  chunked once, on the first batch (:func:`lmkd.train.kd_path.choose_kd_path`) -- always plain for
  the losses of :data:`lmkd.losses.PLAIN_KD_LOSSES` (skew KL, TAID; the config refuses them any
  other path).
  TAID's ``t`` comes from :class:`lmkd.losses.TaidSchedule` at the trainer's ``state.global_step``
  of ``state.max_steps``;
* **chunked / fused** (:mod:`lmkd.losses.chunked`, :mod:`lmkd.losses.fused`): CE and KD in one pass
  over chunks of positions.  On causal and seq2seq LMs whose LM head lmkd can reproduce (checked
  once per model, before the first training forward, against the real logits of a no-grad forward
  of a slice of the first batch: one row, :data:`lmkd.train.lm_head.PROBE_POSITIONS` positions --
  so no (N, V) tensor exists even at step 1), the student's head is skipped in the forward and run
  per chunk inside the loss (no (N, V) student logits), and so is the teacher's
  (:class:`lmkd.train.lean_heads.LeanHeads`, the objective's base, over :mod:`lmkd.train.lm_head`);
* **cached** (``logit_cache``, or a served teacher): the teacher's top-K from the batch
  (:mod:`lmkd.teacher.logit_cache`).  With ``teacher_tokenizer`` a served teacher's top-k is instead
  rebuilt over the teacher's vocabulary for the cross-tokenizer loss, on the plain path
  (:meth:`DistillationObjective.cross_tokenizer_kd`).

The objective never sees the trainer: it is built from the run's config, the model kind, the live
teacher and a few flags of how the student is wrapped, and each call is given the micro-batch as an
:class:`lmkd.train.loss_stats.ObjectiveInputs` (forward keywords, CE/KD masks, step) and the
accumulated batch's :class:`lmkd.train.loss_stats.LossCounts`; it returns an :class:`ObjectiveResult`
whose :class:`lmkd.train.loss_stats.LossStats` the trainer adds to what it logs.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from lmkd import losses
from lmkd.core.errors import LmkdError
from lmkd.data.positions import shifted, shifted_labels
from lmkd.losses import chunked, fused
from lmkd.models.loading import unwrap
from lmkd.teacher import cross_tokenizer, logit_cache
from lmkd.train.kd_path import choose_kd_path
from lmkd.train.lean_heads import LeanHeads
from lmkd.train.loss_stats import LossCounts, LossStats, ObjectiveInputs

logger = logging.getLogger(__name__)


class ObjectiveResult(NamedTuple):
    """What :class:`DistillationObjective` returns for a micro-batch.

    Attributes:
        loss: the weighted CE + KD, normalised by the accumulated batch's counts.
        outputs: the student's outputs.
        teacher_outputs: the live teacher's outputs (None when it did not run).
        stats: this micro-batch's logged terms (CE, KD, TAID's t).
    """

    loss: torch.Tensor
    outputs: object
    teacher_outputs: object | None
    stats: LossStats


def ce_smoothing(args, training: bool) -> float:
    """The CE term's label smoothing: ``label_smoothing_factor`` while the student trains, 0 in
    evaluation (``eval_loss_ce`` stays the CE against the gold labels, comparable across runs).

    Args:
        args: the run's DistillationConfig.
        training: whether the student trains.

    Returns:
        ε.
    """
    return float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) if training else 0.0


class DistillationObjective(LeanHeads):
    """CE + KD of a micro-batch: ``(1 - alpha) * CE / n_ce + alpha * KD / n_kd``.

    :attr:`fused_head` / :attr:`teacher_head`: None until the first training batch checks the
    student's / teacher's LM head, then the :class:`lmkd.losses.chunked.Head` that reproduces it,
    or False when the head cannot be run inside the loss (the chunked loss then takes the real
    logits).

    Args:
        args: the run's :class:`lmkd.DistillationConfig`.
        kind: the model kind (causal, seq2seq, mlm, classification).
        teacher: the live teacher (None: a logit cache, or no KD).
        vocab: the vocabulary teacher and student share, when their output layers differ.
        cross_shared: ``kd_loss: uld_hybrid``: the (student ids, teacher ids) both vocabularies hold.
        teacher_vocab: a served teacher's vocabulary size, with ``teacher_tokenizer``: its top-k at
            each aligned position is rebuilt over it (:func:`lmkd.losses.dense_logprobs`).
        sharded: whether the student is sharded (FSDP / DeepSpeed): its head then never runs in the loss.
        data_parallel: whether the student is wrapped for data parallelism (DDP).
    """

    def __init__(
        self,
        args,
        kind: str,
        teacher=None,
        vocab: int | None = None,
        cross_shared=None,
        teacher_vocab: int | None = None,
        sharded: bool = False,
        data_parallel: bool = False,
    ):
        self.args, self.kind, self.teacher = args, kind, teacher
        self.vocab = vocab
        self.cross_shared = cross_shared
        self.teacher_vocab = teacher_vocab
        self.sharded, self.data_parallel = sharded, data_parallel
        self.fused_head = None
        self.teacher_head = None
        self.auto_chunk = None  # what kd_chunk_size: auto chose (0 or -1), once, on the first batch
        self.taid = (
            losses.TaidSchedule(
                args.taid_t_start,
                args.taid_t_end,
                args.taid_schedule == "adaptive",
                args.taid_alpha,
                args.taid_beta,
            )
            if args.kd_loss == "taid"
            else None
        )

    @property
    def chunk(self) -> int:
        """The kd_chunk_size in force: the configured one, or what ``auto`` chose (see :meth:`decide_path`)."""
        cs = self.args.kd_chunk_size
        if getattr(self.args, "teacher_tokenizer", None):
            return 0  # cross-tokenizer KD: the plain path (the teacher's positions are gathered from its logits)
        return self.auto_chunk if cs == "auto" else cs

    def decide_path(self, model, inputs: dict) -> None:
        """``kd_chunk_size: auto``: choose plain or chunked once, from the first batch's size, and log it.

        Args:
            model: the student (possibly wrapped).
            inputs: the first batch.
        """
        args = self.args
        if args.kd_chunk_size != "auto" or self.auto_chunk is not None:
            return
        if args.kd_loss in losses.PLAIN_KD_LOSSES:
            self.auto_chunk = 0
            logger.info("kd path: plain (kd_loss %s is computed on full logits only)", args.kd_loss)
            return
        if ce_smoothing(args, True) > 0:
            self.auto_chunk = 0
            logger.info("kd path: plain (label_smoothing_factor is applied on full logits only)")
            return
        m = unwrap(model)
        out = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        vocab = (
            self.vocab or getattr(out, "out_features", None) or getattr(m.config, "num_labels", 2)
        )
        positions = (
            inputs.get("labels") if inputs.get("labels") is not None else inputs["input_ids"]
        ).numel()
        self.auto_chunk, line = choose_kd_path(positions, vocab, args.device)
        logger.info(line)

    def __call__(
        self,
        model,
        x: ObjectiveInputs,
        counts: LossCounts | None = None,
        return_outputs: bool = False,
    ) -> ObjectiveResult:
        """The loss of one micro-batch.

        Args:
            model: the student (possibly wrapped); its forward runs here.
            x: the micro-batch: forward keywords, CE/KD masks, step.
            counts: the accumulated batch's counts (this micro-batch's own when None).
            return_outputs: whether the caller wants the student's outputs (their logits are then
                real: the fused path, which skips the student's LM head, is not taken).

        Returns:
            The loss, the student's and teacher's outputs and this micro-batch's logged terms.
        """
        args, inputs = self.args, x.batch
        self.decide_path(model, inputs)
        # fused CE+KD: the LM head runs in the loss
        with self.lean_head(model, x, return_outputs) as lean_head:
            outputs = model(**x.student_forward)
        s_logits = shifted(self.kind, outputs.logits)
        counts = counts if counts is not None else x.local_counts()
        cached = logit_cache.MASK in inputs
        if args.logit_cache and args.kd_alpha > 0 and self.teacher is None and not cached:
            raise LmkdError(
                "a batch without cached teacher logits in a run trained from logit_cache: its KD "
                "term cannot be computed (evaluate on the data of eval_logit_cache, or a cached "
                "dataset)"
            )
        alpha = args.kd_alpha if (self.teacher is not None or cached) else 0.0
        use_ce, use_kd = x.ce_mask is not None and alpha < 1, alpha > 0
        labels = shifted_labels(self.kind, inputs["labels"]) if use_ce else None

        stats = LossStats()
        cross = cross_tokenizer.TEACHER_POSITION in inputs  # (a live or a served teacher)
        if self.chunk == 0 and (not cached or cross):
            loss, ce_sum, kd_sum, t_outputs = self.plain_ce_kd(
                x, s_logits, labels, alpha, counts, model.training, stats
            )
        else:
            w_ce = (1 - alpha) / max(counts.ce, 1) if use_ce else 0.0
            w_kd = alpha / max(counts.kd, 1) if use_kd else 0.0
            loss, ce_sum, kd_sum, t_outputs = self.lean_ce_kd(
                x, outputs, s_logits, lean_head, labels, w_ce, w_kd, model.training
            )
        if use_ce:
            stats.ce.add(ce_sum.item(), int(x.ce_mask.sum()))
        if use_kd:
            stats.kd.add(kd_sum.item(), int(x.kd_mask.sum()))
        return ObjectiveResult(loss, outputs, t_outputs, stats)

    # ---- the three paths --------------------------------------------------------------------------

    def taid_t(self, training: bool, step: tuple[int, int]) -> float:
        """TAID's t for this batch.

        Args:
            training: whether the student trains (else: evaluation).
            step: (optimizer step, max_steps) of the run.

        Returns:
            The schedule at ``step`` (training), its current value (evaluation).
        """
        return self.taid.at(*step) if training else self.taid.t

    def plain_ce_kd(
        self,
        x: ObjectiveInputs,
        s_logits,
        labels,
        alpha: float,
        counts: LossCounts,
        training: bool,
        stats: LossStats,
    ):
        """Full logits, autograd: (loss, CE sum, KD sum, teacher outputs).

        Args:
            x: the micro-batch.
            s_logits: the student's logits after the causal shift.
            labels: the labels after the causal shift (None: no CE term).
            alpha: the KD weight in force.
            counts: what the CE and KD sums are divided by.
            training: whether the student trains (TAID's schedule advances only then).
            stats: this micro-batch's logged terms; TAID's t is added to it.

        Returns:
            (loss, CE sum or None, KD sum or None, teacher outputs or None).
        """
        args, inputs, kd_mask = self.args, x.batch, x.kd_mask
        loss = s_logits.new_zeros((), dtype=torch.float32)
        ce_sum = kd_sum = t_outputs = None
        if labels is not None:
            ce_sum = losses.cross_entropy(
                s_logits, labels, label_smoothing=ce_smoothing(self.args, training)
            )
            loss = loss + (1 - alpha) * ce_sum / max(counts.ce, 1)
        if alpha > 0:
            if cross_tokenizer.TEACHER_POSITION in inputs:  # cross-tokenizer KD (teacher_tokenizer)
                t_outputs, kd_sum = self.cross_tokenizer_kd(inputs, s_logits, kd_mask)
                return loss + alpha * kd_sum / max(counts.kd, 1), ce_sum, kd_sum, t_outputs
            with torch.no_grad():
                t_outputs = self.teacher(**x.teacher_forward)
                t_logits = shifted(self.kind, t_outputs.logits)
            s_kd, t_kd = self._shared(s_logits), self._shared(t_logits)
            taid_t = self.taid_t(training, x.step) if self.taid is not None else 1.0
            kd_sum = losses.token_kd_loss(
                s_kd,
                t_kd,
                kd_mask,
                loss=args.kd_loss,
                temperature=args.kd_temperature,
                beta=args.jsd_beta,
                skew_alpha=args.skew_alpha,
                taid_t=taid_t,
            )
            if self.taid is not None:
                if training:
                    self.taid.observe(kd_sum.item() / max(int(kd_mask.sum()), 1))
                stats.taid_t.add(taid_t)
            loss = loss + alpha * kd_sum / max(counts.kd, 1)
        return loss, ce_sum, kd_sum, t_outputs

    def cross_tokenizer_kd(self, inputs, s_logits, kd_mask):
        """The KD term with a teacher of another tokenizer.

        A live teacher: its forward on its own tokens of the batch (a seq2seq teacher's decoder on
        its own encoding of the target), its logits gathered at each student position's teacher
        position (lmkd.teacher.cross_tokenizer).  A served one (``teacher_server_url``): its top-k
        at those positions (:func:`lmkd.teacher.served.served_batch`), rebuilt over its vocabulary
        with the tail spread evenly (:func:`lmkd.losses.dense_logprobs`; exact when k is the
        vocabulary), in place of the log-softmax of the live teacher's logits.  Then ULD
        (``kd_loss`` uld or uld_hybrid): one objective either way.

        Args:
            inputs: the collated batch, with the teacher's token columns the collator added (and
                a served teacher's answer).
            s_logits: the student's (shifted) logits.
            kd_mask: the student positions the KD term is taken over.

        Returns:
            (teacher outputs or None, KD sum over ``kd_mask``).
        """
        args = self.args
        kw = dict(loss=args.kd_loss, temperature=args.kd_temperature, shared=self.cross_shared)
        if logit_cache.MASK in inputs:  # a served teacher's top-k, at the student's positions
            teacher = losses.dense_logprobs(
                logit_cache.batch_topk(inputs, kd_mask), self.teacher_vocab
            )
            return None, losses.cross_kd_loss(s_logits[kd_mask], teacher, **kw)
        fwd = dict(
            input_ids=inputs[cross_tokenizer.TEACHER_INPUT_IDS],
            attention_mask=inputs[cross_tokenizer.TEACHER_ATTENTION_MASK],
        )
        if cross_tokenizer.TEACHER_LABELS in inputs:
            fwd["decoder_input_ids"] = unwrap(self.teacher).prepare_decoder_input_ids_from_labels(
                labels=inputs[cross_tokenizer.TEACHER_LABELS]
            )
        with torch.no_grad():
            t_outputs = self.teacher(**fwd)
        t_logits = t_outputs.logits
        where = shifted(self.kind, inputs[cross_tokenizer.TEACHER_POSITION]).clamp(min=0)
        t_kd = t_logits.gather(1, where.unsqueeze(-1).expand(-1, -1, t_logits.shape[-1]))
        return t_outputs, losses.cross_kd_loss(s_logits, t_kd, kd_mask, **kw)

    def lean_ce_kd(
        self,
        x: ObjectiveInputs,
        outputs,
        s_logits,
        lean_head,
        labels,
        w_ce: float,
        w_kd: float,
        training: bool = False,
    ):
        """CE + KD in one chunked pass (lmkd.losses.chunked), or against the cached teacher.

        Args:
            x: the micro-batch.
            outputs: the student's outputs.
            s_logits: the student's logits after the causal shift (placeholders when ``lean_head``).
            lean_head: the recorded inputs of the skipped student head (:meth:`lean_head`), or None.
            labels: the labels after the causal shift (None: no CE term).
            w_ce: the CE weight per position (0: no CE term).
            w_kd: the KD weight per position (0: no KD term).
            training: whether the student trains (label smoothing applies only then).

        Returns:
            (loss, CE sum, KD sum, teacher outputs or None).
        """
        args, inputs, kd_mask = self.args, x.batch, x.kd_mask
        teacher, t_outputs = None, None
        if w_kd:
            if logit_cache.MASK in inputs:
                teacher = logit_cache.batch_topk(inputs, kd_mask)
            else:
                t_outputs, teacher = self.teacher_for_loss(x)
        kw = dict(
            loss=args.kd_loss,
            temperature=args.kd_temperature,
            beta=args.jsd_beta,
            ce_weight=w_ce,
            kd_weight=w_kd,
            kd_vocab=self.vocab,
            chunk_size=self.chunk,
        )
        if lean_head is not None:
            hidden = shifted(self.kind, lean_head["hidden"][0])
            total, ce_sum, kd_sum = fused.fused_linear_distill_loss(
                hidden, self.fused_head, teacher, labels, kd_mask, **kw
            )
        elif self.chunk == 0:  # the cached teacher on the plain (autograd) path
            zero = s_logits.new_zeros((), dtype=torch.float32)
            ce_sum = (
                losses.cross_entropy(
                    s_logits, labels, label_smoothing=ce_smoothing(self.args, training)
                )
                if w_ce
                else zero
            )
            kd_sum = (
                losses.topk_kd_loss(
                    self._shared(s_logits),
                    teacher,
                    kd_mask,
                    loss=args.kd_loss,
                    temperature=args.kd_temperature,
                    beta=args.jsd_beta,
                )
                if w_kd
                else zero
            )
            total = w_ce * ce_sum + w_kd * kd_sum
        else:
            total, ce_sum, kd_sum = chunked.chunked_distill_loss(
                s_logits, teacher, labels, kd_mask, **kw
            )
        zero = s_logits.new_zeros((), dtype=torch.float32)
        return zero + total, ce_sum, kd_sum, t_outputs

    def _shared(self, logits):
        """``logits`` cut to the vocabulary teacher and student share (see lmkd.models.vocabulary.shared_vocab_size)."""
        return logits[..., : self.vocab] if self.vocab is not None else logits

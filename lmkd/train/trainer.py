"""DistillationTrainer: an HF Seq2SeqTrainer with a frozen teacher and a distillation loss.

The trainer wires the parts and keeps the counts: the teacher (and a logit cache, or a teacher of
another tokenizer) comes from :mod:`lmkd.teacher.frozen`, the positions from :mod:`lmkd.data.positions`, the
CE + KD loss from :mod:`lmkd.train.objective`, the feature terms and their hint projections from
:mod:`lmkd.train.features`, the token counts of the accumulated batch from
:mod:`lmkd.train.batch_counts`, the hint projections' optimizer groups, gradients and checkpoints
from :mod:`lmkd.train.projection_trainer` (its base class), the regime check from
:mod:`lmkd.train.regime_keys`.  What stays here: the wiring, logging, the declared hooks, and the
Trainer overrides that call those modules.  (The Trainer's ``compute_metrics`` of a task is
:func:`lmkd.scoring.metrics.compute_metrics_for`.)
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import Trainer

from lmkd.core.constants import SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.core.io import nothing_left_on_error
from lmkd.data import positions
from lmkd.models.loading import model_kind, unwrap
from lmkd.teacher import cross_tokenizer, deepspeed_engine, ensemble, frozen, logit_cache
from lmkd.train import card
from lmkd.train.batch_counts import AccumulatedCounts
from lmkd.train.config import DistillationConfig
from lmkd.train.features import FeatureDistiller
from lmkd.train.loss_stats import LossStats, ObjectiveInputs
from lmkd.train.objective import DistillationObjective
from lmkd.train.processes import check_sharding
from lmkd.train.projection_trainer import HintProjectionTrainer
from lmkd.train.regime_keys import check_regimes_run
from lmkd.train.served_steps import ServedTeacherSteps

logger = logging.getLogger(__name__)


class DistillationTrainer(ServedTeacherSteps, AccumulatedCounts, HintProjectionTrainer):
    """``Seq2SeqTrainer`` + a frozen teacher + token-level KD.

    The teacher (a model, or a path in ``args.teacher_model_name_or_path``) is moved to the
    student's device in ``args.teacher_dtype``, put in ``eval()`` with gradients off, and kept out
    of the Trainer's model: it is never wrapped by DDP/FSDP, never in the optimizer and never in
    a checkpoint (under DeepSpeed ZeRO-3, where loading partitions it, it runs in a DeepSpeed
    inference engine of its own; under FSDP2 it is sharded for inference,
    :mod:`lmkd.teacher.fsdp_teacher`).  With ``kd_alpha == 0`` no teacher is loaded or run.

    ``compute_loss`` sums the hard-label CE and the KD divergence over their positions and divides
    each by its count in the whole accumulated (and, across processes, gathered) batch, so gradient
    accumulation and data parallelism give the gradient of one large batch.

    Its parts: :attr:`loss_objective` (:class:`lmkd.train.objective.DistillationObjective`, CE + KD),
    :attr:`features` (:class:`lmkd.train.features.FeatureDistiller` when a feature weight is > 0, else
    None) and :attr:`projections` (the hint projections; empty without them).  Its bases:
    :class:`lmkd.train.served_steps.ServedTeacherSteps` (a served teacher: ``teacher_server_url``),
    :class:`lmkd.train.batch_counts.AccumulatedCounts` (the accumulated batch's counts) and
    :class:`lmkd.train.projection_trainer.HintProjectionTrainer` (the projections' optimisation and
    checkpoints).

    Hooks for subclasses (lmkd.train.regimes overrides these and nothing private):

    * :meth:`position_masks` ``(inputs) -> (CE mask, KD mask)``: which positions each term covers;
      the token counts are taken from it too;
    * :meth:`forward_inputs` ``(model, inputs) -> dict``: the keywords of a model's forward;
    * :meth:`shifted` ``(logits) -> logits``: the logits at the masks' positions (the causal shift);
    * :attr:`uses_teacher`: whether a teacher is loaded at all;
    * :meth:`loss_counts` ``(num_items_in_batch)``: the accumulated batch's
      :class:`lmkd.train.loss_stats.LossCounts` for a ``compute_loss`` of one's own;
    * :attr:`loss_stats`: per mode (``train``/``eval``), a :class:`lmkd.train.loss_stats.LossStats`
      of the terms logged as ``loss_ce``, ``loss_kd``, ``taid_t`` and ``loss_<feature term>``.

    The seam to the objective is narrow: :meth:`compute_loss` hands it an
    :class:`lmkd.train.loss_stats.ObjectiveInputs` (forward keywords, masks, step) and the counts,
    and adds the :class:`lmkd.train.loss_stats.LossStats` it returns to :attr:`loss_stats`.  The
    HF Trainer's ``num_items_in_batch`` is a ``LossCounts(ce, kd, features)`` here
    (:meth:`_get_num_items_in_batch`), not one count.

    Args:
        model: the student.
        args: a :class:`DistillationConfig` (default: one with ``output_dir="lmkd_output"``).
        teacher_model: the teacher model object (None: loaded from
            ``args.teacher_model_name_or_path``).
        teacher_tokenizer: the teacher's tokenizer, for cross-tokenizer KD.
        **kwargs: the ``Seq2SeqTrainer``'s other arguments (datasets, collator,
            ``processing_class``, ...).

    Raises:
        LmkdError: ``args`` is not a :class:`DistillationConfig`, the config turns on a regime this
            class does not run, or the wiring finds a mistake (then no ``output_dir`` is left).
    """

    # compute_loss normalises by the token count of the whole accumulated batch itself
    loss_is_scaled_for_ga = True
    #: the regime keys of :data:`lmkd.train.regime_keys.REGIME_RUNNERS` this class runs (a subclass
    #: that runs one names it); any other one the config turns on is refused by
    #: :func:`check_regimes_run`
    regimes_run: tuple[str, ...] = ()

    def __init__(
        self,
        model=None,
        args: DistillationConfig | None = None,
        teacher_model=None,
        teacher_tokenizer=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="lmkd_output")
        if not isinstance(args, DistillationConfig):
            raise LmkdError(
                "DistillationTrainer needs args=DistillationConfig(...), not plain TrainingArguments"
            )
        check_regimes_run(type(self), args)
        with nothing_left_on_error(
            args.output_dir
        ):  # a mistake found while wiring: leave no output_dir
            super().__init__(model=model, args=args, **kwargs)
            check_sharding(args, self.accelerator, self.model)  # FSDP off on CPU; FSDP2
            self._setup(teacher_model, teacher_tokenizer)

    def _setup(self, teacher_model, teacher_tokenizer) -> None:
        args = self.args
        # Make the Trainer count label tokens over the accumulated batch (see _get_num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.kind = model_kind(self.model)
        self.teacher = None
        self._vocab = None  # the vocabulary teacher and student share, when output layers differ
        self.loss_stats = {"train": LossStats(), "eval": LossStats()}
        self.cross_shared = None  # uld_hybrid: (student ids, teacher ids) of the token strings both vocabularies hold
        if self.uses_teacher:
            self._setup_teacher(teacher_model, teacher_tokenizer)
            if (
                args.teacher_tokenizer
            ):  # the collator re-tokenises each batch for the teacher, aligns positions
                self.data_collator, self.cross_shared = frozen.attach_teacher_tokenizer(
                    self.data_collator,
                    kind=self.kind,
                    student_tokenizer=self.processing_class,
                    teacher=self.teacher,
                    teacher_tokenizer=teacher_tokenizer
                    if teacher_tokenizer is not None
                    else args.teacher_tokenizer,
                    kd_loss=args.kd_loss,
                )
        # teacher_server_url: the served teacher's client (lmkd.train.served_steps); with
        # teacher_tokenizer also the cross-tokenizer collator
        self.setup_served_teacher(teacher_tokenizer)
        self.features = None  # lmkd.train.features.FeatureDistiller when a feature weight is > 0
        if args.uses_features:
            self.features = FeatureDistiller(
                args,
                self.kind,
                self.model,
                self.teacher,
                device=args.device,
                deepspeed=self.is_deepspeed_enabled,
            )
        # learned student->teacher projections of the hint loss, one per layer stack
        self.projections = (
            self.features.projections if self.features is not None else nn.ModuleDict()
        )
        self.loss_objective = DistillationObjective(
            args,
            self.kind,
            teacher=self.teacher,
            vocab=self._vocab,
            cross_shared=self.cross_shared,
            teacher_vocab=self.served_vocab,
            sharded=self.is_fsdp_enabled or self.is_deepspeed_enabled,
            data_parallel=args.world_size > 1,
        )
        self._eval_collator = None  # the collator of the validation data's own eval_logit_cache
        if (
            args.logit_cache
        ):  # the cached top-K collated with each batch (and the validation data's own cache)
            wired = frozen.attach_logit_caches(
                args,
                kind=self.kind,
                student=self.model,
                train_dataset=self.train_dataset,
                eval_dataset=self.eval_dataset,
                collator=self.data_collator,
                padding_side=getattr(self.processing_class, "padding_side", "right") or "right",
            )
            self.train_dataset, self.data_collator, self.eval_dataset, self._eval_collator = wired

    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's eval DataLoader, collating with the validation data's own logit cache
        (``eval_logit_cache``).

        Args:
            eval_dataset: as the Trainer's (None: ``self.eval_dataset``).

        Returns:
            The evaluation DataLoader.
        """
        if self._eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    # ---- teacher ------------------------------------------------------------------------------

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss term needs the teacher's outputs."""
        served = self.args.logit_cache or self.args.teacher_server_url
        return (self.args.kd_alpha > 0 and not served) or self.args.uses_features

    def _deepspeed_config(self) -> dict | None:
        return (
            self.accelerator.state.deepspeed_plugin.deepspeed_config
            if self.is_deepspeed_enabled
            else None
        )

    @property
    def zero3(self) -> bool:
        """Whether this run uses DeepSpeed ZeRO stage 3 (parameters partitioned across processes)."""
        return deepspeed_engine.zero3_enabled(self._deepspeed_config())

    def _setup_teacher(self, teacher, teacher_tokenizer) -> None:
        ds_config = self._deepspeed_config()
        if (
            teacher is None and len(frozen.teacher_paths(self.args)) > 1
        ):  # teacher_model_name_or_path: a,b
            teacher = ensemble.load_teacher(
                self.args, self.model, self.processing_class
            )  # (+ teacher_weights)
        if isinstance(teacher, ensemble.EnsembleTeacher):
            if teacher.temperature != self.args.kd_temperature:
                raise LmkdError(
                    f"EnsembleTeacher(temperature={teacher.temperature}) must use the trainer's "
                    f"kd_temperature {self.args.kd_temperature}"
                )
            if self.args.kd_loss == "mse":
                raise LmkdError(
                    "a teacher ensemble averages distributions, not logits: use kd_loss "
                    "forward_kl, reverse_kl or jsd"
                )
        self.teacher, self._vocab = frozen.load_frozen_teacher(
            teacher if teacher is not None else self.args.teacher_model_name_or_path,
            kind=self.kind,
            student=self.model,
            student_tokenizer=self.processing_class,
            teacher_tokenizer=teacher_tokenizer,
            device=self.args.device,
            dtype=self.args.teacher_dtype,
            deepspeed_config=ds_config,
            cross_tokenizer=bool(self.args.teacher_tokenizer),
            accelerator=self.accelerator,  # FSDP2: the teacher sharded for inference
        )

    # ---- hooks: positions and forward keywords ------------------------------------------------------

    def position_masks(self, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(CE mask, KD mask) over the shifted positions of a batch
        (:func:`lmkd.data.positions.position_masks`); with cross-tokenizer KD the KD mask keeps
        only the positions that have a teacher position.

        Args:
            inputs: the collated batch.

        Returns:
            (CE mask or None, KD mask).
        """
        ce, kd = positions.position_masks(self.kind, inputs, self.args.mlm_kd_positions)
        if (
            cross_tokenizer.TEACHER_POSITION in inputs
        ):  # cross-tokenizer KD: only the positions with a teacher position
            kd = kd & positions.shifted(self.kind, inputs[cross_tokenizer.TEACHER_POSITION]).ge(0)
        return ce, kd

    def forward_inputs(self, model, inputs: dict) -> dict:
        """The keywords of ``model``'s forward for a batch: no labels or cached-teacher keys, the
        decoder inputs of a seq2seq model, and the outputs the feature losses need.

        Args:
            model: the student or the teacher.
            inputs: the collated batch.

        Returns:
            The forward keywords.
        """
        fwd = {
            k: v
            for k, v in inputs.items()
            if k != "labels"
            and k not in logit_cache.BATCH_KEYS
            and k not in cross_tokenizer.BATCH_KEYS
        }
        if self.kind == SEQ2SEQ and (
            "decoder_input_ids" not in fwd
            or (model is self.teacher and not frozen.shares_decoder_inputs(model, self.model))
        ):
            fwd["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        if self.features is not None:
            fwd.update(self.features.output_flags())
        return fwd

    def shifted(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` at the positions the masks cover (:func:`lmkd.data.positions.shifted`).

        Args:
            logits: a model's (batch, seq, ...) logits.

        Returns:
            The logits at the masks' positions (a causal LM's shifted by one).
        """
        return positions.shifted(self.kind, logits)

    # ---- loss ------------------------------------------------------------------------

    def objective_inputs(self, model, inputs: dict) -> ObjectiveInputs:
        """One micro-batch as the objective reads it: the forward keywords of the student and the live
        teacher (:meth:`forward_inputs`), the masks (:meth:`position_masks`) and the step.

        Args:
            model: the student (as the Trainer wrapped it).
            inputs: the collated batch.

        Returns:
            The :class:`lmkd.train.loss_stats.ObjectiveInputs` of the batch.
        """
        inputs = self.with_served_teacher(
            inputs
        )  # (a served teacher's answer, when not prefetched)
        ce_mask, kd_mask = self.position_masks(inputs)
        teacher_forward = None
        if self.teacher is not None and cross_tokenizer.TEACHER_POSITION not in inputs:
            teacher_forward = self.forward_inputs(self.teacher, inputs)
        return ObjectiveInputs(
            batch=inputs,
            student_forward=self.forward_inputs(model, inputs),
            teacher_forward=teacher_forward,
            ce_mask=ce_mask,
            kd_mask=kd_mask,
            step=(self.state.global_step, self.state.max_steps),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The CE + KD (+ feature terms) loss of a micro-batch, normalised by the accumulated batch.

        Args:
            model: the student (as the Trainer wrapped it).
            inputs: the collated batch.
            return_outputs: also return the student's outputs.
            num_items_in_batch: the :class:`lmkd.train.loss_stats.LossCounts` of the accumulated batch
                (the HF Trainer's name for it; None: this micro-batch's own counts).

        Returns:
            The loss, or (loss, student outputs).
        """
        x = self.objective_inputs(model, inputs)
        counts, scale = self.loss_counts(num_items_in_batch)
        result = self.loss_objective(model, x, counts, return_outputs)
        loss, outputs, t_outputs = result.loss, result.outputs, result.teacher_outputs
        stats = self.loss_stats["train" if model.training else "eval"]
        stats.add(result.stats)
        if self.features is not None:
            if t_outputs is None:
                with torch.no_grad():
                    t_outputs = self.teacher(**x.teacher_forward)
            totals = counts.features if counts is not None else None
            feature_loss, feature_stats = self.features.loss(outputs, t_outputs, inputs, totals)
            loss = loss + feature_loss
            stats.add(feature_stats)
        if not torch.isfinite(loss):
            raise LmkdError(
                f"the loss became {loss.item()} at step {self.state.global_step}; lower the "
                "learning rate, use bf16 instead of fp16, or check the data for empty targets"
            )
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """With ``predict_with_generate``: the loss is still :meth:`compute_loss`'s CE + KD mix (the
        Seq2SeqTrainer's would be the model's own CE) and the generated ids go to ``compute_metrics``
        with the batch's labels.  Otherwise (or for a model that is not seq2seq) the
        Seq2SeqTrainer's.

        Args:
            model: the student.
            inputs: the collated batch.
            prediction_loss_only: return the loss only.
            ignore_keys: output keys to leave out, as the Trainer's.
            **gen_kwargs: generation keywords, as the Seq2SeqTrainer's.

        Returns:
            (loss, generated ids, labels).
        """
        if not self.args.predict_with_generate or prediction_loss_only or self.kind != SEQ2SEQ:
            return super().prediction_step(
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
            )
        loss, _, _ = Trainer.prediction_step(self, model, inputs, True, ignore_keys=ignore_keys)
        gen_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        _, tokens, _ = super().prediction_step(
            model, gen_inputs, False, ignore_keys=ignore_keys, **gen_kwargs
        )
        return loss, tokens, inputs.get("labels")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.logit_cache and logit_cache.CACHE_ROW not in self._signature_columns:
            # keep the cache row number through remove_unused_columns
            self._signature_columns = [*self._signature_columns, logit_cache.CACHE_ROW]

    def create_model_card(self, *args, **kwargs) -> None:
        """The Trainer's draft card (``push_to_hub`` writes one before uploading), unless
        ``output_dir`` already holds lmkd's card (:func:`lmkd.train.card.write_card`), which says more
        (teacher, KD settings, command) and is kept.

        Args:
            *args: the Trainer's ``create_model_card`` arguments.
            **kwargs: the Trainer's ``create_model_card`` keyword arguments.
        """
        if self.is_world_process_zero() and card.is_lmkd_card(self.args.output_dir):
            return
        super().create_model_card(*args, **kwargs)

    # ---- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, plus the mean loss terms since the last log (:class:`LossStats`).

        Args:
            logs: what the Trainer logs (``eval_*`` keys: an evaluation's).
            start_time: as the Trainer's.
        """
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats = self.loss_stats[mode]
        logs.update(stats.logs("eval_" if mode == "eval" else ""))
        stats.reset()
        super().log(logs, start_time)

"""DistillationTrainer: an HF Seq2SeqTrainer with a frozen teacher and a distillation loss."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import Seq2SeqTrainer

from . import losses
from .config import DistillationConfig
from .errors import LmkdError
from .modeling import (
    CAUSAL,
    CLASSIFICATION,
    MLM,
    SEQ2SEQ,
    load_model,
    load_tokenizer,
    model_kind,
    shared_vocab_size,
    unwrap,
)

logger = logging.getLogger(__name__)


class DistillationTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` + a frozen teacher + token-level KD.

    The teacher (a model, or a path in ``args.teacher_model_name_or_path``) is moved to the
    student's device in ``args.teacher_dtype``, put in ``eval()`` with gradients off, and kept out
    of the Trainer's model: it is never wrapped by DDP/FSDP, never in the optimizer and never in
    a checkpoint.  With ``kd_alpha == 0`` no teacher is loaded or run: plain fine-tuning.

    ``compute_loss`` sums the hard-label CE and the KD divergence over their positions and divides
    each by its count in the whole accumulated (and, across processes, gathered) batch, so gradient
    accumulation and data parallelism give the gradient of one large batch.
    """

    # compute_loss normalises by the token count of the whole accumulated batch itself
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationConfig | None = None, teacher_model=None,
                 teacher_tokenizer=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="lmkd_output")
        if not isinstance(args, DistillationConfig):
            raise LmkdError("DistillationTrainer needs args=DistillationConfig(...), not plain TrainingArguments")
        super().__init__(model=model, args=args, **kwargs)
        # Make the Trainer count label tokens over the accumulated batch (see _get_num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.kind = model_kind(self.model)
        self.teacher = None
        self._vocab = None
        self._stats = {"train": defaultdict(float), "eval": defaultdict(float)}
        if self.uses_teacher:
            self._setup_teacher(teacher_model, teacher_tokenizer)

    # ---- teacher ------------------------------------------------------------------------------

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss term needs the teacher's outputs."""
        return self.args.kd_alpha > 0

    def _setup_teacher(self, teacher, teacher_tokenizer) -> None:
        source = teacher if teacher is not None else self.args.teacher_model_name_or_path
        if source is None:
            raise LmkdError("kd_alpha > 0 needs a teacher: set teacher_model_name_or_path (or pass "
                            "teacher_model=...), or set kd_alpha 0 for plain fine-tuning")
        if isinstance(source, str):
            if teacher_tokenizer is None:
                teacher_tokenizer = load_tokenizer(source, required=False)
            teacher = load_model(source, kind=self.kind)
        if model_kind(teacher) != self.kind:
            raise LmkdError(f"teacher is a {model_kind(teacher)} model but the student a {self.kind} model; "
                            "distil between models of the same kind")
        dtype = self.args.teacher_dtype
        if dtype == "auto":
            dtype = next(unwrap(self.model).parameters()).dtype
        else:
            dtype = getattr(torch, dtype)
        teacher = teacher.to(device=self.args.device, dtype=dtype)
        teacher.eval()
        teacher.requires_grad_(False)
        self._vocab = shared_vocab_size(self.model, teacher, self.processing_class, teacher_tokenizer)
        if self._vocab is not None:
            logger.info("teacher and student vocabularies differ only by padding rows; KD uses the first %d",
                        self._vocab)
        self.teacher = teacher

    # ---- positions ----------------------------------------------------------------------------

    def _masks(self, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(CE mask, KD mask) over the aligned positions of a batch -- the logits' leading shape
        after the causal shift.  The CE mask is None when the batch has no labels."""
        labels = inputs.get("labels")
        if self.kind == CLASSIFICATION:
            n = inputs["input_ids"].shape[0]
            kd = torch.ones(n, dtype=torch.bool, device=inputs["input_ids"].device)
            return (kd if labels is not None else None), kd
        if self.kind == CAUSAL:
            if labels is not None:
                ce = labels[:, 1:].ne(losses.IGNORE_INDEX)
                return ce, ce
            att = inputs.get("attention_mask")
            kd = att[:, 1:].bool() if att is not None else torch.ones_like(inputs["input_ids"][:, 1:], dtype=torch.bool)
            return None, kd
        if self.kind == MLM:
            ce = labels.ne(losses.IGNORE_INDEX) if labels is not None else None
            if self.args.mlm_kd_positions == "masked" and ce is not None:
                return ce, ce
            att = inputs.get("attention_mask")
            kd = att.bool() if att is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            return ce, kd
        # seq2seq: one position per target token
        if labels is None:
            raise LmkdError("a seq2seq batch needs labels (the target tokens)")
        ce = labels.ne(losses.IGNORE_INDEX)
        return ce, ce

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Counts of CE and KD positions in the whole accumulated batch, summed over processes."""
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            ce, kd = self._masks(batch)
            counts[0] += int(ce.sum()) if ce is not None else 0
            counts[1] += int(kd.sum())
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        return counts

    # ---- loss ---------------------------------------------------------------------------------

    def _forward_inputs(self, model, inputs: dict) -> dict:
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if self.kind == SEQ2SEQ and "decoder_input_ids" not in fwd:
            fwd["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        return fwd

    def _aligned(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1] if self.kind == CAUSAL else logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        fwd = self._forward_inputs(model, inputs)
        outputs = model(**fwd)
        s_logits = self._aligned(outputs.logits)
        ce_mask, kd_mask = self._masks(inputs)

        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2:
            n_ce, n_kd = num_items_in_batch.tolist()
            scale = self.accelerator.num_processes if (args.average_tokens_across_devices and args.world_size > 1) else 1
        else:
            n_ce = int(ce_mask.sum()) if ce_mask is not None else 0
            n_kd = int(kd_mask.sum())
            scale = 1

        alpha = args.kd_alpha if self.teacher is not None else 0.0
        loss = s_logits.new_zeros((), dtype=torch.float32)
        stats = self._stats[mode]
        if ce_mask is not None and alpha < 1:
            labels = inputs["labels"]
            labels = labels[:, 1:] if self.kind == CAUSAL else labels
            ce_sum = losses.cross_entropy(s_logits, labels)
            loss = loss + (1 - alpha) * ce_sum / max(n_ce, 1)
            stats["ce_sum"] += ce_sum.item()
            stats["ce_n"] += int(ce_mask.sum())
        if alpha > 0:
            with torch.no_grad():
                t_logits = self._aligned(self.teacher(**self._forward_inputs(self.teacher, inputs)).logits)
            s_kd, t_kd = s_logits, t_logits
            if self._vocab is not None:
                s_kd, t_kd = s_kd[..., : self._vocab], t_kd[..., : self._vocab]
            kd_sum = losses.token_kd_loss(s_kd, t_kd, kd_mask, loss=args.kd_loss,
                                          temperature=args.kd_temperature, beta=args.jsd_beta)
            loss = loss + alpha * kd_sum / max(n_kd, 1)
            stats["kd_sum"] += kd_sum.item()
            stats["kd_n"] += int(kd_mask.sum())

        if not torch.isfinite(loss):
            raise LmkdError(f"the loss became {loss.item()} at step {self.state.global_step}; lower the "
                            "learning rate, use bf16 instead of fp16, or check the data for empty targets")
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    # ---- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats = self._stats[mode]
        prefix = "eval_" if mode == "eval" else ""
        if stats.get("ce_n"):
            logs[f"{prefix}loss_ce"] = round(stats["ce_sum"] / stats["ce_n"], 6)
        if stats.get("kd_n"):
            logs[f"{prefix}loss_kd"] = round(stats["kd_sum"] / stats["kd_n"], 6)
        stats.clear()
        super().log(logs, start_time)

"""The hint projections' part of the HF Trainer's loop: optimizer groups, gradients, checkpoints.

The learned student->teacher projections of the hint loss (:mod:`lmkd.train.features`) live
outside the Trainer's model; :class:`HintProjectionTrainer`, the base of
:class:`lmkd.train.trainer.DistillationTrainer`, adds them to the optimizer, averages their gradients
across processes and clips them, and saves and loads them with each checkpoint.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmkd.train.features import (
    average_projection_grads,
    load_projections,
    projection_param_groups,
    save_projections,
)

logger = logging.getLogger("lmkd.train.trainer")  # (the log lines kept their logger)


class HintProjectionTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` + the optimisation and checkpoints of :attr:`projections`.

    :attr:`projections` (an ``nn.ModuleDict``, empty without hint projections) is set by the
    subclass; with it empty every override is the Trainer's own.

    Attributes:
        projections: the hint projections (set by the subclass; empty without them).
    """

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, plus the hint projections (when there are any) as extra groups.

        A ready-made optimizer is not changed: a warning says to add the projections to it.

        Args:
            model: as the Trainer's.

        Returns:
            The optimizer.
        """
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if len(self.projections):
            if fresh:
                for group in projection_param_groups(self.projections, self.args.weight_decay):
                    optimizer.add_param_group(group)
            else:
                logger.warning(
                    "a ready-made optimizer was given: add trainer.projections.parameters() to it, or "
                    "the hint projections stay at their random initialisation"
                )
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, then the projections' gradients averaged over the processes by hand
        (they live outside the DDP-wrapped model) when the gradients sync.

        Args:
            model: the student (as the Trainer wrapped it).
            inputs: the collated batch.
            num_items_in_batch: the accumulated batch's counts, as the Trainer's.

        Returns:
            The step's loss.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The projections live outside the DDP-wrapped model: average their gradients by hand.
        if (
            len(self.projections)
            and self.args.world_size > 1
            and self.accelerator.sync_gradients
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            average_projection_grads(self.projections, self.args.world_size)
        return loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if len(self.projections):  # clipped on their own, so the model's reported norm is unchanged
            torch.nn.utils.clip_grad_norm_(self.projections.parameters(), self.args.max_grad_norm)
        return norm

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if len(self.projections) and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial),
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}",
            )
            save_projections(self.projections, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.projections):
            load_projections(self.projections, resume_from_checkpoint, self.args.device)

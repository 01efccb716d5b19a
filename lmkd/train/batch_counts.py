"""The counts of the accumulated batch: what the trainer's loss is normalised by.

:class:`AccumulatedCounts` (a mixin of :class:`lmkd.train.trainer.DistillationTrainer`) counts the
CE and KD positions (and the feature terms' items) of every micro-batch of one optimizer step,
summed over processes, and hands them to ``compute_loss`` as the HF Trainer's
``num_items_in_batch`` -- a :class:`lmkd.train.loss_stats.LossCounts`, not one count.
"""

from __future__ import annotations

import torch

from lmkd.train.loss_stats import LossCounts


class AccumulatedCounts:
    """The Trainer overrides and hook of the accumulated batch's counts.

    Read from the trainer: ``args``, ``accelerator``, ``features`` (None without feature terms) and
    the :meth:`position_masks` hook.

    Attributes:
        args: the trainer's :class:`lmkd.train.config.DistillationConfig` (read, not set).
        accelerator: the trainer's accelerator, which gathers the counts across processes.
        features: the trainer's feature distiller; None without feature terms.
    """

    def _gathers_counts(self) -> bool:
        return self.args.average_tokens_across_devices and self.args.world_size > 1

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> LossCounts:
        """The normalising counts of the whole accumulated batch, summed over processes.

        The HF Trainer passes what this returns to ``compute_loss`` as ``num_items_in_batch``
        (from :meth:`get_batch_samples`, and from ``prediction_step`` for one evaluation batch);
        lmkd's value is a :class:`lmkd.train.loss_stats.LossCounts`, not the Trainer's one count.

        Args:
            batch_samples: the micro-batches of one optimizer step.
            device: where the counts are gathered across processes.

        Returns:
            LossCounts(CE positions, KD positions, feature counts or None).
        """
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            ce, kd = self.position_masks(batch)
            counts[0] += int(ce.sum()) if ce is not None else 0
            counts[1] += int(kd.sum())
        counts = counts.to(device)
        if self._gathers_counts():
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        features = None
        if self.features is not None:
            gather = (
                (lambda c: self.accelerator.gather(c.to(device).unsqueeze(0)).sum(0).cpu())
                if self._gathers_counts()
                else None
            )
            features = self.features.count_items(batch_samples, gather)
        n_ce, n_kd = counts.tolist()
        return LossCounts(n_ce, n_kd, features)

    def loss_counts(self, num_items_in_batch) -> tuple[LossCounts | None, int]:
        """What a ``compute_loss`` normalises by.

        Args:
            num_items_in_batch: what the Trainer passed to ``compute_loss`` (a LossCounts from
                :meth:`_get_num_items_in_batch`, or None when called without one).

        Returns:
            (the accumulated batch's LossCounts or None, the factor undoing the Trainer's mean over
            processes).
        """
        if isinstance(num_items_in_batch, LossCounts):
            return num_items_in_batch, (
                self.accelerator.num_processes if self._gathers_counts() else 1
            )
        return None, 1

"""The regimes' batch keys and :class:`RegimeTrainer`, the trainer that reads them.

A transfer set's rows carry :data:`lmkd.train.regimes.transfer.LABELLED`, an on-policy batch
:data:`ON_POLICY` (:mod:`lmkd.train.regimes.on_policy`), a row of a causal LM's data its prompt
length (:data:`lmkd.data.dataset.PROMPT_LENGTH`); the regime trainers all derive from
:class:`RegimeTrainer`, which turns those keys into the CE and KD masks.
"""

from __future__ import annotations

from lmkd.core.constants import CAUSAL, CLASSIFICATION, MLM
from lmkd.core.errors import LmkdError
from lmkd.data.positions import token_mask
from lmkd.data.tokenizing import PROMPT_LENGTH
from lmkd.train.regimes.transfer import LABELLED, TransferCollator
from lmkd.train.trainer import DistillationTrainer

#: batch key: present on a batch whose targets are the student's own generations
ON_POLICY = "lmkd_on_policy"
#: the batch keys a model's forward never sees (PROMPT_LENGTH: each row's prompt, in tokens)
REGIME_KEYS = (LABELLED, ON_POLICY, PROMPT_LENGTH)


class RegimeTrainer(DistillationTrainer):
    """DistillationTrainer that also understands the regime keys of a batch: rows without labels
    (:data:`LABELLED`, from ``transfer_file``) get KD on their tokens and no CE; a batch tagged
    :data:`ON_POLICY` gets no CE.  Without those keys it is exactly DistillationTrainer.

    Args:
        *args: DistillationTrainer's arguments.
        **kwargs: DistillationTrainer's keyword arguments.

    Raises:
        LmkdError: a ``transfer_file`` collator with an MLM student and ``mlm_kd_positions``
            masked (unlabelled rows have no masked targets of their own).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (
            self.kind == MLM
            and self.args.mlm_kd_positions == "masked"
            and isinstance(self.data_collator, TransferCollator)
        ):
            raise LmkdError(
                "transfer_file with mlm needs mlm_kd_positions all (unlabelled rows have no masked "
                "targets of their own)"
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in (
            LABELLED,
            PROMPT_LENGTH,
        ):  # keep the flag and prompt lengths through remove_unused_columns
            if key not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, key]

    def forward_inputs(self, model, inputs: dict) -> dict:
        """DistillationTrainer's forward keywords, without the regime keys.

        Args:
            model: the student or the teacher.
            inputs: the collated batch.

        Returns:
            The forward keywords.
        """
        fwd = super().forward_inputs(model, inputs)
        for key in REGIME_KEYS:
            fwd.pop(key, None)
        return fwd

    def position_masks(self, inputs: dict):
        """DistillationTrainer's masks, with the regime keys applied: an on-policy batch has no CE;
        unlabelled rows get no CE and (causal/MLM) KD on their real tokens.

        Args:
            inputs: the collated batch.

        Returns:
            (CE mask or None, KD mask).
        """
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

"""When the objective runs the student's and the teacher's LM heads inside the loss.

:class:`LeanHeads`, the base of :class:`lmkd.train.objective.DistillationObjective`, checks each
model's head once (:meth:`LeanHeads.probe_head`, on a one-row slice of the first batch) and then
skips it in the forward: the student's under the fused loss (:meth:`LeanHeads.lean_head`), the
teacher's under the chunked loss (:meth:`LeanHeads.teacher_for_loss`), so neither makes (N, V)
logits.  The helpers it calls are :mod:`lmkd.train.lm_head`'s.
"""

from __future__ import annotations

import contextlib

import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.data.positions import shifted
from lmkd.losses import chunked
from lmkd.models.loading import unwrap
from lmkd.train.lm_head import check_head, head_for_fused_loss, head_skipped, probe_inputs
from lmkd.train.loss_stats import ObjectiveInputs


class LeanHeads:
    """The LM heads run inside the loss.

    Read from the objective: ``kind``, ``teacher``, ``sharded``, ``data_parallel``, the
    kd_chunk_size in force (``chunk``), and :attr:`fused_head` / :attr:`teacher_head` (None until
    checked, then the :class:`lmkd.losses.chunked.Head` or False), which the methods set.

    Attributes:
        fused_head: the student's head for the fused loss: None until checked, then the
            :class:`lmkd.losses.chunked.Head`, or False where it cannot be used.
        teacher_head: the teacher's head, likewise.
    """

    def teacher_for_loss(self, x: ObjectiveInputs):
        """The teacher's forward for the chunked loss.

        Args:
            x: the micro-batch.

        Returns:
            (teacher outputs, teacher logits for lmkd.losses.chunked): per-chunk logits from the
            teacher's final hidden states when its head is checked (no (N, V) teacher tensor), else
            its logits.
        """
        use = self.chunk != 0 and self.teacher_head is not False and self.kind in (CAUSAL, SEQ2SEQ)
        if use and self.teacher_head is None:
            self.teacher_head = self.probe_head(self.teacher, x, "teacher")
            use = self.teacher_head is not False
        ctx = head_skipped(self.teacher, self.teacher_head) if use else contextlib.nullcontext(None)
        with ctx as box, torch.no_grad():
            t_outputs = self.teacher(**x.teacher_forward)
        if box is not None:
            hidden = shifted(self.kind, box["hidden"][0])
            return t_outputs, chunked.LazyLogits(
                hidden.reshape(-1, hidden.shape[-1]), self.teacher_head
            )
        return t_outputs, shifted(self.kind, t_outputs.logits)

    def lean_head(self, model, x: ObjectiveInputs, return_outputs: bool = False):
        """The student's forward context: head skipped when the fused loss is on.

        Args:
            model: the student.
            x: the micro-batch; the first time, the head is checked on a slice of it (:meth:`probe_head`).
            return_outputs: whether the caller wants the outputs (their logits would be placeholders).

        Returns:
            :func:`lmkd.train.lm_head.head_skipped`'s context (training only, never with
            ``return_outputs``), else a null context.
        """
        use = (
            model.training
            and not return_outputs
            and self.chunk != 0
            and self.fused_head is not False
            and self.kind in (CAUSAL, SEQ2SEQ)
        )
        if use and self.fused_head is None:
            self.fused_head = self.probe_head(model, x, "student")
            use = self.fused_head is not False
        return head_skipped(model, self.fused_head) if use else contextlib.nullcontext(None)

    def probe_head(self, model, x: ObjectiveInputs, who: str):
        """Check ``model``'s LM head once, on a no-grad forward of one row and PROBE_POSITIONS positions
        of the batch (:func:`probe_inputs`).

        Args:
            model: the student or the teacher.
            x: the micro-batch (its forward keywords for ``who``).
            who: ``"student"`` or ``"teacher"``.

        Returns:
            The Head, or False (see :func:`lmkd.train.lm_head.check_head`).
        """
        ddp = who == "student" and self.data_parallel
        head, why = head_for_fused_loss(model, self.kind, self.sharded, ddp)
        if head is None:
            return check_head(None, None, who, (None, why))
        fwd = x.student_forward if who == "student" else x.teacher_forward
        small = probe_inputs(self.kind, fwd, x.batch.get("attention_mask"))
        # the RNG is left as it was (dropout in the probe would shift every later draw)
        device = getattr(unwrap(model), "device", torch.device("cpu"))
        devices = [device] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            head_skipped(model, None) as box,
            torch.no_grad(),
        ):
            outputs = model(**small)
        return check_head(box, outputs, who, (head, why))

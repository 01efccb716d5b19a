"""On-policy KD (GKD, Agarwal et al. 2024): ``on_policy_fraction: lambda``.

:class:`OnPolicyDistillationTrainer` replaces a share of the micro-batches by the student's own
samples, scored by the teacher; :class:`PromptLengthCollator` carries each row's prompt length
(``prompt_column``) to it.
"""

from __future__ import annotations

import logging
import random

import torch

from lmkd import losses
from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.data.tokenizing import PROMPT_LENGTH, TEACHER_ID
from lmkd.models.generation import generate_seeded
from lmkd.models.loading import unwrap
from lmkd.models.loop_rules import eos_mask, eos_token_ids, pad_token_id
from lmkd.models.truncation import (
    describe_truncation,
    generation_lengths,
    target_limit,
    truncation_note,
)
from lmkd.train.regimes.base import ON_POLICY, RegimeTrainer

logger = logging.getLogger(__name__)


class PromptLengthCollator:
    """Wraps a collator: takes :data:`lmkd.data.dataset.PROMPT_LENGTH` off every example and returns the
    prompt lengths as a tensor under that key (-1 for a row without one, e.g. of a transfer set).

    Args:
        collator: the collator wrapped, called on the examples without that key.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        lengths = torch.tensor([int(f.get(PROMPT_LENGTH, -1)) for f in features], dtype=torch.long)
        batch = self.collator(
            [{k: v for k, v in f.items() if k != PROMPT_LENGTH} for f in features]
        )
        batch[PROMPT_LENGTH] = lengths
        return batch


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
    gradient accumulation stays exact.

    Args:
        *args: RegimeTrainer's arguments.
        **kwargs: RegimeTrainer's keyword arguments.

    Raises:
        LmkdError: a student that is not a causal or seq2seq LM, or no live or served teacher
            (kd_alpha 0, or a logit_cache only).
    """

    regimes_run = ("on_policy_fraction",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.kind not in (CAUSAL, SEQ2SEQ):
            raise LmkdError(
                f"on-policy KD needs a generative student (causal or seq2seq LM), not a {self.kind} "
                "model; set on_policy_fraction 0"
            )
        if self.teacher is None and self.served is None:  # (a served teacher scores them too)
            raise LmkdError(
                "on-policy KD scores the student's samples with a live teacher: set kd_alpha > 0 and "
                "teacher_model_name_or_path or teacher_server_url (a logit_cache only covers the "
                "fixed data)"
            )
        self.max_new_tokens = self.fitted_new_tokens()
        self.on_policy_batches = 0
        self.last_generation_seed: int | None = None
        self.batch_index: int | None = (
            None  # the micro-batch being drawn, counted over the whole run
        )

    def on_policy_coin(self, index: int) -> bool:
        """Whether micro-batch ``index`` (counted from the start of the run) is on-policy: a function of
        (seed, index) alone, so a resumed run draws exactly what an uninterrupted one does.

        Args:
            index: the micro-batch's index in the run.

        Returns:
            True with probability ``on_policy_fraction``.
        """
        return (
            random.Random(f"lmkd-on-policy:{self.args.seed}:{index}").random()
            < self.args.on_policy_fraction
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer.get_batch_samples, with the on-policy batches swapped in before counting tokens.

        Args:
            epoch_iterator: the epoch's batches.
            num_batches: the micro-batches of one optimizer step.
            device: where the counts are gathered.

        Returns:
            (the micro-batches, the accumulated batch's
            :class:`lmkd.train.loss_stats.LossCounts`).

        Raises:
            LmkdError: a seq2seq batch without targets drawn to train off-policy.
        """
        lam, batch_samples = self.args.on_policy_fraction, []
        first = (
            self.state.global_step * self.args.gradient_accumulation_steps
        )  # (restored on resume)
        for i in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            self.batch_index = first + i
            if lam > 0 and self.on_policy_coin(self.batch_index):
                fresh = self.on_policy_batch(self.model, batch)
                if TEACHER_ID in batch:  # each row's served teacher scores its samples
                    fresh[TEACHER_ID] = batch[TEACHER_ID]
                batch = fresh
            elif self.kind == SEQ2SEQ and batch.get("labels") is None:
                raise LmkdError(
                    "seq2seq training data without targets can only train on-policy: set "
                    "on_policy_fraction 1, or give the data targets (lmkd generate)"
                )
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
            new = (
                asked
                if limit is None
                else min(asked, limit - min(a.on_policy_prompt_tokens, limit - 1))
            )
        if new < asked:
            logger.warning(
                "on-policy KD: %s",
                describe_truncation(truncation_note("new tokens", 1, 1, new, asked, limit)),
            )
        return new

    def generation_kwargs(self) -> dict:
        a = self.args
        return dict(
            do_sample=True,
            temperature=a.on_policy_temperature,
            top_k=0,
            top_p=1.0,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
        )

    @torch.no_grad()
    def on_policy_batch(self, model, batch: dict) -> dict:
        """``batch`` with its targets replaced by the student's samples (tagged :data:`ON_POLICY`).

        Generated under the seed ``seed + 1 + index`` (kept as :attr:`last_generation_seed`);
        seq2seq: given the batch's inputs; causal: given each row's own prompt (its
        ``prompt_column`` length, else its first ``on_policy_prompt_tokens`` tokens).

        Args:
            model: the student (possibly wrapped).
            batch: the collated batch drawn from the data.

        Returns:
            The on-policy batch: inputs, the sampled tokens as labels (up to and including the first
            EOS), and the :data:`ON_POLICY` tag.
        """

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
            out = generate_seeded(
                student,
                self.last_generation_seed,
                input_ids=ids,
                attention_mask=att,
                pad_token_id=pad,
                **self.generation_kwargs(),
            )
            new = out[:, 1:]  # after the decoder start token
            labels = new.masked_fill(~eos_mask(new, eos_token_ids(student)), losses.IGNORE_INDEX)
            return {
                "input_ids": ids,
                "attention_mask": att,
                "labels": labels,
                ON_POLICY: torch.ones((), dtype=torch.bool),
            }
        # causal: each row continues its own prompt -- its prompt_column length, else its first
        # on_policy_prompt_tokens tokens (at most all but one) -- left-padded for generation
        rows = [row[m.bool()] for row, m in zip(ids, att)]
        given = batch.get(PROMPT_LENGTH)
        lengths = []
        for k, row in enumerate(rows):
            n = (
                int(given[k])
                if given is not None and int(given[k]) > 0
                else min(self.args.on_policy_prompt_tokens, len(row) - 1)
            )
            lengths.append(max(1, min(n, len(row))))
        width = max(lengths)
        prompt = torch.full((len(rows), width), pad, dtype=ids.dtype, device=device)
        p_att = torch.zeros_like(prompt)
        for k, (row, n) in enumerate(zip(rows, lengths)):
            prompt[k, width - n :], p_att[k, width - n :] = row[:n], 1
        out = generate_seeded(
            student,
            self.last_generation_seed,
            input_ids=prompt,
            attention_mask=p_att,
            pad_token_id=pad,
            **self.generation_kwargs(),
        )
        new = out[:, width:]
        valid = eos_mask(
            new, eos_token_ids(student)
        )  # generated tokens up to and including the first EOS
        # the scored batch, right-padded: row k = its prompt, then its generated tokens
        t = new.shape[1]
        input_ids = torch.full((len(rows), width + t), pad, dtype=ids.dtype, device=device)
        labels = torch.full_like(input_ids, losses.IGNORE_INDEX)
        mask = torch.zeros_like(input_ids)
        for k, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[k, :n], mask[k, :n] = row[:n], 1
            input_ids[k, n : n + t] = new[k].masked_fill(~valid[k], pad)
            labels[k, n : n + t] = new[k].masked_fill(~valid[k], losses.IGNORE_INDEX)
            mask[k, n : n + t] = valid[k].long()
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            ON_POLICY: torch.ones((), dtype=torch.bool),
        }

"""The trainer's side of a served teacher (``teacher_server_url``): asking ahead, and stopping resumably.

:class:`ServedTeacherSteps` is a base of :class:`lmkd.DistillationTrainer`.  With a served teacher
(:mod:`lmkd.teacher.served`) it

* checks the server before training (one line for no server, another vocabulary or tokenizer);
* with ``teacher_tokenizer`` (cross-tokenizer KD), checks the server against that tokenizer and
  wraps the collator so that each batch also carries the teacher's tokens and the aligned
  positions (:mod:`lmkd.teacher.cross_tokenizer`): the server is asked at the teacher's tokens, and
  the objective rebuilds each aligned position's distribution over the teacher's vocabulary from
  the top-k (:func:`lmkd.losses.dense_logprobs`) for the cross-tokenizer loss;
* hands out the training batches through a :class:`lmkd.teacher.served.Prefetcher`
  (``get_batch_samples``): the teacher's answers for the next ``teacher_prefetch`` batches are asked
  while the current one trains, and each batch arrives with the same keys a logit-cache batch has,
  so the objective takes the cached top-K path (:mod:`lmkd.train.objective`);
* asks synchronously for a batch that comes without them (evaluation, an on-policy batch of the
  student's fresh samples: :meth:`with_served_teacher`);
* when the server stops answering (after the client's retries), saves a checkpoint at the last
  finished step and stops with one line: ``--resume`` continues exactly there.
"""

from __future__ import annotations

import logging
import os

from lmkd.core.constants import CAUSAL, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data.tokenizing import TEACHER_ID
from lmkd.models.loading import check_model_path, load_config, load_tokenizer
from lmkd.models.vocabulary import vocab_size_of
from lmkd.teacher import logit_cache
from lmkd.teacher.frozen import attach_teacher_tokenizer
from lmkd.teacher.served import (
    Prefetcher,
    ServedTeacher,
    TeacherIdCollator,
    TeacherServerDown,
    served_batch,
)

logger = logging.getLogger(__name__)


def check_served_teacher(model_args, data_args, args) -> None:
    """Before any work: the served teacher of a run is there, scores the task's model kind and
    serves the student's vocabulary (a no-op without ``teacher_server_url``).

    Args:
        model_args: the run's :class:`lmkd.train.config.ModelArguments` (the student).
        data_args: the run's data arguments (the task).
        args: the run's :class:`lmkd.DistillationConfig`.

    Raises:
        LmkdError: no server, a task it cannot score, another vocabulary or tokenizer.
    """
    if not args.teacher_server_url or args.kd_alpha == 0:
        return
    kind = TASK_KIND[data_args.task]
    if kind not in (CAUSAL, SEQ2SEQ) or (kind == SEQ2SEQ and args.teacher_server != "lmkd"):
        raise LmkdError(
            f"a {args.teacher_server} teacher server scores "
            f"{'causal and seq2seq' if args.teacher_server == 'lmkd' else 'causal'} LMs, not the "
            f"{data_args.task} task's {kind} models; use an in-process teacher "
            "(teacher_model_name_or_path)" + (" or lmkd serve-teacher" if kind == SEQ2SEQ else "")
        )
    student = model_args.student_model_name_or_path
    check_model_path(student)
    if args.teacher_tokenizer:  # cross-tokenizer KD: the server must serve teacher_tokenizer
        teacher_tokenizer = load_tokenizer(args.teacher_tokenizer)
        for client in clients(args):
            client.check(teacher_tokenizer, None, cross=True)
        return
    tokenizer = load_tokenizer(model_args.tokenizer_name or student)
    head = load_config(student).get_text_config()
    for client in clients(args):
        client.check(tokenizer, getattr(head, "vocab_size", None))


def clients(args) -> list[ServedTeacher]:
    """A client per URL of ``teacher_server_url`` (a comma-separated list routes rows by their
    :data:`lmkd.data.tokenizing.TEACHER_ID`).

    Args:
        args: the run's :class:`lmkd.DistillationConfig`.

    Returns:
        The clients, in the list's order.
    """
    return [
        ServedTeacher(
            url.strip(),
            args.teacher_server,
            top_k=args.teacher_top_k,
            timeout=args.teacher_server_timeout,
            logprob_dtype=args.teacher_logprob_dtype,
        )
        for url in args.teacher_server_url.split(",")
        if url.strip()
    ]


class ServedTeacherSteps:
    """Trainer mixin: the served teacher's client, prefetch and resumable stop.

    Attributes:
        served: the :class:`lmkd.teacher.served.ServedTeacher` of each URL of
            ``teacher_server_url`` (None without one).
        prefetcher: the :class:`lmkd.teacher.served.Prefetcher` of the training batches (None
            without a served teacher).
    """

    served: list[ServedTeacher] | None = None
    prefetcher: Prefetcher | None = None
    served_vocab: int | None = None

    def setup_served_teacher(self, teacher_tokenizer=None) -> None:
        """Connect to ``teacher_server_url`` and check it serves the student's vocabulary -- with
        ``teacher_tokenizer``, that tokenizer's, and wrap the collator for cross-tokenizer KD (a
        no-op without a served teacher).

        Args:
            teacher_tokenizer: the teacher's tokenizer given to the trainer (None: loaded from
                ``teacher_tokenizer`` when set).

        Raises:
            LmkdError: no server, or one of another vocabulary or tokenizer.
        """
        args = self.args
        if not args.teacher_server_url or args.kd_alpha == 0:
            return
        self.served = clients(args)
        if args.teacher_tokenizer:
            self.attach_served_cross_tokenizer(teacher_tokenizer)
        else:
            for client in self.served:
                client.check(self.processing_class, vocab_size_of(self.model))
        if len(self.served) > 1:  # each row's server: its teacher_id, carried to the batch
            self.data_collator = TeacherIdCollator(self.data_collator)
        self.prefetcher = Prefetcher(
            self.served_answer,
            depth=args.teacher_prefetch,
            workers=max(args.teacher_prefetch, 1),
            merge=self._merge,
        )

    def attach_served_cross_tokenizer(self, teacher_tokenizer=None) -> None:
        """Cross-tokenizer KD with a served teacher: each server must serve ``teacher_tokenizer``
        (its fingerprint, or the probe text's tokens); the collator re-tokenises each batch for the
        teacher and aligns the positions, within the servers' position limits (a causal teacher's
        less one: its rows are sent with one more token, :func:`lmkd.teacher.served.served_batch`);
        :attr:`served_vocab` is the teacher's vocabulary its top-k is rebuilt over (``/info``'s
        ``vocab_size``; vLLM and SGLang name none: the tokenizer's size).

        Args:
            teacher_tokenizer: the teacher's tokenizer (None: loaded from ``teacher_tokenizer``).

        Raises:
            LmkdError: a server of another tokenizer, a tokenizer that is not fast.
        """
        args = self.args
        t_tok = teacher_tokenizer
        if t_tok is None or isinstance(t_tok, str):
            t_tok = load_tokenizer(t_tok or args.teacher_tokenizer)
        for client in self.served:
            client.check(t_tok, None, cross=True)
        info = [c.info for c in self.served]
        inputs = [i.get("max_positions") for i in info if i.get("max_positions")]
        targets = [i.get("max_target_positions") for i in info if i.get("max_target_positions")]
        limit = min(inputs) - (1 if self.kind == CAUSAL else 0) if inputs else None
        self.data_collator, self.cross_shared = attach_teacher_tokenizer(
            self.data_collator,
            kind=self.kind,
            student_tokenizer=self.processing_class,
            teacher=None,
            teacher_tokenizer=t_tok,
            kd_loss=args.kd_loss,
            limits=(limit, min(targets) if targets else None),
        )
        self.served_vocab = max(int(i.get("vocab_size") or len(t_tok)) for i in info)

    def served_answer(self, batch: dict) -> dict:
        """The served teacher's top-k for a batch, as logit-cache batch keys.

        Args:
            batch: the collated batch.

        Returns:
            The keys :func:`lmkd.teacher.served.served_batch` gives.
        """
        return served_batch(self.served, batch, self.kind)

    @staticmethod
    def _merge(batch: dict, answer: dict) -> dict:
        batch.update(answer)
        batch.pop(TEACHER_ID, None)  # (routed: no forward takes it)
        return batch

    def with_served_teacher(self, inputs: dict) -> dict:
        """``inputs`` with the served teacher's answer, asked now when it has none yet (evaluation,
        on-policy batches); as it is without a served teacher.

        Args:
            inputs: the batch (on the training device).

        Returns:
            The batch.
        """
        if self.served is None or logit_cache.MASK in inputs:
            return inputs
        device = inputs["input_ids"].device
        answer = self.served_answer(inputs)
        return self._merge(inputs, {k: v.to(device) for k, v in answer.items()})

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one step, through the prefetcher with a served teacher.

        Args:
            epoch_iterator: the epoch's batches.
            num_batches: the micro-batches of one optimizer step.
            device: where the counts are gathered.

        Returns:
            (the micro-batches, the accumulated batch's counts).
        """
        if self.prefetcher is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = self.prefetcher.take(epoch_iterator, num_batches)
        return batches, self._get_num_items_in_batch(batches, device)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.served and len(self.served) > 1 and TEACHER_ID not in self._signature_columns:
            # keep each row's teacher id through remove_unused_columns
            self._signature_columns = [*self._signature_columns, TEACHER_ID]

    def train(self, *args, **kwargs):
        """The Trainer's ``train``; when the teacher server stops answering, a checkpoint of the last
        finished step and a one-line stop that ``--resume`` continues.

        Args:
            *args: the Trainer's ``train`` arguments.
            **kwargs: its keyword arguments.

        Returns:
            The Trainer's ``TrainOutput``.

        Raises:
            LmkdError: the teacher server stopped answering (the checkpoint is saved first).
        """
        try:
            return super().train(*args, **kwargs)
        except TeacherServerDown as e:
            self._save_checkpoint(self.model, trial=None)
            where = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            raise LmkdError(
                f"{e}; stopped after step {self.state.global_step}, saved {where}: restart the "
                "server and rerun the same command with --resume"
            ) from None
        finally:
            if self.prefetcher is not None:
                self.prefetcher.drop()

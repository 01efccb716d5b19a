"""Cross-tokenizer position alignment by character offsets, and the collators that carry it.

When teacher and student have different tokenizers (``teacher_tokenizer``), a token-level loss
needs to know which teacher position each student position corresponds to.  Both tokenizers
encode the same text with ``return_offsets_mapping`` (fast tokenizers), and:

**The rule.**  A student token ending at character ``e`` is aligned with the teacher token that
ends at ``e`` too, or -- when no teacher token ends there -- with the last teacher token that ends
before ``e``.  A student position gets no teacher position (``-1``, no KD term) when no teacher
token ends at or before ``e`` (e.g. the first word when the teacher's first token is longer), when
it is an added special token (an empty ``(0, 0)`` span), or when the teacher's encoding was cut
(its length limit) before ``e``.  Teacher special tokens (empty spans) are never targets.
Both positions then have read the same text up to ``e`` (or the teacher a little less), which is
what a causal LM's prediction at that position is conditioned on.

**Seq2seq.**  The teacher reads the source as its own tokenizer encodes it, and its decoder the
target as its own tokenizer encodes it (its labels).  A decoder position is aligned by the target
text it has read, with the same rule on the two label sequences (:func:`decoder_positions`): the
student position after label token ``i`` (which predicts label ``i + 1``) is aligned with the
teacher position after the teacher label token that token ``i`` aligns with.  The student
position predicting the first real target token (having read only the decoder start, and any
leading special label such as BART's ``<s>``) is aligned with the teacher position predicting its
first real target token; positions before it (predicting a leading special token) get none.

:func:`align_offsets` is the rule on two lists of offsets; :func:`align_texts` encodes texts with
both tokenizers and applies it; :class:`CrossTokenizerCollator` wraps a collator: it decodes the
student's ids of each row back to text, re-encodes it for the teacher and adds
:data:`BATCH_KEYS` to the batch (of a causal LM's ``input_ids``;
:class:`Seq2SeqCrossTokenizerCollator`: of a seq2seq model's ``input_ids`` and ``labels``, the
teacher's labels in :data:`TEACHER_LABELS`).  :func:`shared_vocabulary` gives the token ids whose
strings both vocabularies hold (the exact-KL part of ``kd_loss: uld_hybrid``).
"""

from __future__ import annotations

import bisect
import logging

import torch

from lmkd.core.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: batch keys the collator adds: the teacher's tokens, their mask and, per student token (a seq2seq
#: model's: per decoder position), its teacher position; a seq2seq teacher's labels (-100 padded)
TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, TEACHER_POSITION, TEACHER_LABELS = (
    "teacher_input_ids",
    "teacher_attention_mask",
    "teacher_position",
    "teacher_labels",
)
BATCH_KEYS = (TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, TEACHER_POSITION, TEACHER_LABELS)


def align_offsets(student_offsets, teacher_offsets, teacher_covers: int | None = None) -> list[int]:
    """Per student token, the index of its teacher token under the rule of this module, or -1.

    Args:
        student_offsets: the student's ``(start, end)`` character spans, one per token (empty
            spans are special tokens).
        teacher_offsets: the teacher's, likewise.
        teacher_covers: the last character the teacher's (truncated) encoding reaches; student
            tokens ending after it are unmatched (None: the teacher read the whole text).

    Returns:
        Per student token, its teacher token's index, or -1.
    """
    spans = sorted((int(e), j) for j, (s, e) in enumerate(teacher_offsets) if int(e) > int(s))
    ends = [e for e, _ in spans]
    out = []
    for s, e in student_offsets:
        s, e = int(s), int(e)
        k = bisect.bisect_right(ends, e)  # teacher tokens ending at or before e: spans[:k]
        if e <= s or k == 0 or (teacher_covers is not None and e > teacher_covers):
            out.append(-1)
        else:
            out.append(spans[k - 1][1])
    return out


def decoder_positions(align: list[int], student_offsets, teacher_offsets) -> list[int]:
    """Per student decoder position, its teacher decoder position, or -1 (the seq2seq rule of this
    module).  Position ``i`` predicts label ``i`` having read labels ``< i``.

    Args:
        align: :func:`align_offsets` of the two label sequences' offsets.
        student_offsets: the student labels' character spans.
        teacher_offsets: the teacher labels' character spans.

    Returns:
        Per student decoder position, its teacher decoder position, or -1.
    """

    def leading(
        offsets,
    ):  # labels before the first real (non-empty) span: special tokens such as <s>
        return next((k for k, (s, e) in enumerate(offsets) if int(e) > int(s)), len(offsets))

    k_s, k_t, n_t = leading(student_offsets), leading(teacher_offsets), len(teacher_offsets)
    out = [-1] * len(student_offsets)
    if k_s < len(out) and k_t < n_t:
        out[k_s] = k_t  # both have read no target text: both predict its first real token
    for i in range(k_s + 1, len(out)):
        j = align[i - 1] + 1 if align[i - 1] >= 0 else -1
        out[i] = j if 0 < j < n_t else -1
    return out


def encode_with_offsets(
    tokenizer, text: str, max_length: int | None = None, add_special_tokens: bool = True
):
    """(ids, offsets, truncated) of ``text`` with a fast tokenizer.

    Args:
        tokenizer: a fast tokenizer (``return_offsets_mapping``).
        text: the text.
        max_length: cut to this many tokens (None: no limit).
        add_special_tokens: add the tokenizer's special tokens.

    Returns:
        The token ids, their ``(start, end)`` character spans, and whether ``max_length`` cut
        the encoding.
    """
    kw = dict(max_length=max_length, truncation=True) if max_length else {}
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens, **kw)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    truncated = bool(max_length) and len(
        tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    ) > len(ids)
    return ids, offsets, truncated


def align_texts(
    student_tokenizer, teacher_tokenizer, text: str, teacher_max_length: int | None = None
):
    """(student ids, teacher ids, alignment) of one text: both encodings and :func:`align_offsets`.

    Args:
        student_tokenizer: the student's fast tokenizer.
        teacher_tokenizer: the teacher's fast tokenizer.
        text: the text.
        teacher_max_length: the teacher's encoding is cut to this many tokens (None: no limit).

    Returns:
        The student's ids, the teacher's ids, and per student token its teacher token or -1.
    """
    s_ids, s_off, _ = encode_with_offsets(student_tokenizer, text)
    t_ids, t_off, cut = encode_with_offsets(teacher_tokenizer, text, teacher_max_length)
    covers = max((int(e) for s, e in t_off if e > s), default=0) if cut else None
    return s_ids, t_ids, align_offsets(s_off, t_off, covers)


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the token strings both vocabularies hold, in student-id order.

    Args:
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer.

    Returns:
        Two equally long ``long`` tensors (empty when no string is shared).
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    pairs = sorted((i, t_vocab[tok]) for tok, i in s_vocab.items() if tok in t_vocab)
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    s, t = zip(*pairs)
    return torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long)


class CrossTokenizerCollator:
    """Wraps a collator: each batch also gets the teacher's encoding of the same text
    (:data:`TEACHER_INPUT_IDS`, :data:`TEACHER_ATTENTION_MASK`, right-padded) and
    :data:`TEACHER_POSITION` (B, T_student): the teacher position of each student token, -1 where
    none (padding included).

    A row whose decoded text does not re-encode to the student's own ids (a lossy tokenizer)
    keeps no aligned position; the first such row is logged.

    Args:
        collator: the student's collator.
        student_tokenizer: the student's fast tokenizer (decodes the rows).
        teacher_tokenizer: the teacher's fast tokenizer (pads with its pad token, else EOS, else 0).
        teacher_max_length: the teacher's encoding is cut to this many tokens (None: no limit).
    """

    def __init__(
        self, collator, student_tokenizer, teacher_tokenizer, teacher_max_length: int | None = None
    ):
        self.collator = collator
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_max_length = teacher_max_length
        self.warned = False
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)

    def row(self, ids: list[int], max_length: int | None = None, offsets: bool = False):
        """(teacher ids, teacher token per student token) of one row's real student tokens (their text
        re-encoded for the teacher); with ``offsets``, also both encodings' offsets.

        Args:
            ids: the row's real student token ids.
            max_length: the teacher's encoding is cut to this many tokens (None: no limit).
            offsets: also return the student's and the teacher's offsets (None where the text does
                not re-encode).

        Returns:
            ``(teacher ids, alignment)``, or ``(teacher ids, alignment, student offsets, teacher
            offsets)`` with ``offsets``; the alignment is all -1 when the text does not re-encode.
        """
        text = self.student_tokenizer.decode(ids, skip_special_tokens=True)
        for specials in (True, False):
            s_ids, s_off, _ = encode_with_offsets(
                self.student_tokenizer, text, add_special_tokens=specials
            )
            if s_ids == ids:
                break
        t_ids, t_off, cut = encode_with_offsets(self.teacher_tokenizer, text, max_length)
        if s_ids != ids:
            if not self.warned:
                logger.warning(
                    "cross-tokenizer KD: a row's text does not re-encode to the student's ids (%r...); "
                    "its positions get no KD term",
                    text[:40],
                )
                self.warned = True
            return (t_ids, [-1] * len(ids)) + ((None, None) if offsets else ())
        covers = max((int(e) for s, e in t_off if e > s), default=0) if cut else None
        return (t_ids, align_offsets(s_off, t_off, covers)) + ((s_off, t_off) if offsets else ())

    def padded(self, rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of teacher rows right-padded with ``value``.

        Args:
            rows: the teacher's token ids per row.
            value: the padding id.

        Returns:
            ``(B, W)`` ids and attention mask, ``W`` the longest row (at least 1).
        """
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        return ids, mask

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        att = batch.get("attention_mask")
        att = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
        position = torch.full(ids.shape, -1, dtype=torch.long)
        t_rows = []
        for b in range(ids.shape[0]):
            where = att[b].nonzero().flatten()
            t_ids, align = self.row(ids[b, where].tolist(), self.teacher_max_length)
            position[b, where] = torch.tensor(align, dtype=torch.long)
            t_rows.append(t_ids)
        t_ids, t_att = self.padded(t_rows, self.teacher_pad)
        batch[TEACHER_INPUT_IDS], batch[TEACHER_ATTENTION_MASK], batch[TEACHER_POSITION] = (
            t_ids,
            t_att,
            position,
        )
        return batch


class Seq2SeqCrossTokenizerCollator(CrossTokenizerCollator):
    """:class:`CrossTokenizerCollator` for encoder-decoder models: the source (``input_ids``) is
    re-encoded for the teacher's encoder (:data:`TEACHER_INPUT_IDS`,
    :data:`TEACHER_ATTENTION_MASK`), the target (``labels``) for its decoder
    (:data:`TEACHER_LABELS`, -100 padded), and :data:`TEACHER_POSITION` (B, T_labels) holds each
    student decoder position's teacher decoder position (:func:`decoder_positions`), -1 where none.

    Args:
        collator: the student's seq2seq collator.
        student_tokenizer: the student's fast tokenizer.
        teacher_tokenizer: the teacher's fast tokenizer.
        teacher_max_length: the most source tokens the teacher's encoder takes (None: no limit).
        teacher_target_length: the most target tokens the teacher's decoder takes (None: no
            limit).
    """

    def __init__(
        self,
        collator,
        student_tokenizer,
        teacher_tokenizer,
        teacher_max_length: int | None = None,
        teacher_target_length: int | None = None,
    ):
        super().__init__(collator, student_tokenizer, teacher_tokenizer, teacher_max_length)
        self.teacher_target_length = teacher_target_length

    def __call__(self, features):
        batch = self.collator(features)
        ids, labels = batch["input_ids"], batch["labels"]
        att = batch.get("attention_mask")
        att = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
        position = torch.full(labels.shape, -1, dtype=torch.long)
        sources, targets = [], []
        for b in range(ids.shape[0]):
            text = self.student_tokenizer.decode(ids[b, att[b]].tolist(), skip_special_tokens=True)
            sources.append(
                encode_with_offsets(self.teacher_tokenizer, text, self.teacher_max_length)[0]
            )
            where = labels[b].ne(IGNORE_INDEX).nonzero().flatten()
            t_ids, align, s_off, t_off = self.row(
                labels[b, where].tolist(), self.teacher_target_length, offsets=True
            )
            if s_off is not None:
                position[b, where] = torch.tensor(
                    decoder_positions(align, s_off, t_off), dtype=torch.long
                )
            targets.append(t_ids)
        batch[TEACHER_INPUT_IDS], batch[TEACHER_ATTENTION_MASK] = self.padded(
            sources, self.teacher_pad
        )
        t_labels, _ = self.padded(targets, IGNORE_INDEX)
        batch[TEACHER_LABELS], batch[TEACHER_POSITION] = t_labels, position
        return batch

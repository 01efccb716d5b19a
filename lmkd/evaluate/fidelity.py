"""Token-level scores of models on the same batches: perplexity, and fidelity to a teacher.

What ``lmkd evaluate`` reports per token (:func:`score_tokens` over :func:`token_batches`):

* **perplexity**: ``exp`` of the mean token cross-entropy (nats) over every scored position of the
  data -- causal-lm: every next token of every row; mlm: the tokens masked by the collator (its
  ``mlm_probability``, drawn with a seed, the same masks for every model); seq2seq: every reference
  token, teacher-forced;
* **top-1 agreement** (% of the scored positions where the model's argmax is the teacher's) and the
  mean **KL(teacher || model)** per scored token (nats, temperature 1): how closely a student
  reproduces its teacher's next-token distribution -- the figure distillation optimises.

Every model reads the same padded batch (the masks come from :mod:`lmkd.data.positions`), in float32.
A causal LM served by an engine (:class:`lmkd.models.engines.CT2Causal`) gives the log-probability of each
next token (``token_log_probs``), not logits: it gets perplexity over the same positions, no fidelity.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import datasets
import torch

from lmkd.core.constants import CAUSAL, CLASSIFICATION, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.positions import shifted, shifted_labels
from lmkd.data.tokenizing import tokenize


def token_batches(
    ds: datasets.Dataset,
    tokenizer,
    data_args: DataArguments,
    batch_size: int,
    model=None,
    seed: int = 0,
) -> Iterator[dict]:
    """Collated batches of ``ds`` in order, tokenised for ``data_args.task`` by
    :func:`lmkd.data.tokenizing.tokenize` (the one truncation rule, fitted to ``model``: every
    model that will read them) and padded on the right; mlm batches are masked by the task's
    collator seeded with ``seed``.

    Args:
        ds: the rows (source and target columns).
        tokenizer: the tokenizer (copied: its padding side is left as it was).
        data_args: the data arguments (task, columns, lengths, ``mlm_probability``).
        batch_size: rows per batch.
        model: a model, config, path or a list of them, for the truncation lengths.
        seed: seeds the mlm masks (the same masks for every model).

    Returns:
        An iterator of collated batches (dicts of tensors, with ``labels``).

    Raises:
        LmkdError: a classification task (no token-level scores).
    """
    if TASK_KIND[data_args.task] == CLASSIFICATION:
        raise LmkdError(
            "token-level scores are for causal-lm, mlm and seq2seq tasks, not classification"
        )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = (
        "right"  # a causal LM without position ids reads left padding as a shift
    )
    rows = tokenize(ds, tokenizer, data_args, labelled=True, model=model)
    collator = collator_for(
        data_args.task, tokenizer, mlm_probability=data_args.mlm_probability, seed=seed
    )
    for i in range(0, len(rows), batch_size):
        yield collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))])


def _log_probs(model, batch: dict, kind: str) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    logits = model(**inputs).logits
    return torch.log_softmax(shifted(kind, logits).float(), dim=-1)


@torch.inference_mode()
def score_tokens(
    models: Mapping[str, torch.nn.Module], batches, task: str, teacher: str | None = None
) -> dict[str, dict[str, float]]:
    """Per label of ``models``: ``tokens`` scored, ``ce`` (mean token cross-entropy, nats) and
    ``perplexity``; with ``teacher`` also ``top1_agreement`` (%) and ``kl_to_teacher`` (mean
    KL(teacher || model) per token, nats).

    The models must share one vocabulary (the teacher's and the model's logits are compared
    position by position).  An engine model (``token_log_probs``, causal only) gets ``ce`` and
    ``perplexity``, no fidelity.

    Args:
        models: label -> model (a PyTorch model or an engine).
        batches: collated batches (:func:`token_batches`), read once.
        task: the task name (its kind decides the causal shift).
        teacher: the label of the model the others are compared with (None: no fidelity).

    Returns:
        Label -> its scores.

    Raises:
        LmkdError: ``teacher`` is not a label, an engine scores a non-causal task or is the
            teacher, vocabularies differ, or no token is scored.
    """
    kind = TASK_KIND[task]
    if teacher is not None and teacher not in models:
        raise LmkdError(f"teacher {teacher!r} is not one of the models scored")
    engines = {
        k for k, m in models.items() if hasattr(m, "token_log_probs")
    }  # target log-probs, no logits
    if engines and kind != CAUSAL:
        raise LmkdError(
            f"{', '.join(sorted(engines))}: an engine's token log-probs score causal LMs only"
        )
    if teacher in engines:
        raise LmkdError(
            f"the teacher {teacher!r} must give logits (a PyTorch model), not only token log-probs"
        )
    sums = {k: {"ce": 0.0, "agree": 0, "kl": 0.0} for k in models}
    n = 0
    for batch in batches:
        labels = shifted_labels(kind, batch["labels"])
        mask = labels.ne(-100)
        if not mask.any():
            continue
        n += int(mask.sum())
        target = labels[mask]
        ref = None
        if teacher is not None:
            ref = _log_probs(models[teacher], batch, kind)[mask.to(models[teacher].device)].cpu()
        for label, model in models.items():
            if label in engines:
                lp = model.token_log_probs(batch["input_ids"], batch.get("attention_mask"))
                sums[label]["ce"] -= float(lp[mask.cpu()].sum())
                continue
            lp = (
                ref
                if label == teacher
                else _log_probs(model, batch, kind)[mask.to(model.device)].cpu()
            )
            if ref is not None and lp.shape[-1] != ref.shape[-1]:
                raise LmkdError(
                    f"{label} has {lp.shape[-1]} logits per token but the teacher {ref.shape[-1]}; "
                    "fidelity needs one vocabulary"
                )
            sums[label]["ce"] -= float(lp.gather(-1, target[:, None]).sum())
            if ref is not None:
                sums[label]["agree"] += int(lp.argmax(-1).eq(ref.argmax(-1)).sum())
                sums[label]["kl"] += float((ref.exp() * (ref - lp)).sum())
    if n == 0:
        raise LmkdError(
            "no token to score: every row is empty after tokenising"
            + (
                " (mlm: no token was masked; more rows or a larger mlm_probability)"
                if task == "mlm"
                else ""
            )
        )
    out = {}
    for label, s in sums.items():
        ce = s["ce"] / n
        out[label] = {"tokens": n, "ce": ce, "perplexity": math.exp(ce)}
        if teacher is not None and label not in engines:
            out[label].update(
                {"top1_agreement": 100.0 * s["agree"] / n, "kl_to_teacher": max(s["kl"] / n, 0.0)}
            )
    return out

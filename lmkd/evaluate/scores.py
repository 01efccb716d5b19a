"""How evaluate scores a model beside its teacher: the primary metric of each task and the metrics'
names, quality retained (:func:`retained`), and the teacher-forced token scores -- perplexity and
fidelity to the teacher -- of every loaded model (:func:`token_scores`, over
:mod:`lmkd.evaluate.fidelity`).
"""

from __future__ import annotations

import logging

from lmkd.core.constants import SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data.dataset import DataArguments
from lmkd.evaluate import fidelity
from lmkd.models import engines
from lmkd.models.vocabulary import check_same_tokenizer

logger = logging.getLogger(__name__)

#: the score quality is retained against and plotted, per task
PRIMARY_METRIC = {
    "translation": "bleu",
    "summarization": "rouge2",
    "classification": "accuracy",
    "causal-lm": "perplexity",
    "mlm": "perplexity",
}
METRIC_NAMES = {
    "bleu": "BLEU",
    "chrf": "chrF",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "perplexity": "perplexity",
}
#: scores where lower is better: quality retained is teacher / student (100% when equal)
LOWER_IS_BETTER = ("perplexity",)


def retained(metric: str, student: float, teacher: float) -> float | None:
    """Quality retained, in %: student / teacher, or teacher / student where lower is better.

    Args:
        metric: the metric's name (those in :data:`LOWER_IS_BETTER` are inverted).
        student: the student's score.
        teacher: the teacher's score.

    Returns:
        The percentage, or None when its denominator is 0.
    """
    num, den = (teacher, student) if metric in LOWER_IS_BETTER else (student, teacher)
    return 100.0 * num / den if den else None


def token_scores(
    loaded: dict, ds, data_args: DataArguments, batch_size: int, teacher: str | None, seed: int
) -> dict[str, dict]:
    """:func:`lmkd.evaluate.fidelity.score_tokens` of every loaded ``(model, tokenizer)`` on ``ds``.

    In one pass over the same batches with fidelity to ``teacher`` when all share its tokenizer
    (else a warning), else each on its own tokenisation (perplexity only; seq2seq: nothing).
    Engines that score no tokens are left out.

    Args:
        loaded: label -> ``(model, tokenizer)``.
        ds: the rows.
        data_args: the data arguments (task, columns, lengths).
        batch_size: rows per batch.
        teacher: the teacher's label (None, or not a PyTorch model: no fidelity).
        seed: seeds the mlm masks.

    Returns:
        Label -> its token scores.
    """
    # PyTorch models give logits; a causal LM's engine the log-probs of the tokens (perplexity only);
    # other engines nothing teacher-forced
    loaded = {k: v for k, v in loaded.items() if engines.scores_tokens(v[0])}
    models = {k: m for k, (m, _) in loaded.items()}
    if teacher is not None and (teacher not in loaded or not engines.is_torch(loaded[teacher][0])):
        teacher = None
    if teacher is not None:
        try:
            for _, tok in loaded.values():
                check_same_tokenizer(tok, loaded[teacher][1])
        except LmkdError as e:
            logger.warning("no fidelity figures: %s", e)
            teacher = None
    if teacher is not None:
        batches = fidelity.token_batches(
            ds, loaded[teacher][1], data_args, batch_size, model=list(models.values()), seed=seed
        )
        return fidelity.score_tokens(models, batches, data_args.task, teacher=teacher)
    if TASK_KIND[data_args.task] == SEQ2SEQ:
        return {}
    out = {}
    for label, (model, tok) in loaded.items():
        batches = fidelity.token_batches(ds, tok, data_args, batch_size, model=model, seed=seed)
        out.update(fidelity.score_tokens({label: model}, batches, data_args.task))
    return out

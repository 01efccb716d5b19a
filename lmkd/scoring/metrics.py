"""Quality and speed of a model -- through the real libraries, nothing reimplemented.

* BLEU and chrF: sacrebleu (``BLEU().corpus_score`` == ``sacrebleu.corpus_bleu``), with the
  signature string that makes a score reproducible;
* ROUGE-1/2/L/Lsum: rouge-score with the Porter stemmer, mean F-measure over examples;
  ROUGE-Lsum splits texts into sentences on newlines (added after sentence-final punctuation when
  a text has none, as the CNN/DM evaluations do);
* per sentence (:func:`sentence_scores`, the filters and Seq-Inter of ``lmkd generate``): sacrebleu's
  sentence BLEU and chrF, rouge-score's ROUGE-2 F1 (no stemmer);
* accuracy and macro-F1 from confusion counts (sklearn's definitions, zero_division=0);
* size lives with the models: :func:`lmkd.models.loading.count_parameters` (distinct parameters) and
  :func:`lmkd.models.loading.weights_bytes` (the weight files ``from_pretrained`` loads);
* speed: latency per example at batch 1, throughput at a larger batch and (seq2seq) ms per token
  when every model decodes the same fixed number of tokens (greedy, batch 1), measured with the
  same inputs for every model in one run, the models interleaved within each repeat (so a
  machine that gets busier mid-run slows all of them alike); warm-up first, then the median of
  the repeats, under ``torch.inference_mode``.

:func:`compute_metrics_for` scores a Trainer's evaluation with the same functions.  All quality
scores are on a 0-100 scale (accuracy and macro-F1 as percentages).  Running the
models whose outputs these score is :mod:`lmkd.models.generation`'s (``generate_texts``, ``classify``).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from lmkd.core.errors import LmkdError

# ---- text quality -------------------------------------------------------------------------------


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) and its signature.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.

    Returns:
        ``(score, signature)``: BLEU on a 0-100 scale and sacrebleu's signature string.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2) and its signature.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.

    Returns:
        ``(score, signature)``: chrF on a 0-100 scale and sacrebleu's signature string.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from sacrebleu.metrics import CHRF

    _check_pairs(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """``text`` with one sentence per line, as ROUGE-Lsum expects.

    Args:
        text: a text; one that already has newlines is kept as it is (stripped); otherwise lines are
            broken after ``.``, ``!`` or ``?``.

    Returns:
        The text, one sentence per line.
    """
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text) if s)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 (rouge-score, ``use_stemmer=True``).

    Args:
        hypotheses: the outputs, one per row (sentences split by :func:`split_sentences` for Lsum).
        references: one reference per row.

    Returns:
        ``{rouge type: mean F-measure x 100}`` for each of :data:`ROUGE_TYPES`.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        # score(target, prediction); Lsum reads the newlines, the others ignore them
        scores = scorer.score(split_sentences(ref), split_sentences(hyp))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(hypotheses) for k, v in totals.items()}


#: the sentence-level scores of :func:`sentence_scores`
SENTENCE_METRICS = ("bleu", "chrf", "rouge2")


def sentence_scores(
    hypotheses: Sequence[str], references: Sequence[str], metric: str = "bleu"
) -> list[float]:
    """Sentence-level ``bleu`` / ``chrf`` (sacrebleu) or ``rouge2`` F1 (rouge-score) of each
    hypothesis against its reference, all on a 0-100 scale.

    Args:
        hypotheses: the outputs, one per row.
        references: one reference per row.
        metric: one of :data:`SENTENCE_METRICS`.

    Returns:
        One score per row.

    Raises:
        LmkdError: the lists differ in length, or an unknown ``metric``.
    """
    if len(hypotheses) != len(references):
        raise LmkdError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; give one reference per row"
        )
    if metric == "bleu":
        from sacrebleu import sentence_bleu

        return [sentence_bleu(h, [r]).score for h, r in zip(hypotheses, references)]
    if metric == "chrf":
        from sacrebleu import sentence_chrf

        return [sentence_chrf(h, [r]).score for h, r in zip(hypotheses, references)]
    if metric == "rouge2":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=False)
        return [
            100.0 * scorer.score(r, h)["rouge2"].fmeasure for h, r in zip(hypotheses, references)
        ]
    raise LmkdError(
        f"unknown filter metric {metric!r}; choose one of {', '.join(SENTENCE_METRICS)}"
    )


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Share of predictions equal to their label, in %.

    Args:
        predictions: the predicted labels.
        labels: the true labels, one per prediction.

    Returns:
        The accuracy, 0-100.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    _check_pairs(predictions, labels)
    return 100.0 * sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """Unweighted mean over classes (those in labels or predictions) of per-class F1, in %; a class
    never predicted correctly scores 0 (sklearn's ``f1_score(average='macro', zero_division=0)``).

    Args:
        predictions: the predicted labels.
        labels: the true labels, one per prediction.

    Returns:
        The macro-F1, 0-100.

    Raises:
        LmkdError: the two lists differ in length, or are empty.
    """
    _check_pairs(predictions, labels)
    classes = sorted(set(labels) | set(predictions), key=str)
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return 100.0 * sum(f1s) / len(f1s)


def quality(
    task: str, predictions: list, references: list
) -> tuple[dict[str, float], dict[str, str]]:
    """The scores of ``predictions`` for ``task``: BLEU and chrF (translation), ROUGE (summarization),
    accuracy and macro-F1 (classification) -- what ``lmkd evaluate`` reports and what training reports
    with ``predict_with_generate`` (:func:`compute_metrics_for`).

    Args:
        task: ``translation``, ``summarization`` or ``classification``.
        predictions: the outputs (texts, or class ids), one per row.
        references: the references (texts, or label ids), one per row.

    Returns:
        ``(scores, signatures)``: the scores by metric name, and the sacrebleu signatures (BLEU,
        chrF) or a description of the ROUGE settings (none for classification).

    Raises:
        LmkdError: a task without a prediction metric, or predictions and references that differ in
            length or are empty.
    """
    if task == "translation":
        b, b_sig = bleu(predictions, references)
        c, c_sig = chrf(predictions, references)
        return {"bleu": b, "chrf": c}, {"bleu": b_sig, "chrf": c_sig}
    if task == "summarization":
        return rouge(predictions, references), {
            "rouge": "rouge-score, use_stemmer=True, mean F1, Lsum on newline-split sentences"
        }
    if task == "classification":
        return {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
        }, {}
    raise LmkdError(f"no prediction metric for task {task!r}")


def compute_metrics_for(task: str, tokenizer, references: list | None = None):
    """The Trainer's ``compute_metrics`` for ``task``, scored by :func:`quality` -- the code of
    ``lmkd evaluate``.

    Translation/summarization decode the generated ids (``predict_with_generate``) as
    :func:`lmkd.models.generation.generate_texts` does and score them against ``references``;
    classification scores the argmax of the logits against the label ids.  The keys (``bleu``,
    ``chrf``, ``rouge2``, ``accuracy``, ``macro_f1``, ...) are logged with the ``eval_`` prefix and can
    be ``metric_for_best_model`` (e.g. ``eval_bleu``).

    Args:
        task: ``translation``, ``summarization`` or ``classification``.
        tokenizer: decodes the generated ids (negative ids are read as its pad id).
        references: the validation rows' target texts, in order (generation tasks).

    Returns:
        A function of the Trainer's ``EvalPrediction`` giving ``{metric: score}``; it raises
        :class:`LmkdError` when the number of generated outputs is not the number of ``references``.
    """
    import numpy as np  # (the Trainer's predictions are numpy arrays)

    def compute(pred) -> dict[str, float]:
        out = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        if task == "classification":
            return quality(
                task, np.asarray(out).argmax(-1).tolist(), np.asarray(pred.label_ids).tolist()
            )[0]
        ids = np.where(np.asarray(out) < 0, tokenizer.pad_token_id, out)
        texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if references is None or len(references) != len(texts):
            raise LmkdError(
                f"{len(texts)} generated outputs for {len(references or [])} validation references"
            )
        return quality(task, texts, [str(r) for r in references])[0]

    return compute


def _check_pairs(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise LmkdError(
            f"{len(hypotheses)} predictions but {len(references)} references; score the same rows"
        )
    if not len(references):
        raise LmkdError("nothing to score: no examples")


# ---- speed --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    runners: dict[str, Callable[[list[str]], object]],
    inputs: Sequence[str],
    batch_size: int,
    latency_examples: int = 16,
    repeats: int = 3,
    devices: dict[str, torch.device] | None = None,
    token_runners: dict[str, Callable[[str], int]] | None = None,
    closers: dict[str, Callable[[], None]] | None = None,
) -> dict[str, dict[str, float]]:
    """Latency per example at batch 1 and throughput at ``batch_size`` for each runner.

    Every runner gets the same inputs: the first ``latency_examples`` one at a time (latency), and
    all of ``inputs`` in batches of ``batch_size`` (throughput).  One warm-up pass per runner,
    then ``repeats`` rounds in which the runners take turns; the median round is reported.

    Args:
        runners: a name to a function that processes a list of inputs (generates, classifies).
        inputs: the input texts.
        batch_size: the batch size of the throughput runs.
        latency_examples: how many of the inputs are timed one at a time.
        repeats: the timed rounds.
        devices: per name, the device to synchronise before reading the clock (CPU when absent).
        token_runners: optional, per name: decode one input to a fixed number of new tokens and return
            that number (:func:`lmkd.models.generation.generate_fixed_length`); timed in the same rounds
            on the latency inputs, they give ``ms_per_token`` -- the decoding speed of the
            architecture, independent of how long the model's own outputs are -- and
            ``fixed_new_tokens``.
        closers: optional, per name: release a runner's engine after each of its turns, warm-up
            included (:meth:`lmkd.models.engines.base.Engine.close`: a live CTranslate2 translator
            slows the PyTorch models timed beside it); its next turn opens it again with one untimed
            call.

    Returns:
        Per name: ``latency_ms``, ``throughput_per_s``, the batch sizes and example counts, ``repeats``,
        ``other_cpu_load`` (:class:`OtherLoad` over the whole measurement), ``cpus``, and with a token
        runner ``ms_per_token`` and ``fixed_new_tokens``.

    Raises:
        LmkdError: ``repeats`` below 1, or no inputs.
    """
    if repeats < 1 or not inputs:
        raise LmkdError("speed needs at least one repeat and one input example")
    inputs = [str(x) for x in inputs]
    single = inputs[: max(1, latency_examples)]
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    devices = devices or {}
    token_runners = token_runners or {}
    closers = closers or {}
    busy = OtherLoad()
    lat: dict[str, list[float]] = {k: [] for k in runners}
    thr: dict[str, list[float]] = {k: [] for k in runners}
    per_tok: dict[str, list[float]] = {k: [] for k in token_runners}
    fixed: dict[str, int] = {}
    with torch.inference_mode(), busy:
        for name, run in runners.items():  # warm-up: kernels, allocator, caches
            dev = devices.get(name, torch.device("cpu"))
            run(single[:1])
            run(batches[0])
            if name in token_runners:
                fixed[name] = token_runners[name](single[0])
            _sync(dev)
            if name in closers:
                closers[name]()
        for _ in range(repeats):
            for name, run in runners.items():
                dev = devices.get(name, torch.device("cpu"))
                if name in closers:  # open the engine again, untimed
                    run(single[:1])
                _sync(dev)
                t0 = time.perf_counter()
                for x in single:
                    run([x])
                _sync(dev)
                lat[name].append((time.perf_counter() - t0) / len(single))
                t0 = time.perf_counter()
                for b in batches:
                    run(b)
                _sync(dev)
                thr[name].append(len(inputs) / (time.perf_counter() - t0))
                if name in token_runners:
                    t0 = time.perf_counter()
                    tokens = sum(token_runners[name](x) for x in single)
                    _sync(dev)
                    per_tok[name].append((time.perf_counter() - t0) / max(tokens, 1))
                if name in closers:
                    closers[name]()
    out: dict[str, dict[str, float]] = {}
    for name in runners:
        out[name] = {
            "latency_ms": 1000.0 * statistics.median(lat[name]),
            "throughput_per_s": statistics.median(thr[name]),
            "latency_batch_size": 1,
            "throughput_batch_size": batch_size,
            "latency_examples": len(single),
            "throughput_examples": len(inputs),
            "repeats": repeats,
            "other_cpu_load": busy.fraction,
            "cpus": os.cpu_count(),
        }
        if name in token_runners:
            out[name]["ms_per_token"] = 1000.0 * statistics.median(per_tok[name])
            out[name]["fixed_new_tokens"] = fixed[name]
    return out


#: above this share of the machine's cores used by other processes, timings are flagged as unreliable
BUSY_MACHINE = 0.15


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine have spent busy since boot (Linux ``/proc/stat``).

    Returns:
        The seconds, or None where the counters cannot be read.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OtherLoad:
    """Context manager: how much CPU *other* processes used while the block ran.

    A timing taken while other work ran is not the model's speed: :func:`measure_speed` records it,
    and the reports flag figures above :data:`BUSY_MACHINE`.

    Attributes:
        fraction: after the block, the share of all the machine's cores other processes used (0 =
            nothing else ran, 1 = every core busy elsewhere); None where the machine's counters cannot
            be read.
    """

    fraction: float | None = None

    def __enter__(self):
        self._t, self._own, self._busy = (
            time.perf_counter(),
            time.process_time(),
            busy_cpu_seconds(),
        )
        return self

    def __exit__(self, *exc):
        wall, own, busy = (
            time.perf_counter() - self._t,
            time.process_time() - self._own,
            busy_cpu_seconds(),
        )
        if self._busy is None or busy is None or wall <= 0:
            self.fraction = None
        else:
            # (the counters tick in 10 ms jiffies: a short block can read a little past the bounds)
            self.fraction = min(
                1.0, max(0.0, (busy - self._busy - own) / (wall * (os.cpu_count() or 1)))
            )
        return False


def busy_warning(speed: dict) -> str | None:
    """The line a report prints when a model was timed on a busy machine.

    Args:
        speed: one model's :func:`measure_speed` figures.

    Returns:
        The warning when other processes used more than :data:`BUSY_MACHINE` of the cores while it
        was timed; None otherwise.
    """
    load = speed.get("other_cpu_load")
    if load is None or load <= BUSY_MACHINE:
        return None
    return (
        f"**Speed measured on a busy machine**: other processes used {load:.0%} of the {speed.get('cpus')} "
        "cores while the models were timed, so the speed columns are not reliable; time them again on an "
        "idle machine."
    )

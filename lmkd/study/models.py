"""What the study does to a model: train it (:func:`train_student`, the one DistillationConfig the
study builds, stopped on its validation plateau by :class:`~lmkd.study.stopping.PlateauStopping`), save
it, turn an encoder into a classifier, score it and time it (:func:`lmkd.evaluate.run.evaluate_models`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json
from lmkd.study.plan import Plan, plan_view
from lmkd.study.stopping import TRAIN_LOG, PlateauStopping, StoppingRule


def study_data_args(
    task: str,
    train_file: str,
    validation_file: str | None,
    plan: Plan | Mapping[str, Any],
    target_column: str | None = None,
):
    """The :class:`lmkd.data.dataset.DataArguments` every study training reads its data with (and every logit
    cache is made with, so that the cached positions are the trained ones): the study's normalised
    columns, both sides cut at the plan's ``max_length``.

    Args:
        task: translation / summarization, classification or mlm.
        train_file: the training rows.
        validation_file: the validation rows, or None.
        plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`).
        target_column: the seq2seq target column (default ``target``).

    Returns:
        The data arguments.
    """
    from lmkd.data.dataset import DataArguments

    max_length = plan_view(plan).max_length

    # (summarization tokenises as translation does; its own name makes the validation metrics ROUGE)
    data_task = {
        "classification": "classification",
        "mlm": "mlm",
        "summarization": "summarization",
    }.get(task, "translation")
    if data_task in ("translation", "summarization"):
        cols = dict(source_column="source", target_column=target_column or "target")
    elif data_task == "classification":
        cols = dict(source_column="text", target_column="label")
    else:
        cols = dict(source_column="text")
    return DataArguments(
        task=data_task,
        train_file=train_file,
        validation_file=validation_file,
        max_source_length=max_length,
        max_target_length=max_length,
        **cols,
    )


#: the directory of a logit-cache stage (:func:`cache_teacher_logits`) that holds the cache itself
LOGIT_CACHE_DIR = "cache"


def cache_teacher_logits(
    out: str,
    teacher_dir: str,
    data_file: str,
    target_column: str,
    plan: Plan | Mapping[str, Any],
    seed: int,
) -> None:
    """A logit-cache stage: ``lmkd cache-logits`` of ``teacher_dir`` on ``data_file`` (its
    ``target_column`` as the targets) with the plan's logit-cache settings (top-K and sampled-tail
    draws, seeded by ``seed``), into ``out/cache``, read the way :func:`train_student` reads the data.

    Args:
        out: the stage's directory.
        teacher_dir: the teacher.
        data_file: the rows whose targets are cached.
        target_column: their target column.
        plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`).
        seed: the seed of the tail draws.
    """
    from lmkd.teacher.logit_cache_writer import cache_logits

    settings = plan_view(plan).logit_cache
    cache_logits(
        teacher_dir,
        study_data_args("translation", data_file, None, plan, target_column),
        os.path.join(out, LOGIT_CACHE_DIR),
        settings["top_k"],
        batch_size=64,
        tail_samples=settings["tail_samples"],
        seed=seed,
        progress=False,
    )


def training_settings(
    out: str, view, steps: int, lr: float, seed: int, stopping: StoppingRule | None
) -> dict:
    """The optimiser, schedule, evaluation and logging settings every student (and from-scratch teacher)
    of every study trains with: constant rate after warm-up, weight decay 0.01, no gradient clipping,
    no checkpoints, an evaluation every ``stopping.eval_every`` steps when a rule stops it.

    Args:
        out: the output directory.
        view: the study's plan (:func:`~lmkd.study.plan.plan_view`): batch size and warm-up.
        steps: the training steps (a cap with ``stopping``).
        lr: the learning rate.
        seed: the seed of the initialisation and data order.
        stopping: the stopping rule, or None (no evaluation on the way).

    Returns:
        :class:`~lmkd.train.config.DistillationConfig` fields.
    """
    return dict(
        output_dir=out,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=min(view.warmup_steps, steps // 3),
        # constant after warm-up: small from-scratch models learn the target-side language model first
        # and only later use the source; a decaying rate slows them down before that
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.01,
        per_device_train_batch_size=view.batch_size,
        per_device_eval_batch_size=64,
        save_strategy="no",
        report_to="none",
        eval_strategy="steps" if stopping is not None else "no",
        eval_steps=stopping.eval_every if stopping is not None else None,
        logging_steps=max(1, steps // 5),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        # measured on the quick teacher: with length-grouped batches and gradient clipping at 1.0 it still
        # ignored the source after 2000 steps, while random batches without clipping used it after 400
        max_grad_norm=0.0,
        dataloader_pin_memory=False,
    )


def train_student(
    out: str,
    init_dir: str,
    task: str,
    train_file: str,
    validation_file: str | None,
    plan: Plan | Mapping[str, Any],
    *,
    steps: int,
    lr: float,
    target_column: str | None = None,
    teacher_dir: str | None = None,
    kd_alpha: float = 0.0,
    seed: int = 42,
    stopping: StoppingRule | dict | None = None,
    **config,
) -> dict:
    """Every training of the study: one :func:`lmkd.train.run.run_distill` (DistillationTrainer) run from
    the saved model ``init_dir`` into ``out``.  The optimiser settings are the study's (constant rate
    after warm-up, no gradient clipping, weight decay 0.01).

    Args:
        out: the output directory.
        init_dir: the saved model it starts from.
        task: translation / summarization (columns ``source`` and ``target_column``), classification
            (``text``/``label``) or mlm (``text``).
        train_file: the training rows.
        validation_file: the validation rows (needed with ``stopping``), or None.
        plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`): the batch
            size, warm-up, max length and KD temperature.
        steps: the training steps (a cap with ``stopping``).
        lr: the learning rate.
        target_column: the seq2seq target column (default ``target``).
        teacher_dir: the teacher of word-level KD.
        kd_alpha: 0 is plain training; > 0 word-level KD from ``teacher_dir`` (or ``config``'s cache).
        seed: the seed of the initialisation and data order.
        stopping: a :class:`StoppingRule` or its :meth:`~StoppingRule.options`: the training stops on
            its validation plateau, the best evaluation's weights are saved, and ``out/train_log.json``
            records the steps and the validation curve (:meth:`PlateauStopping.log`).  None: exactly
            ``steps`` steps, no evaluation on the way.
        **config: DistillationConfig fields to add or override (e.g. ``logit_cache``).

    Returns:
        The training's metrics.
    """
    from lmkd.train.config import DistillationConfig, ModelArguments
    from lmkd.train.run import run_distill

    if isinstance(
        stopping, dict
    ):  # a worker process's job (lmkd.study.stages.Job) carries it as JSON
        stopping = StoppingRule(**stopping)
    if stopping is not None and validation_file is None:
        raise LmkdError("early stopping needs a validation file")
    data_args = study_data_args(task, train_file, validation_file, plan, target_column)
    view = plan_view(plan)
    args = DistillationConfig(
        **training_settings(out, view, steps, lr, seed, stopping),
        kd_alpha=kd_alpha,
        kd_temperature=view.kd_temperature,
        teacher_model_name_or_path=teacher_dir if kd_alpha > 0 else None,
        disable_tqdm=False,
        # a rule on BLEU / ROUGE: each evaluation decodes the validation rows greedily
        **(
            dict(
                predict_with_generate=True,
                generation_num_beams=1,
                generation_max_length=view.max_new_tokens,
            )
            if stopping is not None and stopping.generates
            else {}
        ),
        **config,
    )
    callback = PlateauStopping(stopping) if stopping is not None else None
    metrics = run_distill(
        ModelArguments(student_model_name_or_path=init_dir),
        data_args,
        args,
        callbacks=[callback] if callback is not None else None,
    )
    if callback is not None:
        atomic_write_json(os.path.join(out, TRAIN_LOG), callback.log())
    return metrics


def save_model(model, tokenizer, out: str) -> None:
    """``model`` and its tokenizer saved into ``out`` (what every model stage holds).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        out: the directory.
    """
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def classifier_from(encoder_dir: str, data_dir: str, out: str, seed: int = 42) -> None:
    """Save ``encoder_dir`` as a sequence classifier with the study's label set (a fresh head,
    initialised from ``seed``: the same call gives the same classifier).

    Args:
        encoder_dir: the encoder.
        data_dir: the training split's stage (its ``info.json`` names the labels).
        out: the directory of the classifier.
        seed: the seed of the fresh head.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmkd.models.loading import load_tokenizer

    with open(os.path.join(data_dir, "info.json")) as f:
        labels = json.load(f)["labels"]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)},
    )
    save_model(model, load_tokenizer(encoder_dir), out)


def has_mlm_head(encoder_dir: str) -> bool:
    """Whether the checkpoint in ``encoder_dir`` holds masked-LM head weights: loaded as a masked
    LM, none of its weights is freshly initialised (a ``BertModel`` directory, e.g. a
    sentence-transformers encoder, has none: as an MLM its head would be random).

    Args:
        encoder_dir: the checkpoint.

    Returns:
        Whether it has MLM head weights.
    """
    import logging

    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from lmkd.models.loading import check_model_path

    check_model_path(encoder_dir)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(
        logging.ERROR
    )  # the "newly initialized" warning is what we are checking
    try:
        _, info = AutoModelForMaskedLM.from_pretrained(encoder_dir, output_loading_info=True)
    except (OSError, ValueError):
        return False
    finally:
        hf_logging.set_verbosity(level)
    return not info["missing_keys"]


def evaluate_quality(
    model_dir: str, task: str, test_file: str, beams: int, max_new_tokens: int
) -> dict:
    """Quality of one saved model on the study's test file through :func:`lmkd.evaluate.run.evaluate_models`:
    greedy and beam search for seq2seq (``{"greedy": {...}, "beam": {...}}``), the scores for
    classification, plus the parameter count.  The same call on the saved model gives the same numbers.

    Args:
        model_dir: the model.
        task: the study task.
        test_file: the test rows.
        beams: the beam size of the beam evaluation (seq2seq).
        max_new_tokens: the longest generation.

    Returns:
        ``parameters``, ``bytes_on_disk``, ``examples``, the scores (per decoding mode for seq2seq) and
        the ``predictions``.
    """
    from lmkd.evaluate.run import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    modes = [("scores", 1)] if task == "classification" else [("greedy", 1), ("beam", beams)]
    out: dict = {}
    for mode, nb in modes:
        res = evaluate_models(
            {"model": model_dir},
            test_file,
            task,
            num_beams=nb,
            max_new_tokens=max_new_tokens,
            source_column=cols[0],
            target_column=cols[1],
            speed_samples=0,
        )
        m = res["models"]["model"]
        out["parameters"] = m["size"]["parameters"]
        out["bytes_on_disk"] = m["size"]["bytes_on_disk"]
        out["examples"] = res["n_examples"]
        if task == "classification":
            out.update(m["quality"])
            out["predictions"] = res["predictions"]["model"]
        else:
            out[mode] = m["quality"]
            out.setdefault("predictions", {})[mode] = res["predictions"]["model"]
            out.setdefault("signatures", {}).update(res["signatures"])
    return out


def evaluate_into(
    out: str, model_dir: str, task: str, test_file: str, beams: int, max_new_tokens: int
) -> None:
    """An evaluation stage: :func:`evaluate_quality` of ``model_dir`` written to ``out/quality.json``.

    Args:
        out: the stage's directory.
        model_dir: the model.
        task: the study task.
        test_file: the test rows.
        beams: the beam size of the beam evaluation.
        max_new_tokens: the longest generation.
    """
    atomic_write_json(
        os.path.join(out, "quality.json"),
        evaluate_quality(model_dir, task, test_file, beams, max_new_tokens),
    )


def measure_models_speed(
    model_dirs: dict[str, str],
    task: str,
    test_file: str,
    beams: int,
    max_new_tokens: int,
    examples: int,
    repeats: int,
) -> dict:
    """Latency (batch 1) and throughput of every model, measured side by side in one
    :func:`lmkd.evaluate.run.evaluate_models` run (beam search for seq2seq).

    Args:
        model_dirs: ``{name: model dir}``.
        task: the study task.
        test_file: the test rows (the timed inputs).
        beams: the beam size.
        max_new_tokens: the longest generation (and the forced length of the per-token speed).
        examples: inputs timed per model and round.
        repeats: rounds (the median is reported).

    Returns:
        ``{name: speed figures}``.
    """
    from lmkd.evaluate.run import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    res = evaluate_models(
        dict(model_dirs),
        test_file,
        task,
        num_beams=beams,
        max_new_tokens=max_new_tokens,
        source_column=cols[0],
        target_column=cols[1],
        max_samples=examples * 2,
        speed_samples=examples * 2,
        latency_samples=examples,
        repeats=repeats,
        batch_size=32,
        progress=False,
    )
    return {name: m["speed"] for name, m in res["models"].items()}

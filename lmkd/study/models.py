"""What the study does to a model: train it (:func:`train_student`, the one DistillationConfig the
study builds), save it, turn an encoder into a classifier, score it and time it (through
:func:`lmkd.evaluate.evaluate_models`)."""

from __future__ import annotations

import json
import os


def train_student(out: str, init_dir: str, task: str, train_file: str, validation_file: str | None, plan: dict, *,
                  steps: int, lr: float, target_column: str | None = None, teacher_dir: str | None = None,
                  kd_alpha: float = 0.0, seed: int = 42, **config) -> dict:
    """Every training of the study: one :func:`lmkd.distill.run_distill` (DistillationTrainer) run from
    the saved model ``init_dir`` into ``out``; returns its metrics.

    ``task``: translation / summarization (columns ``source`` and ``target_column``, default
    ``target``), classification (``text``/``label``) or mlm (``text``).  ``kd_alpha`` 0 is plain
    training; > 0 word-level KD from ``teacher_dir`` at ``plan["kd_temperature"]``.  ``plan`` (a
    :data:`lmkd.study.BUDGETS` entry, resolved) gives the batch size, warm-up and max length; the optimiser
    settings are the study's (constant rate after warm-up, no gradient clipping, weight decay 0.01).
    ``config`` adds or overrides DistillationConfig fields (e.g. ``teacher_cache``).
    """
    from ..config import DistillationConfig, ModelArguments
    from ..data import DataArguments
    from ..distill import run_distill

    data_task = {"classification": "classification", "mlm": "mlm"}.get(task, "translation")
    if data_task == "translation":
        cols = dict(source_column="source", target_column=target_column or "target")
    elif data_task == "classification":
        cols = dict(source_column="text", target_column="label")
    else:
        cols = dict(source_column="text")
    data_args = DataArguments(task=data_task, train_file=train_file, validation_file=validation_file,
                              max_source_length=plan["max_length"], max_target_length=plan["max_length"], **cols)
    args = DistillationConfig(
        output_dir=out, max_steps=steps, learning_rate=lr, warmup_steps=min(plan["warmup_steps"], steps // 3),
        # constant after warm-up: small from-scratch models learn the target-side language model first
        # and only later use the source; a decaying rate slows them down before that
        lr_scheduler_type="constant_with_warmup", weight_decay=0.01, per_device_train_batch_size=plan["batch_size"],
        per_device_eval_batch_size=64, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=max(1, steps // 5), seed=seed, data_seed=seed, dataloader_num_workers=0,
        # measured on the quick teacher: with length-grouped batches and gradient clipping at 1.0 it still
        # ignored the source after 2000 steps, while random batches without clipping used it after 400
        max_grad_norm=0.0,
        dataloader_pin_memory=False, kd_alpha=kd_alpha, kd_temperature=plan["kd_temperature"],
        teacher_model_name_or_path=teacher_dir if kd_alpha > 0 else None, disable_tqdm=False,
        **config,
    )
    metrics = run_distill(ModelArguments(student_model_name_or_path=init_dir), data_args, args)
    return metrics


def save_model(model, tokenizer, out: str) -> None:
    """``model`` and its tokenizer saved into ``out`` (what every model stage holds)."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def classifier_from(encoder_dir: str, data_dir: str, out: str) -> None:
    """Save ``encoder_dir`` as a sequence classifier with the study's label set (a fresh head)."""
    from transformers import AutoModelForSequenceClassification

    from ..modeling import load_tokenizer

    with open(os.path.join(data_dir, "info.json")) as f:
        labels = json.load(f)["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)})
    save_model(model, load_tokenizer(encoder_dir), out)


def evaluate_quality(model_dir: str, task: str, test_file: str, beams: int, max_new_tokens: int) -> dict:
    """Quality of one saved model on the study's test file through :func:`lmkd.evaluate.evaluate_models`:
    greedy and beam search for seq2seq (``{"greedy": {...}, "beam": {...}}``), the scores for
    classification, plus the parameter count.  The same call on the saved model gives the same numbers."""
    from ..evaluate import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    modes = [("scores", 1)] if task == "classification" else [("greedy", 1), ("beam", beams)]
    out: dict = {}
    for mode, nb in modes:
        res = evaluate_models({"model": model_dir}, test_file, task, num_beams=nb, max_new_tokens=max_new_tokens,
                              source_column=cols[0], target_column=cols[1], speed_samples=0)
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


def measure_models_speed(model_dirs: dict[str, str], task: str, test_file: str, beams: int, max_new_tokens: int,
                         examples: int, repeats: int) -> dict:
    """Latency (batch 1) and throughput of every model, measured side by side in one
    :func:`lmkd.evaluate.evaluate_models` run (beam search for seq2seq)."""
    from ..evaluate import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    res = evaluate_models(dict(model_dirs), test_file, task, num_beams=beams, max_new_tokens=max_new_tokens,
                          source_column=cols[0], target_column=cols[1], max_samples=examples * 2,
                          speed_samples=examples * 2, latency_samples=examples, repeats=repeats, batch_size=32,
                          progress=False)
    return {name: m["speed"] for name, m in res["models"].items()}

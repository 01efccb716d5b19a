"""evaluate_models: quality, size and speed of students side by side with their teacher.

The body of ``lmkd evaluate`` and what the study runner calls.  Quality comes from
:mod:`lmkd.scoring.metrics` (sacrebleu, rouge-score), speed from one run in which every model takes
turns on the same inputs (the runners of :mod:`lmkd.evaluate.runners`); the metric per task, quality
retained and the teacher-forced token scores (perplexity, fidelity) from :mod:`lmkd.evaluate.scores`.
:func:`lmkd.evaluate.summary.write_report` writes the JSON, a markdown table next to it and,
optionally, a plot of quality against latency, through the shared writer :mod:`lmkd.evaluate.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from lmkd.core.constants import DEFAULT_COLUMNS, EVAL_TASKS, LM_EVAL_TASKS, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data import chat
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import read_split
from lmkd.evaluate.runners import fixed_length_runner, runner_for
from lmkd.evaluate.scores import PRIMARY_METRIC, retained, token_scores
from lmkd.models import engines, generation
from lmkd.models.loading import resolve_device
from lmkd.models.truncation import describe_truncation
from lmkd.scoring import metrics, timing

logger = logging.getLogger(__name__)

#: every task ``lmkd evaluate`` scores
TASKS = EVAL_TASKS + LM_EVAL_TASKS


def _labels(values, model) -> list[int]:
    """Class ids of a label column: ints, digit strings, or names in the model's label2id."""
    label2id = {str(k): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            raise LmkdError(
                f"label {v!r} is not a class id; labels must be integers or the model's label names"
            )
        if isinstance(v, int):
            out.append(v)
        elif str(v).strip().lstrip("-").isdigit():
            out.append(int(str(v).strip()))
        elif str(v) in label2id:
            out.append(label2id[str(v)])
        else:
            raise LmkdError(
                f"label {v!r} is neither an integer nor one of the model's labels "
                f"({', '.join(label2id) or 'none'}); use class ids 0..N-1"
            )
    return out


quality = (
    metrics.quality
)  # (scores, signatures) of a task's predictions: also what training reports


def evaluate_models(
    models: str | Mapping[str, str],
    data: str | None,
    task: str,
    teacher: str | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    source_column: str | None = None,
    target_column: str | None = None,
    source_prefix: str = "",
    max_source_length: int = 512,
    max_target_length: int = 512,
    mlm_probability: float = 0.15,
    seed: int = 0,
    max_samples: int | None = None,
    speed_samples: int = 32,
    latency_samples: int = 8,
    repeats: int = 3,
    fixed_new_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    dataset: Mapping[str, str | None] | None = None,
    chat_template: str | None = None,
) -> dict:
    """Score ``models`` (a path, or ``{label: path}``) and ``teacher`` on ``data``.

    Every model is loaded from its saved directory (or hub id), predicts on the first
    ``max_samples`` rows (beam search with ``num_beams`` for translation/summarization, argmax
    for classification) and is scored with :func:`quality`.  Speed: latency per example at batch
    1 over ``latency_samples`` inputs and throughput at ``batch_size`` over ``speed_samples``
    inputs, all models in one interleaved run (``speed_samples=0`` skips it); for seq2seq also ms
    per token when each model decodes exactly ``fixed_new_tokens`` tokens (default
    ``max_new_tokens``; greedy, batch 1, the latency inputs): the architecture's speed, which the
    length of a model's own outputs does not change (``output_tokens``: how long those are).  With
    a teacher each student also gets ``vs_teacher``: quality retained (% of the teacher's score, per
    metric; teacher / student for perplexity) and speed-ups (teacher / student latency, student /
    teacher throughput and, seq2seq, teacher / student ms per token).

    ``data`` is a file (or save_to_disk dir); with ``data=None``, ``dataset`` names the rows as the
    :class:`lmkd.data.dataset.DataArguments` fields ``dataset_name``, ``dataset_config_name``, ``train_split``
    (the split scored), ``source_lang``, ``target_lang`` (these two also for a file).

    ``causal-lm`` / ``mlm``: quality is the perplexity of :mod:`lmkd.evaluate.fidelity` (mlm: over the tokens
    the collator masks with ``mlm_probability``, drawn with ``seed``; inputs cut to
    ``max_source_length``), speed one forward pass.  With a teacher every model also gets
    ``fidelity`` -- top-1 agreement with the teacher (%) and mean KL(teacher || model) per token --
    and so do seq2seq models, teacher-forced on the references (cut to ``max_target_length``).
    Models run by an engine (:mod:`lmkd.models.engines`) give no logits, so no fidelity; a causal LM's
    CTranslate2 export still gets perplexity, from the log-probabilities of the same tokens.

    Args:
        models: a model's path (labelled ``student``), or ``{label: path}``; a path may be an
            engine's export.
        data: the data file or ``save_to_disk`` directory (None: ``dataset`` names the rows).
        task: the task (one of :data:`lmkd.core.constants.TASKS`).
        teacher: the teacher's path (labelled ``teacher``), or None.
        num_beams: beams for seq2seq generation.
        max_new_tokens: the most tokens generated per example.
        batch_size: the batch size for predicting, scoring and throughput.
        source_column: the input column (default by task).
        target_column: the reference column (default by task).
        source_prefix: text put before every input.
        max_source_length: inputs are cut to this many tokens.
        max_target_length: references are cut to this many tokens (teacher-forced scores).
        mlm_probability: mlm: the share of tokens masked, in (0, 1).
        seed: seeds the mlm masks.
        max_samples: score only the first N rows (>= 1).
        speed_samples: inputs timed for throughput (0: no speed).
        latency_samples: inputs timed one at a time for latency.
        repeats: interleaved timing repeats (>= 1 with speed).
        fixed_new_tokens: seq2seq: tokens forced per example for ms/token (None:
            ``max_new_tokens``; 0: no per-token speed).
        device: the device (None: the best available).
        dtype: the models' dtype (None: auto).
        progress: show progress bars.
        dataset: with ``data=None``, the :class:`DataArguments` fields that name the rows.
        chat_template: causal-lm chat rows: a Jinja template file (None: each tokenizer's own);
            perplexity is then over the assistant tokens only (:mod:`lmkd.data.chat`).

    Returns:
        The result: ``task``, ``data``, ``n_examples``, ``primary_metric``, ``teacher``,
        ``settings``, ``signatures``, ``predictions`` and per label under ``models`` its
        ``quality``, ``size`` and, where measured, ``fidelity``, ``output_tokens``, ``speed``,
        ``truncation`` and ``vs_teacher``.

    Raises:
        LmkdError: an unknown task, a setting out of range, no model, a student labelled
            ``teacher``, or data that cannot be read.
    """
    if task not in TASKS:
        raise LmkdError(f"unknown task {task!r} for evaluate; choose one of {', '.join(TASKS)}")
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise LmkdError("--num-beams, --max-new-tokens and --batch-size must be at least 1")
    if speed_samples < 0 or (speed_samples > 0 and repeats < 1):
        # (speed is measured after all the scoring: find out now)
        raise LmkdError(
            f"--speed-samples must be >= 0 (0: no speed), and with speed --repeats >= 1; got "
            f"--speed-samples {speed_samples}, --repeats {repeats}"
        )
    if fixed_new_tokens is not None and fixed_new_tokens < 0:
        raise LmkdError(
            f"fixed_new_tokens must be >= 0 (0: no per-token speed), got {fixed_new_tokens}"
        )
    if isinstance(models, str):
        models = {"student": models}
    models = dict(models)
    if not models:
        raise LmkdError("evaluate needs at least one model")
    if teacher is not None:
        if "teacher" in models:
            raise LmkdError("'teacher' is reserved for the teacher; give the students other labels")
        models["teacher"] = teacher
    dev = resolve_device(
        device
    )  # before any data or model loads: `--device cuda` on a CPU machine is one line
    src, tgt = source_column or DEFAULT_COLUMNS[task][0], target_column or DEFAULT_COLUMNS[task][1]
    lm = task in LM_EVAL_TASKS
    if lm and not 0.0 < mlm_probability < 1.0:
        raise LmkdError(f"--mlm-probability must be in (0, 1), got {mlm_probability}")
    data_args = DataArguments(
        task=task,
        train_file=data,
        source_column=src,
        target_column=tgt,
        source_prefix=source_prefix,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        mlm_probability=mlm_probability,
        chat_template=chat_template,
        **(dataset or {}),
    )
    data_args.dashed_flags = (
        True  # its errors name evaluate's flags (--split, --source-lang), not distill's keys
    )
    ds = read_split(data_args, "train", [src, tgt], flags=("--source-column", "--target-column"))
    if data is None:
        data = (
            f"{data_args.dataset_name}"
            + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
            + f" [{data_args.train_split}]"
        )
    if max_samples is not None:
        if max_samples < 1:
            raise LmkdError("--max-samples must be at least 1")
        ds = ds.select(range(min(max_samples, len(ds))))
    rows = chat.row_format(ds.features, data_args)  # causal-lm chat / prompt-completion rows
    sources = [source_prefix + str(s) for s in ds[src]] if rows == chat.TEXT else [""] * len(ds)
    references = list(ds[tgt]) if tgt else []
    kind = TASK_KIND[task]

    loaded = {}
    for (
        label,
        path,
    ) in models.items():  # an HF model, or an export run by its engine (lmkd.models.engines)
        model, tokenizer = engines.load(path, kind, dtype=dtype, device=dev)
        if (
            lm and tokenizer.pad_token is None
        ):  # GPT-2: batches pad with EOS (masked out of every score)
            tokenizer.pad_token = tokenizer.eos_token
        if rows != chat.TEXT:  # one line for a tokenizer without a chat template, before scoring
            chat.check_chat_data(ds.features, tokenizer, data_args)
        loaded[label] = (model, tokenizer)
    if rows != chat.TEXT and speed_samples > 0:  # speed on the whole conversations
        tok = next(iter(loaded.values()))[1]
        sources[:speed_samples] = [
            "".join(chat.prompt_and_response(ds[i], tok, data_args, ds.features))
            for i in range(min(speed_samples, len(ds)))
        ]

    result: dict = {
        "task": task,
        "data": data,
        "n_examples": len(sources),
        "primary_metric": PRIMARY_METRIC[task],
        "teacher": "teacher" if teacher is not None else None,
        "settings": {
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "source_column": src,
            "target_column": tgt,
            "source_prefix": source_prefix,
            "max_source_length": max_source_length,
            "device": str(dev),
            "dtype": dtype or "auto",
            **({"mlm_probability": mlm_probability, "seed": seed} if task == "mlm" else {}),
            **({"max_target_length": max_target_length} if kind == SEQ2SEQ and teacher else {}),
            "fixed_new_tokens": (
                None
                if task == "classification" or lm
                else max_new_tokens
                if fixed_new_tokens is None
                else fixed_new_tokens or None
            ),
            "torch": torch.__version__,
        },
        "signatures": {},
        "models": {},
        "predictions": {},
    }

    tokens = (
        token_scores(loaded, ds, data_args, batch_size, "teacher" if teacher else None, seed)
        if lm or (kind == SEQ2SEQ and teacher is not None)
        else {}
    )
    for label, (model, tokenizer) in loaded.items():
        truncation: dict = {}  # what lmkd.models.truncation's rule cut for this model: reported once, here
        if lm:
            preds, refs = None, None
        elif task == "classification":
            refs = _labels(references, model)
            preds = generation.classify(
                model,
                tokenizer,
                sources,
                batch_size=batch_size,
                max_source_length=max_source_length,
                progress=progress,
                desc=label,
                stats=truncation,
            )
        else:
            refs = [str(r) for r in references]
            preds = generation.generate_texts(
                model,
                tokenizer,
                sources,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_source_length=max_source_length,
                progress=progress,
                desc=label,
                stats=truncation,
            )
        for note in truncation.values():
            (logger.warning if note["truncated"] else logger.info)(
                "%s: %s", label, describe_truncation(note)
            )
        scores, signatures = (
            ({"perplexity": tokens[label]["perplexity"]}, {}) if lm else quality(task, preds, refs)
        )
        result["signatures"].update(signatures)
        if not lm:
            result["predictions"][label] = preds
        result["models"][label] = {
            "path": str(models[label]),
            "role": "teacher" if label == result["teacher"] else "student",
            "quality": scores,
            "truncation": truncation,
            "size": {
                "parameters": engines.parameters(model),
                "bytes_on_disk": engines.weights_bytes(str(models[label])),
            },
        }
        if label in tokens:
            result["models"][label]["fidelity"] = tokens[label]
        if kind == SEQ2SEQ:
            lengths = generation.output_lengths(tokenizer, preds)
            result["models"][label]["output_tokens"] = {
                "mean": sum(lengths) / len(lengths),
                "max": max(lengths),
            }

    if speed_samples > 0:
        speed_inputs = sources[:speed_samples]
        logger.info(
            "measuring speed of %s on %d examples (%d repeats)",
            ", ".join(loaded),
            len(speed_inputs),
            repeats,
        )
        runners = {
            k: runner_for(
                task,
                m,
                t,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                max_source_length=max_source_length,
            )
            for k, (m, t) in loaded.items()
        }
        fixed = result["settings"]["fixed_new_tokens"]
        token_runners = (
            {
                k: fixed_length_runner(m, t, fixed, max_source_length=max_source_length)
                for k, (m, t) in loaded.items()
            }
            if fixed
            else None
        )
        speed = timing.measure_speed(
            runners,
            speed_inputs,
            batch_size=batch_size,
            latency_examples=latency_samples,
            repeats=repeats,
            devices={k: dev for k in loaded},
            token_runners=token_runners,
            closers={k: m.close for k, (m, _) in loaded.items() if hasattr(m, "close")},
        )
        for label in loaded:
            result["models"][label]["speed"] = speed[label]

    if teacher is not None:
        t = result["models"]["teacher"]
        for label, m in result["models"].items():
            if label == "teacher":
                continue
            vs: dict = {
                "retained_%": {k: retained(k, v, t["quality"][k]) for k, v in m["quality"].items()},
                "parameters_ratio": (
                    m["size"]["parameters"] / t["size"]["parameters"]
                    if m["size"]["parameters"] and t["size"]["parameters"]
                    else None
                ),
            }
            if "speed" in m:
                vs["speedup_latency"] = t["speed"]["latency_ms"] / m["speed"]["latency_ms"]
                vs["speedup_throughput"] = (
                    m["speed"]["throughput_per_s"] / t["speed"]["throughput_per_s"]
                )
                if "ms_per_token" in m["speed"]:
                    vs["speedup_per_token"] = (
                        t["speed"]["ms_per_token"] / m["speed"]["ms_per_token"]
                    )
            m["vs_teacher"] = vs
    return result

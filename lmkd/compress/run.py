"""compress_model: a distilled student pruned, quantised and exported for serving, in one report.

The body of ``lmkd compress`` (and what ``lmkd study``'s compress stage calls).  In order:

1. **prune** (optional): drop whole layers (:func:`lmkd.models.student.make_student` copies the kept ones)
   and/or remove the least important attention heads of every layer (:mod:`lmkd.compress.pruning`, importance
   scored on ``train`` rows), saved as ``DIR/pruned``;
2. **fine-tune** (optional, ``finetune_steps``): a short run of :func:`lmkd.train.run.run_distill` of
   the pruned model on ``train`` -- KD from ``teacher`` when given, else on the references --
   saved as ``DIR/pruned-ft``;
3. **quantise / export** the last of those models (:mod:`lmkd.models.engines`): ``DIR/torch-int8``,
   ``DIR/ct2-int8`` (seq2seq, causal LMs), ``DIR/onnx-int8`` (classifiers), ...;
4. **measure** every model -- teacher, student, pruned, fine-tuned, each export -- with
   :func:`lmkd.evaluate.run.evaluate_models` in one run (one scoring code path, speed interleaved), and
   write ``DIR/compress.json`` and ``DIR/compress.md`` (:mod:`lmkd.compress.summary`).

Every check (paths, data, columns, formats the engine cannot take, pruning every head) runs before
anything is written; the directory is built beside ``DIR`` and moved into place when complete.
"""

from __future__ import annotations

import logging
import os

from lmkd.compress import pruning
from lmkd.compress.summary import REPORT_JSON, vs_student, write_report
from lmkd.core.constants import (
    CAUSAL,
    CLASSIFICATION,
    COMPRESS_TASKS,
    DEFAULT_COLUMNS,
    SEQ2SEQ,
    TASK_KIND,
)
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_dir, check_fresh_dir, check_output
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import read_split
from lmkd.data.tokenizing import tokenize
from lmkd.evaluate import run as evaluate_run
from lmkd.models import engines
from lmkd.models.loading import (
    check_model_path,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
)
from lmkd.models.size import count_parameters

logger = logging.getLogger(__name__)

#: what compress exports when not told, per model kind
DEFAULT_EXPORTS = {
    SEQ2SEQ: ("torch-int8", "ct2-int8"),
    CLASSIFICATION: ("torch-int8", "onnx-int8"),
    CAUSAL: ("torch-int8", "ct2-int8"),
}


def compress_model(
    model: str,
    data: str | None,
    task: str,
    output: str,
    teacher: str | None = None,
    *,
    train: str | None = None,
    prune_heads: int = 0,
    layers: list[int] | None = None,
    encoder_layers: list[int] | None = None,
    decoder_layers: list[int] | None = None,
    importance_rows: int = 256,
    finetune_steps: int = 0,
    learning_rate: float = 1e-4,
    kd_alpha: float = 0.5,
    kd_temperature: float = 2.0,
    train_batch_size: int = 16,
    seed: int = 42,
    exports: list[str] | tuple[str, ...] | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    dataset: dict | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
    source_prefix: str = "",
    max_source_length: int = 512,
    max_target_length: int = 512,
    **evaluation,
) -> dict:
    """Prune, fine-tune, quantise and export ``model`` (a saved student directory) and measure every
    stage on ``data`` beside ``teacher``; write ``output/compress.json`` + ``.md`` and the models.

    Args:
        model: the saved student directory.
        data: the rows every stage is scored on (a file or ``save_to_disk`` dir; None: ``dataset``
            names them).
        task: translation, summarization, classification or causal-lm.
        output: the output directory (written atomically at the end).
        teacher: the teacher's path: scored beside the others, and the fine-tuning's KD teacher.
        train: training rows to score heads on and to fine-tune on (needed by ``prune_heads`` and
            ``finetune_steps``; not the test rows).
        prune_heads: attention heads removed per module (T5 / mT5; 0: none).
        layers: the layers kept (a one-stack model; None: all).
        encoder_layers: the encoder layers kept (None: all).
        decoder_layers: the decoder layers kept (None: all).
        importance_rows: training rows head importance is summed over (>= 1).
        finetune_steps: fine-tuning steps after pruning (0: none; needs pruning).
        learning_rate: the fine-tuning's learning rate.
        kd_alpha: the fine-tuning's KD weight (0 without a teacher).
        kd_temperature: the fine-tuning's KD temperature.
        train_batch_size: the batch size for head importance and fine-tuning.
        seed: the fine-tuning's seed.
        exports: the export formats (None: :data:`DEFAULT_EXPORTS` of the model kind).
        overwrite: replace a non-empty ``output``.
        device: the device (torch-int8 and ONNX formats run on CPU only).
        dataset: with ``data=None``, the :class:`DataArguments` fields that name the rows.
        source_column: the input column (default by task).
        target_column: the reference column (default by task).
        source_prefix: text put before every input.
        max_source_length: inputs are cut to this many tokens.
        max_target_length: targets are cut to this many tokens.
        **evaluation: the other keywords of :func:`~lmkd.evaluate.run.evaluate_models`
            (``num_beams``, ``max_new_tokens``, ``batch_size``, ``max_samples``, ``speed_samples``,
            ``repeats``, ``fixed_new_tokens``, ...).

    Returns:
        :func:`lmkd.evaluate.run.evaluate_models`'s result (``models`` holds one row per model,
        labelled ``teacher``, ``student``, ``pruned``, ``pruned-ft`` and the export formats;
        paths point into ``output``) plus ``compress`` -- the steps taken, the pruning (kept
        heads, layer map), the exports and ``vs_student`` per model (bytes ratio, per-token
        speed-up, quality difference).

    Raises:
        LmkdError: before any work: an unsupported task, a format listed twice or not
            exportable (or not on this device), heads that cannot be pruned, fine-tuning without
            pruning, pruning or fine-tuning without ``train``, a setting out of range, unreadable
            data, or an output that cannot be written.
    """
    if task not in COMPRESS_TASKS:
        raise LmkdError(
            f"compress scores translation, summarization, classification or causal-lm, not {task!r}"
        )
    kind = TASK_KIND[task]
    dev = resolve_device(device)
    check_model_path(model)
    if teacher is not None:
        check_model_path(teacher)
    config = load_config(model)
    exports = list(DEFAULT_EXPORTS[kind] if exports is None else exports)
    if len(set(exports)) != len(exports):
        raise LmkdError(f"--export lists a format twice: {','.join(exports)}")
    for fmt in exports:
        engines.check_exportable(fmt, config, kind)
        if dev.type != "cpu" and fmt in ("torch-int8", "onnx", "onnx-int8"):
            raise LmkdError(
                f"{fmt} runs on CPU only; use --device cpu (or export only ct2-* formats on {dev})"
            )
    pruning.check_head_pruning(config, prune_heads)
    drops = any(x is not None for x in (layers, encoder_layers, decoder_layers))
    pruned = drops or prune_heads > 0
    if finetune_steps < 0:
        raise LmkdError(f"--finetune-steps must be >= 0, got {finetune_steps}")
    if finetune_steps and not pruned:
        raise LmkdError(
            "--finetune-steps fine-tunes the pruned model; ask for pruning (--prune-heads or "
            "--encoder-layers/--decoder-layers/--layers), or distil the student with lmkd distill"
        )
    if (prune_heads or finetune_steps) and train is None:
        raise LmkdError(
            "--prune-heads and --finetune-steps need --train FILE: rows to score heads on and to "
            "fine-tune on (not the test rows)"
        )
    if importance_rows < 1:
        raise LmkdError(f"--importance-rows must be at least 1, got {importance_rows}")
    src = source_column or DEFAULT_COLUMNS[task][0]
    tgt = target_column or DEFAULT_COLUMNS[task][1]
    eval_args = DataArguments(
        task=task,
        train_file=data,
        source_column=src,
        target_column=tgt,
        source_prefix=source_prefix,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        **(dataset or {}),
    )
    eval_args.dashed_flags = (
        True  # its errors name compress's flags (--split, --source-lang), not distill's keys
    )
    read_split(
        eval_args, "train", [src, tgt], flags=("--source-column", "--target-column")
    )  # one line now
    train_args = None
    if train is not None:
        train_args = DataArguments(
            task=task,
            train_file=train,
            source_column=src,
            target_column=tgt,
            source_prefix=source_prefix,
            max_source_length=max_source_length,
            max_target_length=max_target_length,
        )
        read_split(train_args, "train", [src, tgt], flags=("--source-column", "--target-column"))
    check_output(
        output, "--output", directory=True
    )  # (written at the end, after pruning and fine-tuning)
    check_fresh_dir(output, overwrite)
    tokenizer = load_tokenizer(model)
    student = load_model(model, kind=kind).eval()
    steps: list[dict] = []
    prune_info: dict = {}
    if drops:  # before anything is written: a bad layer list is one line
        from lmkd.models.student import make_student, stacks_of

        # a stack not named keeps all its layers (make_student's default, every other one, is for
        # students built from a teacher)
        given = {"layers": layers, "encoder": encoder_layers, "decoder": decoder_layers}
        for name, (_, field) in stacks_of(config).items():
            n = (
                getattr(config, field, None) or config.num_layers
            )  # T5 may leave num_decoder_layers unset
            given[name] = list(range(n)) if given[name] is None else given[name]
        student = make_student(
            student,
            layers=given["layers"],
            encoder_layers=given["encoder"],
            decoder_layers=given["decoder"],
        ).eval()
        prune_info["layer_map"] = student.config.lmkd_layer_map
        steps.append({"step": "drop layers", "kept": student.config.lmkd_layer_map})

    with atomic_dir(output, overwrite) as tmp:
        paths: dict[str, str] = {"student": model}
        last = model
        if pruned:
            if prune_heads:
                importance = pruning.head_importance(
                    student,
                    _importance_batches(
                        student, tokenizer, train_args, importance_rows, train_batch_size
                    ),
                )
                kept = pruning.prune_heads(student, prune_heads, importance)
                scores = {k: [round(float(x), 6) for x in v] for k, v in importance.items()}
                prune_info["heads"] = {
                    "removed_per_layer": prune_heads,
                    "kept": kept,
                    "importance": scores,
                }
                steps.append(
                    {
                        "step": "prune heads",
                        "removed_per_layer": prune_heads,
                        "importance_rows": importance_rows,
                    }
                )
            prune_info["parameters"] = count_parameters(student)
            last = paths["pruned"] = os.path.join(tmp, "pruned")
            student.save_pretrained(last)
            tokenizer.save_pretrained(last)
            if finetune_steps:
                last = paths["pruned-ft"] = os.path.join(tmp, "pruned-ft")
                _finetune(
                    paths["pruned"],
                    last,
                    teacher,
                    train_args,
                    finetune_steps,
                    learning_rate,
                    kd_alpha,
                    kd_temperature,
                    train_batch_size,
                    seed,
                    dev,
                )
                steps.append(
                    {
                        "step": "fine-tune",
                        "steps": finetune_steps,
                        "teacher": teacher,
                        "kd_alpha": kd_alpha if teacher else 0.0,
                        "learning_rate": learning_rate,
                    }
                )
        del student
        for fmt in exports:
            paths[fmt] = os.path.join(tmp, fmt)
            engines.export(last, paths[fmt], fmt, kind)
            steps.append(
                {
                    "step": "export",
                    "format": fmt,
                    "from": os.path.basename(last) if last != model else "student",
                }
            )
        result = evaluate_run.evaluate_models(
            paths,
            data,
            task,
            teacher=teacher,
            dataset=dataset,
            source_column=source_column,
            target_column=target_column,
            source_prefix=source_prefix,
            max_source_length=max_source_length,
            max_target_length=max_target_length,
            device=str(dev),
            **evaluation,
        )
        for label, m in result["models"].items():  # the paths the files will have
            if label in paths and label != "student":
                m["path"] = os.path.join(output, os.path.relpath(paths[label], tmp))
        result["compress"] = {
            "steps": steps,
            "pruning": prune_info,
            "exports": exports,
            "vs_student": vs_student(result),
        }
        write_report(result, os.path.join(tmp, REPORT_JSON))
    return result


def _importance_batches(model, tokenizer, train_args: DataArguments, rows: int, batch_size: int):
    """Batches (with labels) of the first ``rows`` training rows, as training would see them."""
    ds = read_split(train_args, "train", [train_args.source_column, train_args.target_column])
    ds = ds.select(range(min(rows, len(ds))))
    enc = tokenize(ds, tokenizer, train_args, labelled=True, model=model)
    collate = collator_for(train_args.task, tokenizer, model)
    device = next(model.parameters()).device
    for i in range(0, len(enc), batch_size):
        batch = collate([enc[j] for j in range(i, min(i + batch_size, len(enc)))])
        yield {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}


def _finetune(
    init: str,
    out: str,
    teacher: str | None,
    train_args: DataArguments,
    steps: int,
    lr: float,
    kd_alpha: float,
    kd_temperature: float,
    batch_size: int,
    seed: int,
    dev,
) -> None:
    from lmkd.train.config import DistillationConfig, ModelArguments
    from lmkd.train.run import run_distill

    args = DistillationConfig(
        output_dir=out,
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, steps // 5),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=dev.type == "cpu",
        kd_alpha=kd_alpha if teacher else 0.0,
        kd_temperature=kd_temperature,
        teacher_model_name_or_path=teacher if teacher and kd_alpha > 0 else None,
        disable_tqdm=True,
    )
    run_distill(ModelArguments(student_model_name_or_path=init), train_args, args)

"""``lmkd compress``: prune, quantise and export a student; teacher, student and every stage in one report."""

from __future__ import annotations

import argparse
import os

from lmkd.cli.dataset_flags import add_data_arguments, data_kwargs
from lmkd.cli.flags import count, fraction, positive
from lmkd.cli.make_student import layer_list
from lmkd.core.constants import (
    CAUSAL,
    CLASSIFICATION,
    COMPRESS_TASKS,
    MLM,
    SEQ2SEQ,
    TASK_KIND,
)
from lmkd.core.errors import LmkdError


def _formats(text: str) -> list[str]:
    return [f for f in text.replace(",", " ").split() if f]


def add_parser(sub):
    """Add the ``compress`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    from lmkd.models.engines import FORMATS

    p = sub.add_parser(
        "compress",
        help="prune, quantise (int8) and export a student (CTranslate2 / ONNX Runtime), all measured",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil -> prune -> quantise -> deploy, in one report: optionally drop layers and/or remove "
        "the least important attention heads (then a short KD fine-tune from --teacher), quantise to "
        "int8 in PyTorch and export to an inference engine (CTranslate2 for encoder-decoders and "
        "GPT-2 / Llama causal LMs, ONNX Runtime for classifiers), and score teacher, student and "
        "every stage with the code of `lmkd evaluate` in one run: parameters, bytes on disk, quality, "
        "latency, ms per token, quality retained. Writes the models under --output and compress.json / "
        "compress.md there.",
        epilog="examples:\n"
        "  lmkd compress --model runs/student --teacher runs/teacher --data lmkd/corpora/ddtp_en_fr.test.jsonl.gz \\\n"
        "      --task translation --output compressed/student\n"
        "  lmkd compress --model runs/bart-6-3 --teacher facebook/bart-large-cnn --task summarization \\\n"
        "      --data data/cnn_dm/test.jsonl --train data/cnn_dm/train.jsonl --decoder-layers 0,2 \\\n"
        "      --finetune-steps 500 --export torch-int8,ct2-int8 --output compressed/bart\n"
        "  lmkd compress --model runs/t5-small-kd --data test.jsonl --train train.jsonl --task translation \\\n"
        "      --prune-heads 2 --finetune-steps 200 --teacher t5-base --output compressed/t5\n"
        "  lmkd compress --model runs/distilbert-sst2 --data data/sst2/validation.jsonl --task classification \\\n"
        "      --source-column sentence --export torch-int8,onnx-int8 --output compressed/sst2\n"
        "  lmkd compress --model runs/gpt2-kd --teacher gpt2 --data test.jsonl --task causal-lm \\\n"
        "      --layers 0,2,4 --export torch-int8,ct2-int8 --output compressed/gpt2\n"
        f"Formats: {', '.join(FORMATS)} (ct2-*: encoder-decoders and GPT-2 / Llama causal LMs; onnx*: "
        "classifiers; default torch-int8 plus ct2-int8 or onnx-int8); causal-lm is scored by perplexity. "
        "Head pruning: T5/mT5 (transformers 5 has no prune_heads; lmkd slices the projections). Engines: "
        "pip install 'lmkd[deploy]'.",
    )
    p.add_argument(
        "--model", required=True, help="the student to compress (a saved model directory)"
    )
    add_data_arguments(
        p,
        "test rows to score every model on (.jsonl[.gz], .csv, .json) or a save_to_disk dir",
        "test",
    )
    p.add_argument("--task", required=True, choices=COMPRESS_TASKS)
    p.add_argument(
        "--output", required=True, help="directory for the compressed models and compress.json/.md"
    )
    p.add_argument(
        "--teacher",
        help="teacher: scored beside the others (quality retained) and, with "
        "--finetune-steps, the KD teacher of the pruned model",
    )
    p.add_argument(
        "--train", help="training rows: scores head importance and is the fine-tuning data"
    )
    g = p.add_argument_group("pruning")
    g.add_argument(
        "--prune-heads",
        type=count(0),
        default=0,
        help="remove this many of the least important heads from every attention layer (T5/mT5)",
    )
    g.add_argument(
        "--layers", type=layer_list, help="layers to keep, single-stack models (e.g. BERT: 0,2,4)"
    )
    g.add_argument("--encoder-layers", type=layer_list, help="encoder layers to keep (e.g. 0-5)")
    g.add_argument("--decoder-layers", type=layer_list, help="decoder layers to keep (e.g. 0,5)")
    g.add_argument(
        "--importance-rows",
        type=count(1),
        default=256,
        help="--train rows that score heads (default 256)",
    )
    g.add_argument(
        "--finetune-steps",
        type=count(0),
        default=0,
        help="after pruning, fine-tune this many steps on --train (KD from --teacher when given)",
    )
    g.add_argument(
        "--learning-rate",
        type=positive,
        default=1e-4,
        help="fine-tuning learning rate (default 1e-4)",
    )
    g.add_argument(
        "--kd-alpha", type=fraction, default=0.5, help="fine-tuning KD weight (default 0.5)"
    )
    g.add_argument(
        "--train-batch-size", type=count(1), default=16, help="fine-tuning batch size (default 16)"
    )
    p.add_argument(
        "--export", type=_formats, help=f"formats, comma-separated: {', '.join(FORMATS)}"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output directory"
    )
    e = p.add_argument_group("evaluation (as in lmkd evaluate)")
    e.add_argument("--num-beams", type=count(1), default=4, help="beam size (default 4)")
    e.add_argument(
        "--max-new-tokens", type=count(1), default=128, help="generation length limit (default 128)"
    )
    e.add_argument(
        "--batch-size",
        type=count(1),
        default=16,
        help="prediction / throughput batch size (default 16)",
    )
    e.add_argument(
        "--source-column", help="input column (default: source / document / text by task)"
    )
    e.add_argument(
        "--target-column", help="reference column (default: target / summary / label by task)"
    )
    e.add_argument("--source-prefix", default="", help="text put before every input (T5)")
    e.add_argument(
        "--max-source-length",
        type=count(1),
        default=512,
        help="inputs are truncated to this many tokens",
    )
    e.add_argument("--max-samples", type=count(1), help="score only the first N rows")
    e.add_argument(
        "--speed-samples",
        type=count(0),
        default=32,
        help="inputs timed for throughput; 0 skips speed",
    )
    e.add_argument(
        "--repeats",
        type=count(1),
        default=3,
        help="timed repeats per model; the median is reported",
    )
    e.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: int8 PyTorch and ONNX Runtime run on CPU), cuda",
    )
    p.set_defaults(func=run)


#: each model kind in words, and the --task values that fit it
KIND_WORDS = {
    SEQ2SEQ: ("an encoder-decoder (seq2seq) model", "translation or summarization"),
    CAUSAL: ("a causal (decoder-only) LM", "causal-lm"),
    CLASSIFICATION: ("a sequence classifier", "classification"),
    MLM: ("a masked LM", None),
}


def check_task_fits(model: str, task: str) -> None:
    """Refuse, in one line naming the model's real kind and the task that fits it, a ``--task`` its
    architecture does not do (e.g. a GPT-2 with ``--task translation``), before any export check
    speaks of it as the kind of the task.

    Args:
        model: the ``--model`` checkpoint.
        task: the ``--task``.

    Returns:
        None.
    """
    from lmkd.models.loading import (
        check_loads_as,
        check_model_path,
        load_config,
        saved_kind,
    )

    check_model_path(model)
    config = load_config(model)
    wanted = TASK_KIND[task]
    try:
        check_loads_as(config, wanted, model)  # (what a model of this task may be loaded from)
        return
    except LmkdError:
        kind = saved_kind(config)
    what, fits = KIND_WORDS.get(kind, (f"a {kind} model", None))
    arch = (config.architectures or [config.model_type])[0]
    raise LmkdError(
        f"--model {model} is {what} ({arch}), not {KIND_WORDS[wanted][0]} as --task {task} "
        "needs; "
        + (
            f"use --task {fits}"
            if fits
            else "compress takes translation, summarization, classification or causal-lm models"
        )
        + " or a model of that task"
    )


def run(ns) -> None:
    """Compress ``ns.model`` and print the report.

    Args:
        ns: the parsed ``lmkd compress`` arguments.

    Returns:
        None.
    """
    from lmkd.compress.run import compress_model
    from lmkd.compress.summary import REPORT_JSON, REPORT_MD

    check_task_fits(ns.model, ns.task)

    result = compress_model(
        ns.model,
        ns.data,
        ns.task,
        ns.output,
        teacher=ns.teacher,
        train=ns.train,
        prune_heads=ns.prune_heads,
        layers=ns.layers,
        encoder_layers=ns.encoder_layers,
        decoder_layers=ns.decoder_layers,
        importance_rows=ns.importance_rows,
        finetune_steps=ns.finetune_steps,
        learning_rate=ns.learning_rate,
        kd_alpha=ns.kd_alpha,
        train_batch_size=ns.train_batch_size,
        exports=ns.export,
        overwrite=ns.overwrite,
        device=ns.device,
        dataset={k: v for k, v in data_kwargs(ns).items() if k != "train_file"},
        source_column=ns.source_column,
        target_column=ns.target_column,
        source_prefix=ns.source_prefix,
        max_source_length=ns.max_source_length,
        num_beams=ns.num_beams,
        max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size,
        max_samples=ns.max_samples,
        speed_samples=ns.speed_samples,
        repeats=ns.repeats,
    )
    with open(os.path.join(ns.output, REPORT_MD), encoding="utf-8") as f:
        print(f.read(), end="")
    print(
        f"wrote {os.path.join(ns.output, REPORT_JSON)} and {REPORT_MD}, models: "
        f"{', '.join(k for k in result['models'] if k not in ('teacher', 'student'))}"
    )

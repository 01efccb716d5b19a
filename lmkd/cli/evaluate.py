"""``lmkd evaluate``: quality, size and speed of a student against its teacher."""

from __future__ import annotations

import argparse
import os

from lmkd.cli.dataset_flags import add_data_arguments, data_kwargs
from lmkd.cli.flags import count, open_fraction
from lmkd.core.constants import AUTO_DTYPE_NAMES, EVAL_TASKS, LM_EVAL_TASKS
from lmkd.core.errors import LmkdError


def add_parser(sub):
    """Add the ``evaluate`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "evaluate",
        help="BLEU/chrF/ROUGE/accuracy/perplexity, size and speed of a student (against its teacher)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model on a data file with sacrebleu / rouge-score / accuracy and macro-F1, "
        "or (causal-lm, mlm) by perplexity, measure its size and speed, and with --teacher show the "
        "quality it retains, its speed-up and its fidelity to the teacher (top-1 agreement, mean "
        "KL(teacher || student) per token; seq2seq: teacher-forced on the references), all measured "
        "in one run.",
        epilog="examples:\n"
        "  lmkd evaluate --model runs/marian-student --teacher Helsinki-NLP/opus-mt-en-fr \\\n"
        "      --data lmkd/corpora/ddtp_en_fr.test.jsonl.gz --task translation --output eval/marian.json\n"
        "  lmkd evaluate --model runs/distilbart --teacher facebook/bart-large-cnn --task summarization \\\n"
        "      --data data/cnn_dm/test.jsonl --num-beams 4 --max-new-tokens 142 --plot eval/bart.png\n"
        "  lmkd evaluate --model runs/distilbert-sst2 --data data/sst2/validation.jsonl --task classification "
        "--source-column sentence\n"
        "  lmkd evaluate --model runs/distilgpt2 --teacher gpt2 --data data/wikitext/test.jsonl --task causal-lm "
        "--max-source-length 256\n"
        "  lmkd evaluate --model runs/chat-student --teacher runs/chat-teacher --task causal-lm \\\n"
        "      --data lmkd/corpora/ddtp_fr_chat.test.jsonl.gz   # chat rows: assistant tokens only\n"
        "  lmkd evaluate --model runs/distilbert --teacher bert-base-uncased --data data/wiki.jsonl --task mlm "
        "--mlm-probability 0.15 --seed 0\n"
        "  lmkd evaluate --model runs/marian-ro --teacher Helsinki-NLP/opus-mt-en-ro --task translation \\\n"
        "      --dataset-name wmt16 --dataset-config-name ro-en --split test --source-lang en --target-lang ro\n"
        "The JSON (--output) holds scores, sacrebleu signatures, sizes, speeds and every prediction; a "
        "markdown table is written next to it (.md) and printed.",
    )
    p.add_argument("--model", required=True, help="student checkpoint (saved dir or hub id)")
    add_data_arguments(p, "data file (.jsonl[.gz], .csv, .json) or a save_to_disk dir", "test")
    p.add_argument("--task", required=True, choices=EVAL_TASKS + LM_EVAL_TASKS)
    p.add_argument(
        "--teacher", help="teacher checkpoint, scored and timed the same way for comparison"
    )
    p.add_argument(
        "--num-beams", type=count(1), default=4, help="beam size for generation (default 4)"
    )
    p.add_argument(
        "--max-new-tokens", type=count(1), default=128, help="generation length limit (default 128)"
    )
    p.add_argument(
        "--batch-size",
        type=count(1),
        default=16,
        help="batch size for predictions and for the throughput measurement (default 16)",
    )
    p.add_argument(
        "--source-column", help="input column (default: source / document / text by task)"
    )
    p.add_argument(
        "--target-column", help="reference column (default: target / summary / label by task)"
    )
    p.add_argument(
        "--source-prefix",
        default="",
        help="text put before every input, e.g. 'translate English to French: ' for T5",
    )
    p.add_argument(
        "--max-source-length",
        type=count(1),
        default=512,
        help="inputs are truncated to this many tokens",
    )
    p.add_argument(
        "--max-target-length",
        type=count(1),
        default=512,
        help="seq2seq fidelity: references are truncated to this many tokens (default 512)",
    )
    p.add_argument(
        "--mlm-probability",
        type=open_fraction,
        default=0.15,
        help="mlm: share of tokens masked and scored, as in training (default 0.15)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="mlm: seed of the masks, the same for every model (default 0)",
    )
    p.add_argument("--max-samples", type=count(1), help="score only the first N rows")
    p.add_argument(
        "--speed-samples",
        type=count(0),
        default=32,
        help="inputs timed for throughput (the first 8 of them one by one for latency); 0 skips speed",
    )
    p.add_argument(
        "--repeats",
        type=count(1),
        default=3,
        help="timed repeats per model; the median is reported",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    p.add_argument(
        "--dtype",
        choices=AUTO_DTYPE_NAMES,
        default="auto",
        help="dtype the models run in (default: as saved)",
    )
    p.add_argument(
        "--chat-template",
        help="causal-lm rows of chat messages: a Jinja chat template file (default: each "
        "tokenizer's own); perplexity is over the assistant tokens only (docs/chat-data.md)",
    )
    p.add_argument("--output", help="write the results here (JSON) and the table next to it (.md)")
    p.add_argument("--plot", help="draw quality against latency into this PNG file")
    p.set_defaults(func=run)


def run(ns) -> None:
    """Run ``lmkd evaluate``.

    Args:
        ns: its parsed arguments.

    Returns:
        None.
    """
    from lmkd.core.io import check_output
    from lmkd.evaluate.run import evaluate_models
    from lmkd.evaluate.summary import write_report

    if ns.plot and ns.speed_samples == 0:
        raise LmkdError(
            "--plot draws quality against latency; it needs speed, so drop --speed-samples 0"
        )
    # the files are written after all the scoring: find out now that they cannot be
    if ns.output:
        check_output(ns.output, "--output")
        check_output(os.path.splitext(ns.output)[0] + ".md", "--output's table (.md next to it)")
    if ns.plot:
        check_output(ns.plot, "--plot")
    result = evaluate_models(
        ns.model,
        ns.data,
        ns.task,
        dataset={k: v for k, v in data_kwargs(ns).items() if k != "train_file"},
        teacher=ns.teacher,
        num_beams=ns.num_beams,
        max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size,
        source_column=ns.source_column,
        target_column=ns.target_column,
        source_prefix=ns.source_prefix,
        max_source_length=ns.max_source_length,
        max_target_length=ns.max_target_length,
        mlm_probability=ns.mlm_probability,
        seed=ns.seed,
        max_samples=ns.max_samples,
        speed_samples=ns.speed_samples,
        repeats=ns.repeats,
        device=ns.device,
        dtype=None if ns.dtype == "auto" else ns.dtype,
        chat_template=ns.chat_template,
    )
    print(write_report(result, ns.output, ns.plot), end="")
    for path in (ns.output, ns.output and os.path.splitext(ns.output)[0] + ".md", ns.plot):
        if path:
            print(f"wrote {path}")

"""``lmkd generate``: the teacher's pseudo-targets for sequence-level KD."""

from __future__ import annotations

import argparse

from lmkd.cli.dataset_flags import add_data_arguments, dashed, data_kwargs
from lmkd.cli.flags import count, open_fraction, positive, score
from lmkd.cli.output import print_json, work_on_stderr
from lmkd.core.constants import AUTO_DTYPE_NAMES


def add_parser(sub):
    """Add the ``generate`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "generate",
        help="teacher pseudo-targets for sequence-level KD (batched, sharded, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate the teacher's outputs for every row of a data file (Kim & Rush sequence-level "
        "KD). Inputs are length-sorted into batches and the result is written in input order; "
        "under `accelerate launch` each process generates its share. Work is saved every "
        "--chunk-size examples: re-run the same command to resume an interrupted run.",
        epilog="examples:\n"
        "  lmkd generate --teacher Helsinki-NLP/opus-mt-en-fr --data lmkd/corpora/ddtp_en_fr.train.jsonl.gz "
        "--output data/seqkd-fr\n"
        "  accelerate launch -m lmkd generate --teacher my-teacher --data train.jsonl --output data/pseudo "
        "--num-beams 5 --max-tokens 8192\n"
        "  lmkd generate --teacher my-teacher --data train.jsonl --output data/seqinter --num-beams 5 "
        "--num-return-sequences 5 --select seq-inter --reference-column target\n"
        "  lmkd generate --teacher my-teacher --data train.jsonl --output data/filtered "
        "--reference-column target --filter-metric chrf --filter-min 30\n"
        "  lmkd generate --teacher my-gpt --data prompts.jsonl --source-column prompt --output data/compl "
        "--do-sample --top-p 0.9 --seed 1\n"
        "  lmkd generate --teacher my-chat-lm --data lmkd/corpora/ddtp_fr_chat.train.jsonl.gz "
        "--output data/chat-seqkd --num-beams 1   # chat rows: the teacher answers each prompt\n"
        "  lmkd generate --teacher my-teacher --dataset-name wmt16 --dataset-config-name ro-en --split train "
        "--source-lang en --target-lang ro --output data/seqkd-ro\n"
        "Then train on it: `lmkd distill recipe.yaml --train-file data/seqkd-fr --target-column "
        "teacher_target` (recipes/translation/seqkd_*.yaml); chat rows: `--train-file data/chat-seqkd "
        "--source-column teacher_messages` (docs/chat-data.md).",
    )
    p.add_argument(
        "--teacher", required=True, help="teacher checkpoint (seq2seq or causal LM; dir or hub id)"
    )
    add_data_arguments(p, "input data (.jsonl[.gz], .json, .csv, or a save_to_disk dir)", "train")
    p.add_argument(
        "--output",
        required=True,
        help="output directory (a save_to_disk dataset, or generated.jsonl)",
    )
    p.add_argument("--source-column", default="source", help="input column (default: source)")
    p.add_argument(
        "--chat-template",
        help="causal LM teacher, rows of chat messages: a Jinja chat template file (default: the "
        "teacher tokenizer's own); the output's teacher_messages holds each conversation with "
        "the teacher's answer as its last turn (docs/chat-data.md)",
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
        "--num-beams",
        type=count(1),
        help="beam size (default 5, as Kim & Rush; 1 with --do-sample); 1 = greedy",
    )
    p.add_argument(
        "--num-return-sequences",
        type=count(1),
        default=1,
        help="K hypotheses kept per input (the n-best, default 1); K > 1 adds teacher_nbest",
    )
    p.add_argument(
        "--max-new-tokens", type=count(1), default=128, help="generation length limit (default 128)"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=count(1), help="inputs per batch (default 32)")
    size.add_argument(
        "--max-tokens", type=count(1), help="instead of --batch-size: padded input tokens per batch"
    )
    p.add_argument(
        "--chunk-size",
        type=count(1),
        default=1024,
        help="examples per saved chunk: at most this much work is redone after a crash (default 1024)",
    )
    p.add_argument(
        "--do-sample",
        action="store_true",
        help="sample instead of beam search (one beam; reproducible per example with --seed)",
    )
    p.add_argument(
        "--temperature", type=positive, default=1.0, help="sampling temperature (default 1)"
    )
    p.add_argument("--top-k", type=count(0), help="sampling: keep the k most likely tokens")
    p.add_argument("--top-p", type=open_fraction, help="sampling: nucleus probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam search: exponent of the length normalisation (default 1; >1 favours longer)",
    )
    p.add_argument(
        "--no-repeat-ngram-size",
        type=count(0),
        default=0,
        help="forbid repeating any n-gram of this size (pseudo-label quality; default 0 = off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=positive,
        default=1.0,
        help="penalise tokens already generated (>1; default 1 = off)",
    )
    p.add_argument(
        "--select",
        choices=["seq-inter"],
        help="seq-inter: of the K-best keep the one with the highest sentence-BLEU to the reference",
    )
    p.add_argument(
        "--reference-column", help="reference column for --select / --filter-metric (e.g. target)"
    )
    p.add_argument(
        "--filter-metric",
        choices=["bleu", "chrf", "rouge2"],
        help="drop rows whose pseudo-target scores below --filter-min against the reference",
    )
    p.add_argument("--filter-min", type=score, help="lowest score kept, on a 0-100 scale")
    p.add_argument(
        "--format",
        choices=["arrow", "jsonl"],
        default="arrow",
        help="arrow: a save_to_disk dataset (default); jsonl: OUTPUT/generated.jsonl",
    )
    p.add_argument(
        "--dtype",
        choices=AUTO_DTYPE_NAMES,
        default="auto",
        help="dtype the teacher runs in (default: as saved)",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(ns) -> None:
    """Generate the teacher's pseudo-targets of ``ns`` and print the report as JSON on stdout.

    Args:
        ns: the parsed ``lmkd generate`` arguments.

    Returns:
        None.
    """
    with work_on_stderr():  # stdout carries the report's JSON alone
        report = _generate(ns)
    from accelerate import PartialState  # already set up by generate_pseudo_targets

    if PartialState().is_main_process:
        print_json(report)


def _generate(ns) -> dict:
    from lmkd.teacher.pseudo_targets import generate_pseudo_targets

    return generate_pseudo_targets(
        ns.teacher,
        data=_named_rows(ns) if ns.dataset_name or ns.source_lang or ns.target_lang else ns.data,
        output_dir=ns.output,
        source_column=ns.source_column,
        source_prefix=ns.source_prefix,
        max_source_length=ns.max_source_length,
        num_beams=ns.num_beams,
        num_return_sequences=ns.num_return_sequences,
        max_new_tokens=ns.max_new_tokens,
        do_sample=ns.do_sample,
        temperature=ns.temperature,
        top_k=ns.top_k,
        top_p=ns.top_p,
        seed=ns.seed,
        length_penalty=ns.length_penalty,
        no_repeat_ngram_size=ns.no_repeat_ngram_size,
        repetition_penalty=ns.repetition_penalty,
        batch_size=ns.batch_size if ns.batch_size is not None or ns.max_tokens else 32,
        max_tokens=ns.max_tokens,
        chunk_size=ns.chunk_size,
        output_format=ns.format,
        select=ns.select,
        reference_column=ns.reference_column,
        filter_metric=ns.filter_metric,
        filter_min=ns.filter_min,
        dtype=ns.dtype,
        overwrite=ns.overwrite,
        progress=not ns.no_progress,
        chat_template=ns.chat_template,
    )


def _named_rows(ns):
    """The rows of ``--dataset-name`` (its ``--split``) or -- with ``--source-lang`` -- of ``--data``,
    the translation layout flattened into ``--source-column`` and ``target`` (which
    ``--reference-column target`` can then name)."""
    from lmkd.data.dataset import DataArguments
    from lmkd.data.reading import read_split

    args = dashed(
        DataArguments(
            task="translation",
            source_column=ns.source_column,
            target_column="target",
            **data_kwargs(ns),
        )
    )
    return read_split(args, "train", [ns.source_column], ("--source-column",))

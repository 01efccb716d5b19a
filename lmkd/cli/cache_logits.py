"""``lmkd cache-logits``: store the teacher's top-K log-probs for teacher-free KD."""

from __future__ import annotations

import argparse

from lmkd.cli.dataset_flags import add_data_arguments, dashed, data_kwargs
from lmkd.cli.flags import count, hidden_alias
from lmkd.cli.output import print_json, work_on_stderr
from lmkd.core.constants import AUTO_DTYPE_NAMES, CAUSAL, DTYPE_NAMES, SEQ2SEQ, TASK_KIND

#: the tasks a cache is made for: those with target tokens (seq2seq) or next tokens (causal LMs)
CACHE_TASKS = tuple(task for task, kind in TASK_KIND.items() if kind in (SEQ2SEQ, CAUSAL))


def add_parser(sub):
    """Add the ``cache-logits`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "cache-logits",
        help="store the teacher's top-K log-probs per target token, for teacher-free KD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the teacher once over the training data and store, for every target position, its "
        "top-K token ids and log-probs, the log of the remaining mass and (by default) 32 token ids "
        "drawn from that remaining mass, in shards under --output. "
        "`lmkd distill ... --logit-cache DIR` then trains with no teacher "
        "in memory and no teacher forward. Interrupted runs resume: rerun the same command.",
        epilog="examples:\n"
        "  lmkd cache-logits --teacher runs/teacher --data train.jsonl --top-k 32 --output runs/cache\n"
        "  lmkd cache-logits --teacher runs/teacher --data train.jsonl --top-k 32 --tail-samples 0 "
        "--output runs/cache_bucket\n"
        "  lmkd cache-logits --teacher gpt2 --data corpus.jsonl --task causal-lm --top-k 64 "
        "--batch-size 32 --output runs/cache\n"
        "  lmkd cache-logits --teacher runs/teacher --dataset-name wmt16 --dataset-config-name ro-en "
        "--source-lang en --target-lang ro --top-k 32 --output runs/cache\n"
        "  lmkd distill config.yaml --logit-cache runs/cache --kd-alpha 0.5\n"
        "Use the same --task, columns, max lengths and prefix for distill as here; the data must be the "
        "same file (the cache checks the tokens row by row). On disk: about 4*(K+M)+4 bytes per target "
        "token (ids uint16 when the vocabulary fits, log-probs float16): K=32 with the default 32 "
        "tail samples ~260 bytes, with --tail-samples 0 (tail bucket only) ~132 bytes. The sampled "
        "tail makes the forward-KL gradient unbiased and measured ~0.9 BLEU better than the bucket "
        "(benchmarks/results/quality_cached_kd.txt); reverse KL and JSD use the bucket either way.",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="teacher checkpoint (hub id or local dir with its tokenizer)",
    )
    add_data_arguments(p, "training data (.jsonl[.gz]/.json/.csv or a save_to_disk dir)", "train")
    p.add_argument(
        "--top-k", type=count(1), required=True, help="token ids kept per position (e.g. 32 or 64)"
    )
    p.add_argument(
        "--tail-samples",
        type=count(0),
        default=32,
        help="also store M token ids per position drawn from the teacher's mass outside the top-K: "
        "the forward-KL gradient is then unbiased (default 32, ~4*M more bytes per token; "
        "0: the tail bucket alone, e.g. --tail-samples 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tail samples (default 0)")
    p.add_argument(
        "--output", required=True, help="cache directory to write (resumed when it exists)"
    )
    p.add_argument(
        "--task",
        default="translation",
        choices=CACHE_TASKS,
        help="the task the cache is for (default: translation)",
    )
    p.add_argument(
        "--source-column", help="input column (default by task: source / document / text)"
    )
    p.add_argument("--target-column", help="target column (default by task: target / summary)")
    p.add_argument(
        "--source-prefix", default="", help="text put before every input, as for distill"
    )
    p.add_argument(
        "--max-source-length", type=count(1), default=128, help="as for distill (default 128)"
    )
    p.add_argument(
        "--max-target-length", type=count(1), default=128, help="as for distill (default 128)"
    )
    p.add_argument(
        "--max-samples",
        type=count(1),
        help="cache only the first N rows (use max_train_samples N for distill)",
    )
    p.add_argument(
        "--batch-size", type=count(1), default=16, help="teacher batch size (default 16)"
    )
    p.add_argument(
        "--shard-rows", type=count(1), default=1024, help="data rows per shard file (default 1024)"
    )
    p.add_argument(
        "--cache-dtype",
        default="float16",
        choices=DTYPE_NAMES,
        help="dtype of the stored log-probs (default float16)",
    )
    p.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=AUTO_DTYPE_NAMES,
        help="dtype the teacher runs in (default: as saved)",
    )
    p.add_argument(
        "--device", help="torch device for the teacher (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--chat-template",
        help="causal-lm rows of chat messages: a Jinja chat template file (default: the "
        "teacher tokenizer's own); the same as distill's chat_template (docs/chat-data.md)",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache in --output")
    hidden_alias(p, "--cache-dtype", "--dtype")  # its old name (elsewhere --dtype is the model's)
    p.set_defaults(func=run)


def run(ns) -> None:
    """Run ``lmkd cache-logits``.

    Args:
        ns: its parsed arguments.

    Returns:
        None.
    """
    from lmkd.data.dataset import DataArguments
    from lmkd.teacher.logit_cache_writer import cache_logits

    data_args = dashed(
        DataArguments(
            task=ns.task,
            **data_kwargs(ns),
            source_column=ns.source_column,
            target_column=ns.target_column,
            source_prefix=ns.source_prefix,
            max_source_length=ns.max_source_length,
            max_target_length=ns.max_target_length,
            max_train_samples=ns.max_samples,
            chat_template=ns.chat_template,
        )
    )
    with work_on_stderr():  # stdout carries the summary's JSON alone
        summary = cache_logits(
            ns.teacher,
            data_args,
            ns.output,
            ns.top_k,
            batch_size=ns.batch_size,
            shard_rows=ns.shard_rows,
            logprob_dtype=ns.cache_dtype,
            teacher_dtype=ns.teacher_dtype,
            device=ns.device,
            overwrite=ns.overwrite,
            tail_samples=ns.tail_samples,
            seed=ns.seed,
        )
    print_json(summary)

"""``lmkd study``: a whole distillation study (teacher, students, KD variants) and its report."""

from __future__ import annotations

import argparse
import os

from lmkd.cli.flags import count, fraction, hidden_alias, positive
from lmkd.study import BUDGETS
from lmkd.study.options import STUDY_TASKS


def _fractions(text: str) -> list[float]:
    try:
        sizes = [float(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"student sizes are fractions like '0.25,0.5', got {text!r}"
        ) from e
    if not sizes or any(
        not 0 < s <= 1 for s in sizes
    ):  # (no parameters, or a student above its teacher)
        raise argparse.ArgumentTypeError(
            f"student sizes are fractions of the teacher in (0, 1] like '0.25,0.5', got {text!r}"
        )
    return sizes


def add_parser(sub):
    """Add the ``study`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "study",
        help="run a whole distillation study (teacher, students, KD variants) and report it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or take) a teacher, distil students of one or more sizes with every KD variant, "
        "evaluate all of them on the test set with quality, size and speed, and write "
        "report.md, report.json and report.png into --output.  Seq2seq variants: baseline, word-kd, "
        "seq-kd, seq-kd+word-kd, seq-inter (Kim & Rush 2016); classification: fine-tuning alone (no-kd), "
        "task KD from the fine-tuned teacher's class logits (task-kd), the DistilBERT path "
        "(MLM-distil a layer-copied student, then fine-tune) and MLM-distil + task KD; causal-lm "
        "(prompt/completion rows, the loss on the response only): sft, seq-kd, fkl, rkl, jsd, skew-kl, "
        "taid and on-policy (GKD).  Every student trains until its validation metric (BLEU / ROUGE-L / "
        "accuracy of its greedy outputs) stops improving, within the budget's cap, and so does a seq2seq "
        "or classifier teacher trained here (--fixed-teacher-steps: a fixed count).  Every "
        "stage is cached under --output/stages: re-run the same command to resume; a changed "
        "option recomputes only the stages that depend on it.",
        epilog="examples:\n"
        "  lmkd study --task translation --budget quick --output runs/demo     # the shipped en->fr corpus\n"
        "  lmkd study --task translation --train tr.jsonl --validation va.jsonl --test te.jsonl \\\n"
        "      --teacher Helsinki-NLP/opus-mt-en-de --student-sizes 0.25,0.5 --budget full --output runs/de\n"
        "  lmkd study --task summarization --output runs/sum    # shipped French descriptions -> synopses\n"
        "  lmkd study --task classification --output runs/cls   # shipped French descriptions -> section\n"
        "  lmkd study --task causal-lm --output runs/lm   # shipped French chat rows (messages)\n"
        "  lmkd study --task causal-lm --train tr.jsonl --validation va.jsonl --test te.jsonl "
        "--teacher my-gpt2 --output runs/mylm   # columns prompt / completion, or messages\n"
        "  lmkd study --task summarization --train tr.jsonl --validation va.jsonl --test te.jsonl "
        "--output runs/mysum\n"
        "  lmkd study --task classification --train tr.csv --validation va.csv --test te.csv "
        "--source-column sentence --output runs/cls\n"
        "Budgets (measured on 2 CPU cores; the time depends on the corpus and the teacher): "
        "tiny (for tests: seconds with a tiny test model), "
        "quick (the demo, `make demo`: every student on all 16,973 rows, 2 seeds; "
        "65 min from a fresh clone on the shipped en->fr corpus on a partly shared machine, the teacher "
        "and every student trained to their validation plateau; causal-lm 13-25 min), "
        "full (hours).",
    )
    p.add_argument("--task", required=True, choices=STUDY_TASKS)
    p.add_argument(
        "--train",
        help="training data (.jsonl[.gz], .json, .csv); default: the shipped corpus of the task (en->fr "
        "synopses; French descriptions -> synopsis; -> archive section; French chat rows)",
    )
    p.add_argument("--validation", help="validation data, same format")
    p.add_argument("--test", help="test data the report is measured on, same format")
    p.add_argument(
        "--dataset-name",
        help="instead of --train/--validation/--test: a dataset read with "
        "datasets.load_dataset (a hub id, a directory of data files or a "
        "save_to_disk dir) with train, validation and test splits; its splits "
        "are written as .jsonl files into --output/dataset",
    )
    p.add_argument("--dataset-config-name", help="the dataset's configuration (e.g. ro-en)")
    p.add_argument(
        "--source-lang", help="rows {'translation': {'en': ..., 'fr': ...}}: the source language"
    )
    p.add_argument(
        "--target-lang", help="the translation layout's target language (with --source-lang)"
    )
    p.add_argument(
        "--source-column",
        help="input column (default: source / document / text / prompt by task)",
    )
    p.add_argument(
        "--target-column",
        help="target column (default: target / summary / label / completion by task)",
    )
    p.add_argument(
        "--instruction",
        help="causal-lm: text put before every prompt, on a line of its own (default: none)",
    )
    p.add_argument(
        "--teacher",
        help="teacher checkpoint with its tokenizer (default: train one from scratch); "
        "for classification a pretrained encoder (with a masked-LM head for the "
        "MLM-distil variants; without one they are skipped)",
    )
    p.add_argument(
        "--student-sizes",
        type=_fractions,
        help="student sizes as fractions of the teacher: of its parameters for seq2seq (default 0.25), "
        "of its layers for classification (default 0.5 = every other layer)",
    )
    p.add_argument(
        "--budget",
        default="quick",
        choices=list(BUDGETS),
        help="how much to train and evaluate (default quick; times: see below)",
    )
    p.add_argument(
        "--teacher-steps",
        type=count(1),
        help="override the budget's cap of the teacher's training steps (a teacher trained here stops "
        "earlier when its validation metric stops improving, by the students' rule; classification: "
        "the cap of its fine-tuning -- the masked-LM pre-training trains its budget's steps)",
    )
    p.add_argument(
        "--fixed-teacher-steps",
        action="store_true",
        help="train the teacher exactly --teacher-steps steps (default: the budget's cap, 6000 for a "
        "quick translation study), with no early stop; the demo before this rule: --fixed-teacher-steps "
        "--teacher-steps 1500 --student-steps 1500",
    )
    p.add_argument(
        "--student-steps",
        type=count(1),
        help="override the budget's cap of steps per student (each student stops earlier when its "
        "validation metric stops improving)",
    )
    p.add_argument(
        "--kd-alpha",
        type=fraction,
        default=0.5,
        help="weight of word-level KD against the gold labels in the KD variants (default 0.5)",
    )
    p.add_argument(
        "--kd-temperature",
        type=positive,
        help="KD softmax temperature (default 1 for seq2seq as Kim & Rush, 2 for MLM as DistilBERT)",
    )
    p.add_argument(
        "--num-beams",
        type=count(1),
        help="beam size for the teacher's pseudo-targets and beam evaluation "
        "(default: the budget's)",
    )
    p.add_argument(
        "--seed", type=int, default=42, help="seed of every initialisation and data order"
    )
    p.add_argument(
        "--skip-teacher-check",
        action="store_true",
        help="compare the students with a teacher that has not passed the check (its validation quality "
        "above copying the source / the most frequent target, and its use of the source); the "
        "report then says the teacher is unchecked",
    )
    p.add_argument(
        "--seeds",
        type=count(1),
        default=None,
        help="train every student variant with this many seeds (seed, seed+1, ...) and report "
        "mean +- std; a verdict must then also survive the seeds' spread; the teacher and the "
        "transfer set are shared (default: the budget's -- tiny 1, quick 2, full 3)",
    )
    p.add_argument(
        "--jobs",
        type=count(1),
        help="train (and evaluate) this many students at a time, each in a process of its own on an "
        "equal share of the cores (default: the budget's, 2 for quick and full, at most the cores)",
    )
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="skip the last stage, which exports the best student (best validation metric) as it would be "
        "served -- CTranslate2 int8 for seq2seq, ONNX Runtime int8 for classifiers, as lmkd compress "
        "does -- and reports it as one more model (needs pip install 'lmkd[deploy]'; skipped with "
        "a note when not installed)",
    )
    p.add_argument(
        "--online-kd",
        action="store_true",
        help="seq2seq: run the teacher at every Word-KD step instead of caching its log-probs once "
        "(default: the top 32 per target token plus 32 sampled from the rest, lmkd cache-logits; "
        "about 2.2x faster Word-KD students on a CPU)",
    )
    p.add_argument(
        "--teacher-split",
        type=float,
        metavar="F",
        help="seq2seq, with a teacher trained here: train it on a seeded fraction F (0 < F < 1) "
        "of the training rows only; the students learn from all of them, so on the rest the "
        "teacher's outputs are its predictions, not the memorised gold targets (the report "
        "gives both)",
    )
    p.add_argument(
        "--unlabelled",
        metavar="FILE",
        help="seq2seq: source-only rows (a 'source' column, or --source-column) added to every KD "
        "variant's transfer set with the teacher's best beam as their target; the baseline "
        "keeps the gold rows only",
    )
    p.add_argument("--output", required=True, help="study directory (stages, report.md/json/png)")
    hidden_alias(p, "--num-beams", "--beams")  # its old name; every other command says --num-beams
    p.set_defaults(func=run)


def named_splits(ns) -> tuple[str, str, str]:
    """``--dataset-name``'s train / validation / test splits as .jsonl files under ``--output/dataset``
    (the translation layout flattened into the task's columns), for the study's file-based stages.

    Args:
        ns: the parsed ``lmkd study`` arguments.

    Returns:
        The paths of the train, validation and test files.

    Raises:
        LmkdError: ``--train``/``--validation``/``--test`` given too, ``--source-lang`` without
            ``--target-lang`` (or the other way round), or a split the dataset lacks.
    """
    import os

    from lmkd.cli.dataset_flags import dashed
    from lmkd.core.constants import DEFAULT_COLUMNS
    from lmkd.core.errors import LmkdError
    from lmkd.core.io import write_jsonl
    from lmkd.data.dataset import DataArguments
    from lmkd.data.reading import read_split

    if ns.train or ns.validation or ns.test:
        raise LmkdError("give either --dataset-name or --train/--validation/--test, not both")
    if bool(ns.source_lang) != bool(ns.target_lang):
        raise LmkdError(
            "--source-lang and --target-lang go together: the keys of the 'translation' column's "
            "languages, e.g. --source-lang en --target-lang fr"
        )
    src, tgt = DEFAULT_COLUMNS[ns.task]
    src, tgt = ns.source_column or src, ns.target_column or tgt
    splits = {}
    for split in (
        "validation",
        "test",
        "train",
    ):  # all read before any is written; a missing one said first
        args = dashed(
            DataArguments(
                task=ns.task,
                dataset_name=ns.dataset_name,
                dataset_config_name=ns.dataset_config_name,
                train_split=split,
                source_lang=ns.source_lang,
                target_lang=ns.target_lang,
                source_column=src,
                target_column=tgt,
            ),
            split_advice="a study reads its train, validation and test splits; give a dataset that has "
            "all three, or the files as --train, --validation and --test",
        )
        splits[split] = read_split(
            args, "train", [src, tgt], ("--source-column", "--target-column")
        )
    paths = []
    for split in ("train", "validation", "test"):
        rows = splits[split]
        path = os.path.join(ns.output, "dataset", f"{split}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_jsonl(path, [{src: r[src], tgt: r[tgt]} for r in rows])
        paths.append(path)
    return tuple(paths)


def run(ns) -> None:
    """Run (or resume) the study of ``ns``; a refused one leaves no directory it made behind.

    Args:
        ns: the parsed ``lmkd study`` arguments.

    Returns:
        None.
    """
    from lmkd.core.io import check_output, nothing_left_on_error

    check_output(
        ns.output, "--output", directory=True
    )  # its stages write there, the first after a training
    # a study refused (bad data, a teacher that fails to load) leaves no empty --output or stages/ behind
    with (
        nothing_left_on_error(os.path.join(ns.output, "dataset")),
        nothing_left_on_error(os.path.join(ns.output, "stages")),
    ):
        _run(ns)


def _run(ns) -> None:
    from lmkd.study import StudyOptions, run_study

    if ns.dataset_name:
        ns.train, ns.validation, ns.test = named_splits(ns)
    options = StudyOptions(
        task=ns.task,
        output=ns.output,
        train=ns.train,
        validation=ns.validation,
        test=ns.test,
        source_column=ns.source_column,
        target_column=ns.target_column,
        teacher=ns.teacher,
        student_sizes=ns.student_sizes,
        budget=ns.budget,
        teacher_steps=ns.teacher_steps,
        student_steps=ns.student_steps,
        kd_alpha=ns.kd_alpha,
        kd_temperature=ns.kd_temperature,
        beams=ns.num_beams,
        seed=ns.seed,
        seeds=ns.seeds,
        jobs=ns.jobs,
        teacher_check=not ns.skip_teacher_check,
        fixed_teacher_steps=ns.fixed_teacher_steps,
        serve=not ns.no_serve,
        online_kd=ns.online_kd,
        teacher_split=ns.teacher_split,
        unlabelled=ns.unlabelled,
        instruction=ns.instruction,
    )
    run_study(options)

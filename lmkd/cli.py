"""The ``lmkd`` command.  Thin: parses arguments and calls the modules that do the work.

Every user mistake (an :class:`~lmkd.errors.LmkdError`) is printed as one line on stderr with
exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields

from .errors import LmkdError

EPILOG_DISTILL = """examples:
  lmkd distill recipes/translation/marian_word_kd.yaml
  lmkd distill config.yaml --kd_alpha 0.9 --kd_temperature 2 --output_dir runs/student
  accelerate launch -m lmkd distill recipes/distilbert/mlm_distil.yaml

regimes beyond one fixed teacher (recipes/regimes/):
  lmkd distill config.yaml --kd_alpha 1                            # KD only: data needs no label column
  lmkd distill config.yaml --transfer_file unlabelled.jsonl        # + unlabelled rows (KD only, no CE)
  lmkd distill config.yaml --teacher_model_name_or_path t1,t2 --teacher_weights 0.7,0.3   # ensemble
  lmkd distill config.yaml --rounds 3                              # born-again: round r teaches r+1
  lmkd distill config.yaml --cohort_size 2                         # co-distillation, no teacher
  lmkd distill config.yaml --kd_loss jsd --on_policy_fraction 0.5  # on-policy KD (GKD)

The YAML holds keys of the three argument groups below (model, data, DistillationConfig -- which
includes every Seq2SeqTrainingArguments field); --key value pairs after it override the YAML.
Run `lmkd distill --help-keys` to list every key."""


@dataclass
class ModelArguments:
    """Which student to train (the teacher is a DistillationConfig field)."""

    student_model_name_or_path: str = field(
        metadata={"help": "Student checkpoint (hub id or local dir), e.g. one written by `lmkd make-student`."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the student's)."})


# ---- helpers ------------------------------------------------------------------------------------


def atomic_output_dir(final: str, overwrite: bool = False):
    """Context manager: yields a temp dir next to ``final`` that is renamed to ``final`` on success
    and removed on failure, so a failed command leaves no partial output behind."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if os.path.exists(final) and os.listdir(final) and not overwrite:
            raise LmkdError(f"output directory {final} already exists and is not empty; choose another "
                            "--output or pass --overwrite")
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)

    return cm()


def _layer_list(text: str) -> list[int]:
    """'0,2,4' or '0-5,11' (inclusive ranges) -> [0, 2, 4] / [0, 1, 2, 3, 4, 5, 11]."""
    out: list[int] = []
    try:
        for part in text.replace(",", " ").split():
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"layer list must be integers like '0,2,4' or '0-5', got {text!r}") from e
    return out


# ---- make-student -------------------------------------------------------------------------------


def _add_make_student(sub):
    p = sub.add_parser(
        "make-student", help="build a smaller student by copying teacher layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy chosen teacher layers into a smaller student (DistilBERT / shrink-and-fine-tune).",
        epilog="examples:\n  lmkd make-student --teacher bert-base-uncased --output students/bert6\n"
               "  lmkd make-student --teacher facebook/bart-large-cnn --output students/bart-12-3 "
               "--encoder-layers 0-11 --decoder-layers 0,6,11\n"
               "Unspecified stacks keep every other layer (0,2,4,...).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (hub id or local dir)")
    p.add_argument("--output", required=True, help="directory to write the student (and tokenizer) to")
    p.add_argument("--layers", type=_layer_list, help="teacher layers to keep, single-stack models (BERT, GPT-2)")
    p.add_argument("--encoder-layers", type=_layer_list, help="encoder layers to keep (T5, BART, Marian)")
    p.add_argument("--decoder-layers", type=_layer_list, help="decoder layers to keep (T5, BART, Marian)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run_make_student)


def _run_make_student(ns) -> None:
    from .modeling import kind_from_config, load_model, load_tokenizer
    from .student import count_parameters, make_student

    teacher = load_model(ns.teacher, kind=kind_from_config(ns.teacher))
    tokenizer = load_tokenizer(ns.teacher, required=False)
    student = make_student(teacher, layers=ns.layers, encoder_layers=ns.encoder_layers,
                           decoder_layers=ns.decoder_layers)
    with atomic_output_dir(ns.output, ns.overwrite) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    nt, ns_ = count_parameters(teacher), count_parameters(student)
    print(f"student: {ns_:,} parameters ({ns_ / nt:.0%} of the teacher's {nt:,}); layers "
          f"{json.dumps(student.config.lmkd_layer_map)} -> {ns.output}")


# ---- distill ------------------------------------------------------------------------------------


def _distill_parser():
    from transformers import HfArgumentParser

    from .config import DistillationConfig
    from .data import DataArguments

    return HfArgumentParser((ModelArguments, DataArguments, DistillationConfig))


def _known_keys() -> dict[str, str]:
    from .config import DistillationConfig
    from .data import DataArguments

    return {f.name: cls.__name__ for cls in (ModelArguments, DataArguments, DistillationConfig) for f in fields(cls)}


def yaml_to_argv(path: str) -> list[str]:
    """Turn a recipe YAML into ``--key value`` arguments, rejecting unknown keys with a hint."""
    import yaml

    if not os.path.isfile(path):
        raise LmkdError(f"config file {path} does not exist; pass a YAML file such as recipes/…/*.yaml")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise LmkdError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise LmkdError(f"{path} must be a mapping of key: value lines")
    known = _known_keys()
    argv: list[str] = []
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; `lmkd distill --help-keys` lists them"
            raise LmkdError(f"{path}: unknown key {key!r}{hint}")
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        elif value is None:
            argv.pop()
        elif str(value).startswith("-"):  # e.g. layer_map "-1:-1": argparse would take it for an option
            argv[-1] += f"={value}"
        else:
            argv.append(str(value))
    return argv


def parse_distill_args(config: str | None, overrides: list[str]):
    """(model_args, data_args, training_args) from a YAML file plus ``--key value`` overrides."""
    argv = yaml_to_argv(config) if config else []
    known = _known_keys()
    for tok in overrides:
        if tok.startswith("--") and tok[2:].split("=")[0] not in known:
            key = tok[2:].split("=")[0]
            close = difflib.get_close_matches(key, known, n=1)
            raise LmkdError(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else ""))
    parser = _distill_parser()
    try:
        return parser.parse_args_into_dataclasses(args=argv + list(overrides))
    except SystemExit as e:  # argparse already printed its message
        raise LmkdError("invalid distill arguments (see the message above)") from e
    except LmkdError:
        raise
    except ValueError as e:  # TrainingArguments' own checks, e.g. bf16 on a machine without a bf16 GPU
        raise LmkdError(f"invalid distill arguments: {str(e).splitlines()[0]} (override the recipe's key on "
                        "the command line, e.g. --bf16 false --use_cpu true on a CPU)") from e


def _check_fresh_output(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a directory that holds another run (its checkpoints would be mixed
    with ours, and its student overwritten) unless the user asks to resume or overwrite."""
    if resume or overwrite or not os.path.isdir(output_dir):
        return
    held = [n for n in os.listdir(output_dir)
            if n.startswith("checkpoint-") or n in ("distill_results.json", "config.json", "model.safetensors")]
    if held:
        raise LmkdError(f"output_dir {output_dir} already holds a run ({sorted(held)[0]}); pass --resume to continue "
                        "it, --overwrite to replace it, or choose another --output_dir")


def _add_distill(sub):
    p = sub.add_parser("distill", help="train a student with a frozen teacher (YAML + overrides)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distil a teacher into a student with DistillationTrainer.",
                       epilog=EPILOG_DISTILL)
    p.add_argument("config", nargs="?", help="recipe YAML (keys of ModelArguments, DataArguments, DistillationConfig)")
    p.add_argument("--help-keys", action="store_true", help="list every accepted key and exit")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="train even if output_dir holds another run")
    p.set_defaults(func=_run_distill, takes_overrides=True)


def _run_distill(ns) -> None:
    if ns.help_keys:
        _distill_parser().print_help()
        return
    if not ns.config and not ns.overrides:
        raise LmkdError("distill needs a recipe YAML (or --key value arguments); see `lmkd distill --help`")
    from .distill import run_distill

    model_args, data_args, training_args = parse_distill_args(ns.config, ns.overrides)
    _check_fresh_output(training_args.output_dir, ns.resume, ns.overwrite)
    metrics = run_distill(model_args, data_args, training_args, resume=ns.resume)
    if training_args.process_index == 0:
        print(json.dumps(metrics, indent=1, sort_keys=True))


# ---- evaluate -----------------------------------------------------------------------------------


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate", help="BLEU/chrF/ROUGE/accuracy, size and speed of a student (against its teacher)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model on a data file with sacrebleu / rouge-score / accuracy and macro-F1, "
                    "measure its size and speed, and with --teacher show the quality it retains and its "
                    "speed-up, all measured in one run.",
        epilog="examples:\n"
               "  lmkd evaluate --model runs/marian-student --teacher Helsinki-NLP/opus-mt-en-fr \\\n"
               "      --data lmkd/corpora/ddtp_en_fr.test.jsonl.gz --task translation --output eval/marian.json\n"
               "  lmkd evaluate --model runs/distilbart --teacher facebook/bart-large-cnn --task summarization \\\n"
               "      --data data/cnn_dm/test.jsonl --num-beams 4 --max-new-tokens 142 --plot eval/bart.png\n"
               "  lmkd evaluate --model runs/distilbert-sst2 --data data/sst2/validation.jsonl --task classification "
               "--source-column sentence\n"
               "The JSON (--output) holds scores, sacrebleu signatures, sizes, speeds and every prediction; a "
               "markdown table is written next to it (.md) and printed.")
    p.add_argument("--model", required=True, help="student checkpoint (saved dir or hub id)")
    p.add_argument("--data", required=True, help="data file (.jsonl[.gz], .csv, .json) or a save_to_disk dir")
    p.add_argument("--task", required=True, choices=["translation", "summarization", "classification"])
    p.add_argument("--teacher", help="teacher checkpoint, scored and timed the same way for comparison")
    p.add_argument("--num-beams", type=int, default=4, help="beam size for generation (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="batch size for predictions and for the throughput measurement (default 16)")
    p.add_argument("--source-column", help="input column (default: source / document / text by task)")
    p.add_argument("--target-column", help="reference column (default: target / summary / label by task)")
    p.add_argument("--source-prefix", default="", help="text put before every input, e.g. 'translate English "
                                                       "to French: ' for T5")
    p.add_argument("--max-source-length", type=int, default=512, help="inputs are truncated to this many tokens")
    p.add_argument("--max-samples", type=int, help="score only the first N rows")
    p.add_argument("--speed-samples", type=int, default=32,
                   help="inputs timed for throughput (the first 8 of them one by one for latency); 0 skips speed")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per model; the median is reported")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype the models run in (default: as saved)")
    p.add_argument("--output", help="write the results here (JSON) and the table next to it (.md)")
    p.add_argument("--plot", help="draw quality against latency into this PNG file")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(ns) -> None:
    from .evaluate import evaluate_models, write_report

    if ns.plot and ns.speed_samples == 0:
        raise LmkdError("--plot draws quality against latency; it needs speed, so drop --speed-samples 0")
    result = evaluate_models(
        ns.model, ns.data, ns.task, teacher=ns.teacher, num_beams=ns.num_beams, max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size, source_column=ns.source_column, target_column=ns.target_column,
        source_prefix=ns.source_prefix, max_source_length=ns.max_source_length, max_samples=ns.max_samples,
        speed_samples=ns.speed_samples, repeats=ns.repeats, device=ns.device,
        dtype=None if ns.dtype == "auto" else ns.dtype)
    print(write_report(result, ns.output, ns.plot), end="")
    for path in (ns.output, ns.output and os.path.splitext(ns.output)[0] + ".md", ns.plot):
        if path:
            print(f"wrote {path}")


# ---- generate -----------------------------------------------------------------------------------


def _add_generate(sub):
    p = sub.add_parser(
        "generate", help="teacher pseudo-targets for sequence-level KD (batched, sharded, resumable)",
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
               "--do-sample --num-beams 1 --top-p 0.9 --seed 1\n"
               "Then train on it: `lmkd distill recipe.yaml --train_file data/seqkd-fr --target_column "
               "teacher_target` (recipes/translation/seqkd_*.yaml).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (seq2seq or causal LM; dir or hub id)")
    p.add_argument("--data", required=True, help="input data (.jsonl[.gz], .json, .csv, or a save_to_disk dir)")
    p.add_argument("--output", required=True, help="output directory (a save_to_disk dataset, or generated.jsonl)")
    p.add_argument("--source-column", default="source", help="input column (default: source)")
    p.add_argument("--source-prefix", default="", help="text put before every input, e.g. 'translate English "
                                                       "to French: ' for T5")
    p.add_argument("--max-source-length", type=int, default=512, help="inputs are truncated to this many tokens")
    p.add_argument("--num-beams", type=int, default=5, help="beam size (default 5, as Kim & Rush); 1 = greedy")
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="K hypotheses kept per input (the n-best, default 1); K > 1 adds teacher_nbest")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=int, help="inputs per batch (default 32)")
    size.add_argument("--max-tokens", type=int, help="instead of --batch-size: padded input tokens per batch")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="examples per saved chunk: at most this much work is redone after a crash (default 1024)")
    p.add_argument("--do-sample", action="store_true",
                   help="sample instead of beam search (one beam; reproducible per example with --seed)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sampling: nucleus probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: exponent of the length normalisation (default 1; >1 favours longer)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="forbid repeating any n-gram of this size (pseudo-label quality; default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="penalise tokens already generated (>1; default 1 = off)")
    p.add_argument("--select", choices=["seq-inter"],
                   help="seq-inter: of the K-best keep the one with the highest sentence-BLEU to the reference")
    p.add_argument("--reference-column", help="reference column for --select / --filter-metric (e.g. target)")
    p.add_argument("--filter-metric", choices=["bleu", "chrf", "rouge2"],
                   help="drop rows whose pseudo-target scores below --filter-min against the reference")
    p.add_argument("--filter-min", type=float, help="lowest score kept, on a 0-100 scale")
    p.add_argument("--format", choices=["arrow", "jsonl"], default="arrow",
                   help="arrow: a save_to_disk dataset (default); jsonl: OUTPUT/generated.jsonl")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype the teacher runs in (default: as saved)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_generate)


def _run_generate(ns) -> None:
    from .seqkd import generate_pseudo_targets

    report = generate_pseudo_targets(
        ns.teacher, data=ns.data, output_dir=ns.output, source_column=ns.source_column,
        source_prefix=ns.source_prefix, max_source_length=ns.max_source_length, num_beams=ns.num_beams,
        num_return_sequences=ns.num_return_sequences, max_new_tokens=ns.max_new_tokens,
        do_sample=ns.do_sample, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed,
        length_penalty=ns.length_penalty, no_repeat_ngram_size=ns.no_repeat_ngram_size,
        repetition_penalty=ns.repetition_penalty,
        batch_size=ns.batch_size if ns.batch_size or ns.max_tokens else 32, max_tokens=ns.max_tokens,
        chunk_size=ns.chunk_size, output_format=ns.format, select=ns.select,
        reference_column=ns.reference_column, filter_metric=ns.filter_metric, filter_min=ns.filter_min,
        dtype=ns.dtype, overwrite=ns.overwrite, progress=not ns.no_progress)
    from accelerate import PartialState  # already set up by generate_pseudo_targets

    if PartialState().is_main_process:
        print(json.dumps(report, indent=1, sort_keys=True))


# ---- study --------------------------------------------------------------------------------------


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"student sizes are fractions like '0.25,0.5', got {text!r}") from e


def _add_study(sub):
    p = sub.add_parser(
        "study", help="run a whole distillation study (teacher, students, KD variants) and report it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or take) a teacher, distil students of one or more sizes with every KD variant, "
                    "evaluate all of them on the test set with quality, size and speed, and write "
                    "report.md, report.json and report.png into --output.  Seq2seq variants: baseline, word-kd, "
                    "seq-kd, seq-kd+word-kd, seq-inter (Kim & Rush 2016); classification: the DistilBERT path "
                    "(MLM-distil a layer-copied student, then fine-tune) against fine-tuning without KD.  Every "
                    "stage is cached under --output/stages: re-run the same command to resume; a changed "
                    "option recomputes only the stages that depend on it.",
        epilog="examples:\n"
               "  lmkd study --task translation --budget quick --output runs/demo     # the shipped en->fr corpus\n"
               "  lmkd study --task translation --train tr.jsonl --validation va.jsonl --test te.jsonl \\\n"
               "      --teacher Helsinki-NLP/opus-mt-en-de --student-sizes 0.25,0.5 --budget full --output runs/de\n"
               "  lmkd study --task summarization --train tr.jsonl --validation va.jsonl --test te.jsonl "
               "--output runs/sum\n"
               "  lmkd study --task classification --train tr.csv --validation va.csv --test te.csv "
               "--source-column sentence --output runs/cls\n"
               "Budgets: tiny (seconds, for tests), quick (about 15 min on 2 CPU cores), full (hours).")
    p.add_argument("--task", required=True, choices=["translation", "summarization", "classification"])
    p.add_argument("--train", help="training data (.jsonl[.gz], .json, .csv); default: the shipped en->fr corpus")
    p.add_argument("--validation", help="validation data, same format")
    p.add_argument("--test", help="test data the report is measured on, same format")
    p.add_argument("--source-column", help="input column (default: source / document / text by task)")
    p.add_argument("--target-column", help="target column (default: target / summary / label by task)")
    p.add_argument("--teacher", help="teacher checkpoint with its tokenizer (default: train one from scratch); "
                                     "for classification a pretrained masked-LM encoder")
    p.add_argument("--student-sizes", type=_fractions,
                   help="student sizes as fractions of the teacher: of its parameters for seq2seq (default 0.25), "
                        "of its layers for classification (default 0.5 = every other layer)")
    p.add_argument("--budget", default="quick", choices=["tiny", "quick", "full"],
                   help="how much to train and evaluate (default quick)")
    p.add_argument("--teacher-steps", type=int, help="override the budget's teacher training steps")
    p.add_argument("--student-steps", type=int, help="override the budget's steps per student")
    p.add_argument("--kd-alpha", type=float, default=0.5,
                   help="weight of word-level KD against the gold labels in the KD variants (default 0.5)")
    p.add_argument("--kd-temperature", type=float,
                   help="KD softmax temperature (default 1 for seq2seq as Kim & Rush, 2 for MLM as DistilBERT)")
    p.add_argument("--beams", type=int, help="beam size for the teacher's pseudo-targets and beam evaluation")
    p.add_argument("--seed", type=int, default=42, help="seed of every initialisation and data order")
    p.add_argument("--output", required=True, help="study directory (stages, report.md/json/png)")
    p.set_defaults(func=_run_study)


def _run_study(ns) -> None:
    from .study import StudyOptions, StudyStopped, run_study

    options = StudyOptions(
        task=ns.task, output=ns.output, train=ns.train, validation=ns.validation, test=ns.test,
        source_column=ns.source_column, target_column=ns.target_column, teacher=ns.teacher,
        student_sizes=ns.student_sizes, budget=ns.budget, teacher_steps=ns.teacher_steps,
        student_steps=ns.student_steps, kd_alpha=ns.kd_alpha, kd_temperature=ns.kd_temperature, beams=ns.beams,
        seed=ns.seed)
    try:
        run_study(options)
    except StudyStopped as e:  # the $LMKD_STUDY_STOP_AFTER test hook: behave like an interruption
        print(f"lmkd study: {e}; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from e


# ---- cache-logits -------------------------------------------------------------------------------


def _add_cache_logits(sub):
    p = sub.add_parser(
        "cache-logits", help="store the teacher's top-K log-probs per target token, for teacher-free KD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the teacher once over the training data and store, for every target position, its "
                    "top-K token ids and log-probs (plus the log of the remaining mass, one tail bucket) in "
                    "shards under --output. `lmkd distill ... --teacher_cache DIR` then trains with no teacher "
                    "in memory and no teacher forward. Interrupted runs resume: rerun the same command.",
        epilog="examples:\n"
               "  lmkd cache-logits --teacher runs/teacher --data train.jsonl --top-k 32 --output runs/cache\n"
               "  lmkd cache-logits --teacher runs/teacher --data train.jsonl --top-k 32 --tail-samples 32 "
               "--output runs/cache\n"
               "  lmkd cache-logits --teacher gpt2 --data corpus.jsonl --task causal-lm --top-k 64 "
               "--batch-size 32 --output runs/cache\n"
               "  lmkd distill config.yaml --teacher_cache runs/cache --kd_alpha 0.5\n"
               "Use the same --task, columns, max lengths and prefix for distill as here; the data must be the "
               "same file (the cache checks the tokens row by row). On disk: about 4*(K+M)+4 bytes per target "
               "token (ids uint16 when the vocabulary fits, log-probs float16).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (hub id or local dir with its tokenizer)")
    p.add_argument("--data", required=True, help="training data (.jsonl[.gz]/.json/.csv or a save_to_disk dir)")
    p.add_argument("--top-k", type=int, required=True, help="token ids kept per position (e.g. 32 or 64)")
    p.add_argument("--tail-samples", type=int, default=0,
                   help="also store M token ids per position drawn from the teacher's mass outside the top-K: "
                        "the forward-KL gradient is then unbiased (default 0: one tail bucket)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail samples (default 0)")
    p.add_argument("--output", required=True, help="cache directory to write (resumed when it exists)")
    p.add_argument("--task", default="translation", help="translation, summarization or causal-lm "
                                                         "(default: translation)")
    p.add_argument("--source-column", help="input column (default by task: source / document / text)")
    p.add_argument("--target-column", help="target column (default by task: target / summary)")
    p.add_argument("--source-prefix", default="", help="text put before every input, as for distill")
    p.add_argument("--max-source-length", type=int, default=128, help="as for distill (default 128)")
    p.add_argument("--max-target-length", type=int, default=128, help="as for distill (default 128)")
    p.add_argument("--max-samples", type=int, help="cache only the first N rows (use max_train_samples N "
                                                   "for distill)")
    p.add_argument("--batch-size", type=int, default=16, help="teacher batch size (default 16)")
    p.add_argument("--shard-rows", type=int, default=1024, help="data rows per shard file (default 1024)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored log-probs (default float16)")
    p.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the teacher runs in (default: as saved)")
    p.add_argument("--device", help="torch device for the teacher (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache in --output")
    p.set_defaults(func=_run_cache_logits)


def _run_cache_logits(ns) -> None:
    from .data import DataArguments
    from .logit_cache import cache_logits

    data_args = DataArguments(task=ns.task, train_file=ns.data, source_column=ns.source_column,
                              target_column=ns.target_column, source_prefix=ns.source_prefix,
                              max_source_length=ns.max_source_length, max_target_length=ns.max_target_length,
                              max_train_samples=ns.max_samples)
    summary = cache_logits(ns.teacher, data_args, ns.output, ns.top_k, batch_size=ns.batch_size,
                           shard_rows=ns.shard_rows, logprob_dtype=ns.dtype, teacher_dtype=ns.teacher_dtype,
                           device=ns.device, overwrite=ns.overwrite, tail_samples=ns.tail_samples, seed=ns.seed)
    print(json.dumps(summary, indent=1, sort_keys=True))


# ---- main ---------------------------------------------------------------------------------------

COMMANDS = [_add_make_student, _add_distill, _add_evaluate, _add_generate, _add_study, _add_cache_logits]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), like every other lmkd error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmkd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmkd: knowledge distillation for Hugging Face language models.",
        epilog="examples:\n  lmkd make-student --teacher my-teacher --output my-student\n"
               "  lmkd distill recipes/translation/marian_word_kd.yaml\n"
               "Each command has its own --help with examples.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    ns.debug = debug
    if ns.command is None:
        parser.print_help()
        return 2
    if rest and not getattr(ns, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ns.overrides = rest
    # transformers' per-tensor "Loading weights" bars are noise around lmkd's own progress and errors
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO if not os.environ.get("LMKD_QUIET") else logging.WARNING,
                        format="%(message)s")
    try:
        ns.func(ns)
    except LmkdError as e:
        if ns.debug:
            raise
        print(f"lmkd {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmkd {ns.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lmkd study``'s options (the CLI flags, one to one), checked by :meth:`StudyOptions.resolve` into
the study's :class:`~lmkd.study.plan.Plan`; the shipped corpus a study runs on by default; what the
options make of the stages (their count, the seeds and the seeded stage names)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmkd.core.constants import DEFAULT_COLUMNS, EVAL_TASKS
from lmkd.core.errors import LmkdError
from lmkd.study.budgets import BUDGETS, DEFAULT_SEEDS
from lmkd.study.plan import (
    LOGIT_CACHE_STAGES,
    SEQ2SEQ_VARIANTS,
    Plan,
    classification_variants,
    engine_installed,
)

#: the tasks ``lmkd study`` runs: those ``lmkd evaluate`` scores with a quality metric, and causal-lm
#: (prompt/response rows, lmkd.study.causal_lm_study)
STUDY_TASKS = (*EVAL_TASKS, "causal-lm")
#: the study's default columns per task (causal-lm: prompt and response, lmkd.study.causal_lm)
STUDY_COLUMNS = {**DEFAULT_COLUMNS, "causal-lm": ("prompt", "completion")}


@dataclass
class StudyOptions:
    """Everything ``lmkd study`` takes (the CLI flags, one to one).

    Args:
        task: the study task (translation, summarization, classification).
        output: the output directory.
        **flags: the other fields, one per flag of ``lmkd study`` (``--help``); the comments below say
            what the less obvious ones do.
    """

    task: str
    output: str
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    teacher: str | None = None
    student_sizes: list[float] | None = None
    budget: str = "quick"
    teacher_steps: int | None = None
    student_steps: int | None = None
    #: a teacher trained here trains exactly ``teacher_steps`` steps instead of to its validation plateau
    #: (lmkd.study.stopping.StoppingRule.for_teacher)
    fixed_teacher_steps: bool = False
    kd_alpha: float = 0.5
    kd_temperature: float | None = None
    beams: int | None = None
    seed: int = 42
    #: check that the teacher has learned before any student is compared with it (lmkd.study.checks)
    teacher_check: bool = True
    #: every student variant is trained with seeds seed, seed+1, ..., seed+seeds-1 (None: the budget's,
    #: lmkd.study.budgets.DEFAULT_SEEDS)
    seeds: int | None = None
    #: export the best student for serving and report it as one more model (lmkd.study.serving)
    serve: bool = True
    #: the Word-KD variants run the teacher at every step instead of reading its logit cache (LOGIT_CACHE)
    online_kd: bool = False
    #: students and evaluations run this many at a time, each in a process of its own (None: the budget's
    #: ``workers``, at most the number of cores)
    jobs: int | None = None
    #: seq2seq: the teacher (trained from scratch) trains on this seeded fraction of the training rows only;
    #: the students learn from all of them, so on the rest the teacher's outputs are real predictions
    teacher_split: float | None = None
    #: seq2seq: source-only rows added to every KD variant's transfer set (lmkd.study.seq2seq)
    unlabelled: str | None = None
    #: causal-lm: text put before every prompt, on a line of its own (None: the prompt as it is)
    instruction: str | None = None
    #: filled in by resolve(): the study's plan (the budget's table with the overrides applied)
    plan: Plan | None = None

    def resolve(self) -> StudyOptions:
        """Check the options (one-line :class:`~lmkd.core.errors.LmkdError` for each mistake) and fill in
        the defaults and :attr:`plan`; returns ``self``.

        Returns:
            ``self``, its :attr:`plan` built (:meth:`Plan.for_study`).
        """
        if self.task not in STUDY_TASKS:
            raise LmkdError(f"unknown task {self.task!r}; choose one of {', '.join(STUDY_TASKS)}")
        if self.budget not in BUDGETS:
            raise LmkdError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if not 0 < self.kd_alpha <= 1:
            raise LmkdError(
                f"--kd-alpha must be in (0, 1], got {self.kd_alpha}; it weights word-level KD "
                "against the gold labels in the Word-KD variants"
            )
        if self.seeds is None:
            self.seeds = DEFAULT_SEEDS[self.budget]
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise LmkdError(
                f"--seeds must be a whole number >= 1, got {self.seeds!r}; each student variant "
                "is trained with that many seeds"
            )
        if self.kd_temperature is not None and not self.kd_temperature > 0:
            raise LmkdError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        default_cols = STUDY_COLUMNS[self.task]
        self.source_column = self.source_column or default_cols[0]
        self.target_column = self.target_column or default_cols[1]
        if self.train is None and self.validation is None and self.test is None:
            if (self.source_column, self.target_column) != default_cols:
                raise LmkdError(
                    f"--train, --validation and --test are needed (the shipped {self.task} corpus has "
                    f"the columns {default_cols[0]}/{default_cols[1]})"
                )
            self.train, self.validation, self.test = (
                shipped_corpus(s, self.task) for s in ("train", "validation", "test")
            )
        missing = [n for n in ("train", "validation", "test") if getattr(self, n) is None]
        if missing:
            raise LmkdError(
                f"--{missing[0]} is missing; give all of --train, --validation and --test "
                f"(or none of them for the shipped {self.task} corpus)"
            )
        for name in ("train", "validation", "test"):  # fail before the output dir is made
            path = getattr(self, name)
            if not os.path.exists(path):
                raise LmkdError(f"--{name} file {path} does not exist; check the path")
        if self.teacher is not None:
            from lmkd.models.loading import check_model_path

            check_model_path(self.teacher)
        if self.student_sizes is None:
            self.student_sizes = [0.5] if self.task == "classification" else [0.25]
        for s in self.student_sizes:
            if not 0 < s < 1:
                raise LmkdError(
                    f"--student-sizes takes fractions of the teacher in (0, 1), got {s}"
                )
        for key in ("teacher_steps", "student_steps", "beams"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise LmkdError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        self._check_transfer_options()
        given_seq2seq = self.teacher is not None and self.task != "classification"
        if self.fixed_teacher_steps and (given_seq2seq or self.task == "causal-lm"):
            raise LmkdError(
                "--fixed-teacher-steps is for a teacher the study trains (translation, summarization; "
                "classification: the teacher's fine-tuning); "
                + (
                    "--teacher is trained already -- drop one"
                    if given_seq2seq
                    else "the causal-lm study's teacher always trains --teacher-steps steps"
                )
            )
        if self.jobs is not None and (
            isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1
        ):
            raise LmkdError(
                f"--jobs must be a whole number >= 1, got {self.jobs!r}; it is how many students train "
                "at a time"
            )
        self.plan = Plan.for_study(
            self.budget,
            self.task,
            teacher_steps=self.teacher_steps,
            student_steps=self.student_steps,
            beams=self.beams,
            jobs=self.jobs,
            kd_alpha=self.kd_alpha,
            kd_temperature=self.kd_temperature,
            online_kd=self.online_kd,
        )
        return self

    def _check_transfer_options(self) -> None:
        """One-line errors for ``--teacher-split`` and ``--unlabelled`` (seq2seq only; the split needs a
        teacher trained here, whose training rows the study chooses)."""
        if self.task == "causal-lm":
            for flag, value in (
                ("--teacher-split", self.teacher_split),
                ("--unlabelled", self.unlabelled),
            ):
                if value is not None:
                    raise LmkdError(f"{flag} is for the seq2seq tasks (translation, summarization)")
        if self.teacher_split is not None:
            if self.task == "classification":
                raise LmkdError(
                    "--teacher-split is for the seq2seq tasks (translation, summarization)"
                )
            if self.teacher is not None:
                raise LmkdError(
                    "--teacher-split trains the teacher on part of the training rows; with "
                    "--teacher the study does not know which rows the given teacher trained on "
                    "-- drop one"
                )
            if isinstance(self.teacher_split, bool) or not 0 < self.teacher_split < 1:
                raise LmkdError(
                    f"--teacher-split takes the teacher's share of the training rows in (0, 1), "
                    f"got {self.teacher_split}"
                )
        if self.unlabelled is not None:
            if self.task == "classification":
                raise LmkdError(
                    "--unlabelled is for the seq2seq tasks (translation, summarization)"
                )
            if not os.path.exists(self.unlabelled):
                raise LmkdError(
                    f"--unlabelled file {self.unlabelled} does not exist; check the path"
                )


#: the shipped DDTP corpus of each study task (lmkd/corpora; README "Data"): English->French package
#: synopses; French long descriptions -> their synopsis; French descriptions -> archive section
SHIPPED_CORPORA = {
    "translation": "ddtp_en_fr",
    "summarization": "ddtp_fr_summ",
    "classification": "ddtp_fr_section",
    # chat conversations (messages rows) made from the descriptions and synopses: summarise a
    # description, write a description from a synopsis (docs/chat-data.md)
    "causal-lm": "ddtp_fr_chat",
}


def shipped_corpus(split: str, task: str = "translation") -> str:
    """Path of the shipped DDTP corpus file of ``split`` for ``task`` (default: the en->fr pairs).

    Args:
        split: train, validation or test.
        task: the study task.

    Returns:
        The file's path.
    """
    from importlib.resources import files

    return str(files("lmkd") / "corpora" / f"{SHIPPED_CORPORA[task]}.{split}.jsonl.gz")


def count_stages(opts: StudyOptions, mlm_head: bool = True) -> int:
    """How many stages the study of (resolved) ``opts`` runs, for its ``[i/N]`` progress lines;
    ``mlm_head``: whether the classification teacher has one (else the MLM-distil variants are skipped).

    Args:
        opts: the resolved options.
        mlm_head: whether the classification teacher has MLM head weights.

    Returns:
        The number of stages.
    """
    n_sizes, n_seeds = len(opts.student_sizes), opts.seeds
    given = opts.teacher is not None
    if opts.task == "classification":
        pre = 3 + (0 if given else 1) + 1 + 2  # data x3, tokenizer, lengths, teacher-mlm, teacher
        variants = classification_variants(mlm_head)
        # per size: one init; per seed: an MLM-distil stage (when there is a head) and every variant
        per_size = 1 + n_seeds * ((1 if mlm_head else 0) + len(variants))
    else:
        # data x3, tokenizer, lengths, teacher, teacher-check (a given teacher's; a trained one is checked
        # in its own stage), transfer-rows, transfer
        pre = 3 + (0 if given else 1) + 1 + 1 + (1 if given else 0) + 2
        # teacher-rows (--teacher-split), data-unlabelled (--unlabelled)
        pre += (opts.teacher_split is not None) + (opts.unlabelled is not None)
        pre += len(LOGIT_CACHE_STAGES) if opts.plan.logit_cache else 0
        variants = SEQ2SEQ_VARIANTS
        per_size = n_seeds * (1 + len(variants))  # per seed: the init and every variant
    models = 1 + len(variants) * n_sizes * n_seeds
    served = (
        2 if opts.serve and engine_installed(opts.task) else 0
    )  # the export of the best student and its eval
    return pre + per_size * n_sizes + models + served + 2  # evals, speed, report


def student_seeds(opts: StudyOptions) -> list[int]:
    """The seeds every student variant is trained with: ``seed, seed+1, ..., seed+seeds-1``.

    Args:
        opts: the study's options.

    Returns:
        The seeds.
    """
    return [opts.seed + k for k in range(opts.seeds)]


def seeded(name: str, opts: StudyOptions, seed: int) -> str:
    """The stage name of ``name`` trained with ``seed``: ``name`` for the first seed (the stage
    names of a one-seed study), ``name-seed{seed}`` for the others.

    Args:
        name: the stage name of the first seed.
        opts: the study's options.
        seed: the seed.

    Returns:
        The stage name.
    """
    return name if seed == opts.seed else f"{name}-seed{seed}"

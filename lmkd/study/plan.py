"""What a study runs: the budgets, the options (the CLI flags, checked and resolved into a plan),
the shipped corpus, the variants and the number of stages."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

from lmkd.core.constants import CLASSIFICATION, DEFAULT_COLUMNS, EVAL_TASKS, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError

#: the architecture of a seq2seq teacher trained from scratch (lmkd.models.scratch.model_config): BART with pre-LN
#: layers.  Post-LN BART at lr 1e-3 collapsed (its encoder output one constant vector) on the 5k-row
#: subset of the shipped pairs and on the French descriptions, and was weak on the reversed (fr->en)
#: direction; a LayerNorm before each sub-layer is the standard cure for unstable from-scratch training.
SEQ2SEQ_TEACHER_ARCH = "mbart"
#: the seq2seq students of Kim & Rush (2016)'s table, one stage each per student size
SEQ2SEQ_VARIANTS = ("baseline", "word-kd", "seq-kd", "seq-kd+word-kd", "seq-inter")
#: the classification students: fine-tuning alone, task KD from the fine-tuned teacher's class
#: logits (Hinton et al., 2015), the DistilBERT path (MLM-distil, then fine-tune) and MLM-distil + task KD
CLS_VARIANTS = ("no-kd", "task-kd", "distilbert", "distilbert+task-kd")
#: the classification variants that start from an MLM-distilled student (they need a teacher MLM head)
MLM_VARIANTS = ("distilbert", "distilbert+task-kd")

#: how the seq2seq Word-KD variants get the teacher's distribution (unless --online-kd): cached once per
#: transfer set by ``lmkd cache-logits`` -- the top 32 log-probs of every target position plus 32 tokens
#: drawn from the rest, which keeps the forward-KL gradient unbiased (lmkd.teacher.logit_cache) -- instead of a
#: teacher forward at every step.  A quick-budget Word-KD step cost 2.5x a plain one online (0.26 s vs
#: 0.11 s on one core) and 1.05x from the cache; on the shipped pairs the cached students were no worse
#: than online ones (benchmarks/results/quality_cached_kd.txt: +0.2 BLEU over 3 seeds), and the study's
#: own comparison of the two is in the README.
KD_CACHE = {"top_k": 32, "tail_samples": 32}
#: the stages caching it (lmkd.study.seq2seq): on the validation rows, and on the transfer rows with each
#: target a Word-KD variant trains on -- the gold one (word-kd) and the teacher's (seq-kd+word-kd)
KD_CACHE_STAGES = {"validation": "kd-cache-validation", "target": "kd-cache-target", "teacher": "kd-cache-teacher"}

# What each budget trains and evaluates.  ``quick`` is aimed at `make demo` (<= 20 min on 2 CPU
# cores); ``tiny`` for tests (seconds); ``full`` for a real study.  Row limits of None = all rows.
# ``max_length`` caps the length the study sizes from the data (lmkd.study.lengths).
# Students (every variant the same rule, lmkd.study.models.StoppingRule): ``student_steps`` is a cap;
# the validation CE against the gold labels is measured every ``eval_every`` steps and a student stops
# after ``patience`` evaluations without an improvement of at least ``min_delta`` (nats), keeping its
# best evaluation's weights.
BUDGETS: dict[str, dict] = {
    "tiny": dict(
        train_rows=160, transfer_rows=64, validation_rows=32, test_rows=24, vocab_size=200,
        teacher=dict(d_model=32, layers=2, heads=2, ffn=64), teacher_steps=40, teacher_mlm_steps=30,
        student_steps=12, eval_every=4, patience=2, min_delta=0.0,
        batch_size=16, teacher_lr=3e-3, student_lr=3e-3, finetune_lr=3e-3, warmup_steps=4,
        beams=2, max_new_tokens=24, max_length=64, speed_examples=4, speed_repeats=1, dropout=0.0, workers=1,
    ),
    "quick": dict(
        train_rows=None, transfer_rows=4000, validation_rows=200, test_rows=300, vocab_size=4000,
        teacher=dict(d_model=256, layers=3, heads=4, ffn=1024), teacher_steps=1500, teacher_mlm_steps=1000,
        # The students' cap.  600 fixed steps stopped them on the steep part of their curve (README); at
        # 2,000 they reach the teacher.  What fits `make demo` (<= 20 min): the 600-step demo took
        # 13m23s, ~3.5 min of it the five students (a step ~0.05 s; measured here: a Word-KD step,
        # which also runs the teacher, costs 2.0x a plain one), so ~10 min are left for them and
        # their validation passes: 3 x 0.05 + 2 x 0.10 = 0.35 s per step of all five -> 1,500 steps
        # (~9 min) if none stopped early, plus ~15 validation passes each.  (Since then the Word-KD
        # variants read a teacher cache, KD_CACHE: 1.05x a plain step.)
        student_steps=1500, eval_every=100, patience=3, min_delta=0.01,
        # finetune_lr: training a classifier (the teacher's fine-tuning and every classification student);
        # measured on the shipped section corpus: fine-tuned at 1e-3 the teacher collapsed (accuracy 11.0,
        # below the most frequent label's 13.5), at 3e-4 it reached 58.0.
        batch_size=32, teacher_lr=1e-3, student_lr=1e-3, finetune_lr=3e-4, warmup_steps=300,
        # Long inputs (documents) cost per step in proportion to batch x length: the quick budget caps
        # them at 64 tokens (the first sentences of a description, which name what a package is) and
        # fits the batch to ``batch_tokens`` input tokens (32 x 32 = the batch the short translation rows
        # get), so a document step costs about what a sentence step does.  Measured on the shipped
        # French descriptions, one core: batch 32 at 256 tokens ~17 s a teacher step (7 hours for
        # 1,500 steps); batch 16 at 64 tokens ~0.45 s.
        beams=4, max_new_tokens=64, max_length=64, batch_tokens=1024,
        # speed: 8 test inputs per model and round (each also decoded to 64 forced tokens: 512 decoding steps
        # for ms/token), 3 rounds, the median reported; 16 inputs took 2m40s of a 24.6-minute demo
        speed_examples=8, speed_repeats=3,
        # No dropout for the short from-scratch runs: measured on a d_model-128 BART after 1,500 steps
        # on this corpus, dropout 0.1 left it ignoring the source (val loss 3.79 with the right
        # sources vs 3.82 with shuffled ones) while dropout 0 used it (2.77 vs 5.58).
        dropout=0.0,
        # Students and evaluations run two at a time, each in its own process on one thread: these small
        # models barely use a second thread (lmkd.study.stages.Stages.run_jobs).  --jobs overrides it.
        workers=2,
    ),
    "full": dict(
        train_rows=None, transfer_rows=None, validation_rows=1000, test_rows=None, vocab_size=8000,
        teacher=dict(d_model=512, layers=6, heads=8, ffn=2048), teacher_steps=20000, teacher_mlm_steps=20000,
        student_steps=10000, eval_every=500, patience=4, min_delta=0.005, batch_size=64, teacher_lr=5e-4, student_lr=1e-3, finetune_lr=1e-4,
        warmup_steps=1000,
        beams=5, max_new_tokens=128, max_length=512, batch_tokens=8192, speed_examples=32, speed_repeats=5,
        dropout=0.1, workers=2,
    ),
}


@dataclass
class StudyOptions:
    """Everything ``lmkd study`` takes (the CLI flags, one to one)."""

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
    kd_alpha: float = 0.5
    kd_temperature: float | None = None
    beams: int | None = None
    seed: int = 42
    #: check that the teacher has learned before any student is compared with it (lmkd.study.checks)
    teacher_check: bool = True
    #: every student variant is trained with seeds seed, seed+1, ..., seed+seeds-1
    seeds: int = 1
    #: export the best student for serving and report it as one more model (lmkd.study.serving)
    serve: bool = True
    #: the Word-KD variants run the teacher at every step instead of reading its cached log-probs (KD_CACHE)
    online_kd: bool = False
    #: students and evaluations run this many at a time, each in a process of its own (None: the budget's
    #: ``workers``, at most the number of cores)
    jobs: int | None = None
    # filled in by resolve(): the budget's table with the overrides applied
    plan: dict = field(default_factory=dict)

    def resolve(self) -> StudyOptions:
        """Check the options (one-line :class:`~lmkd.core.errors.LmkdError` for each mistake) and fill in
        the defaults and :attr:`plan`; returns ``self``."""
        if self.task not in EVAL_TASKS:
            raise LmkdError(f"unknown task {self.task!r}; choose one of {', '.join(EVAL_TASKS)}")
        if self.budget not in BUDGETS:
            raise LmkdError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if not 0 < self.kd_alpha <= 1:
            raise LmkdError(f"--kd-alpha must be in (0, 1], got {self.kd_alpha}; it weights word-level KD "
                            "against the gold labels in the Word-KD variants")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise LmkdError(f"--seeds must be a whole number >= 1, got {self.seeds!r}; each student variant "
                            "is trained with that many seeds")
        if self.kd_temperature is not None and not self.kd_temperature > 0:
            raise LmkdError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        default_cols = DEFAULT_COLUMNS[self.task]
        self.source_column = self.source_column or default_cols[0]
        self.target_column = self.target_column or default_cols[1]
        if self.train is None and self.validation is None and self.test is None:
            if (self.source_column, self.target_column) != default_cols:
                raise LmkdError(f"--train, --validation and --test are needed (the shipped {self.task} corpus has "
                                f"the columns {default_cols[0]}/{default_cols[1]})")
            self.train, self.validation, self.test = (shipped_corpus(s, self.task) for s in ("train", "validation", "test"))
        missing = [n for n in ("train", "validation", "test") if getattr(self, n) is None]
        if missing:
            raise LmkdError(f"--{missing[0]} is missing; give all of --train, --validation and --test "
                            f"(or none of them for the shipped {self.task} corpus)")
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
                raise LmkdError(f"--student-sizes takes fractions of the teacher in (0, 1), got {s}")
        plan = copy.deepcopy(BUDGETS[self.budget])
        for key in ("teacher_steps", "student_steps", "beams"):
            value = getattr(self, key)
            if value is not None:
                if value < 1:
                    raise LmkdError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
                plan[key] = value
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1):
            raise LmkdError(f"--jobs must be a whole number >= 1, got {self.jobs!r}; it is how many students train "
                            "at a time")
        plan["workers"] = self.jobs or max(1, min(plan.get("workers", 1), os.cpu_count() or 1))
        from lmkd.study.stages import threads_per_worker

        plan["threads_per_worker"] = threads_per_worker(plan["workers"])
        plan["kd_alpha"] = self.kd_alpha
        plan["kd_temperature"] = self.kd_temperature or (2.0 if self.task == "classification" else 1.0)
        # classification's task KD reads class logits, which lmkd cache-logits does not store: always online
        plan["kd_cache"] = None if self.online_kd or self.task == "classification" else dict(KD_CACHE)
        # the teacher check scores this many validation rows (all of them up to 200)
        plan.setdefault("check_rows", min(200, plan["validation_rows"] or 200))
        # sentences the report prints about what this study did differently and why (e.g. skipped variants)
        plan["notes"] = []
        self.plan = plan
        return self


#: the shipped DDTP corpus of each study task (lmkd/corpora; README "Data"): English->French package
#: synopses; French long descriptions -> their synopsis; French descriptions -> archive section
SHIPPED_CORPORA = {"translation": "ddtp_en_fr", "summarization": "ddtp_fr_summ", "classification": "ddtp_fr_section"}


def shipped_corpus(split: str, task: str = "translation") -> str:
    """Path of the shipped DDTP corpus file of ``split`` for ``task`` (default: the en->fr pairs)."""
    from importlib.resources import files

    return str(files("lmkd") / "corpora" / f"{SHIPPED_CORPORA[task]}.{split}.jsonl.gz")


#: the export the best student is served as, per model kind (lmkd.study.serving; ``lmkd compress``'s formats)
SERVE_FORMATS = {SEQ2SEQ: "ct2-int8", CLASSIFICATION: "onnx-int8"}
#: how the report names them
FORMAT_NAMES = {"ct2-int8": "CTranslate2 int8", "onnx-int8": "ONNX Runtime int8"}


def serve_format(task: str) -> str:
    return SERVE_FORMATS[TASK_KIND[task]]


def engine_installed(task: str) -> bool:
    """Whether the engine that serves ``task``'s models is importable (else the serving stage is skipped)."""
    import importlib.util

    from lmkd.models import engines

    packages = engines.PACKAGES.get(engines.engine_of(serve_format(task)), ())
    return all(importlib.util.find_spec(p) is not None for p in packages)


def count_stages(opts: StudyOptions, mlm_head: bool = True) -> int:
    """How many stages the study of (resolved) ``opts`` runs, for its ``[i/N]`` progress lines;
    ``mlm_head``: whether the classification teacher has one (else the MLM-distil variants are skipped)."""
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
        pre += len(KD_CACHE_STAGES) if opts.plan.get("kd_cache") else 0
        variants = SEQ2SEQ_VARIANTS
        per_size = n_seeds * (1 + len(variants))  # per seed: the init and every variant
    models = 1 + len(variants) * n_sizes * n_seeds
    served = 2 if opts.serve and engine_installed(opts.task) else 0  # the export of the best student and its eval
    return pre + per_size * n_sizes + models + served + 2  # evals, speed, report


def classification_variants(mlm_head: bool = True) -> tuple[str, ...]:
    """The classification variants a teacher allows: all of :data:`CLS_VARIANTS` with an MLM head,
    else those that need none."""
    return CLS_VARIANTS if mlm_head else tuple(v for v in CLS_VARIANTS if v not in MLM_VARIANTS)


def thread_options(plan: dict) -> dict:
    """What a student or evaluation stage's hash records of how it ran: the threads of each worker
    process when stages run side by side (a different thread count may change the last digits of
    a training), nothing when they run one at a time in the study's own process."""
    return {"threads": plan["threads_per_worker"]} if plan.get("workers", 1) > 1 else {}


def student_seeds(opts: StudyOptions) -> list[int]:
    """The seeds every student variant is trained with: ``seed, seed+1, ..., seed+seeds-1``."""
    return [opts.seed + k for k in range(opts.seeds)]


def seeded(name: str, opts: StudyOptions, seed: int) -> str:
    """The stage name of ``name`` trained with ``seed``: ``name`` for the first seed (the stage
    names of a one-seed study), ``name-seed{seed}`` for the others."""
    return name if seed == opts.seed else f"{name}-seed{seed}"


def size_name(fraction: float) -> str:
    """The stage-name prefix of a student size: 0.25 -> ``s025``."""
    return f"s{fraction:g}".replace(".", "")

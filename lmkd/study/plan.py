"""What a study runs: the plan its options resolve into (:class:`Plan`: the budget's table of
:mod:`lmkd.study.budgets` with the overrides of :class:`lmkd.study.options.StudyOptions`, and what the
study learns on the way), the variants, the logit cache, the serving formats and the number of stages."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from types import SimpleNamespace
from typing import Any, cast

from lmkd.core.constants import CLASSIFICATION, SEQ2SEQ, TASK_KIND
from lmkd.study.budgets import BUDGETS, TASK_BUDGETS

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

#: how the seq2seq Word-KD variants get the teacher's distribution (unless --online-kd): a logit cache made
#: once per transfer set by ``lmkd cache-logits`` -- the top 32 log-probs of every target position plus 32
#: tokens drawn from the rest, which keeps the forward-KL gradient unbiased (lmkd.teacher.logit_cache) --
#: instead of a teacher forward at every step.  A quick-budget Word-KD step cost 2.5x a plain one online
#: (0.26 s vs 0.11 s on one core) and 1.05x from the cache; on the shipped pairs the cached students were no
#: worse than online ones (benchmarks/results/quality_cached_kd.txt: +0.2 BLEU over 3 seeds), and the study's
#: own comparison of the two is in the README.
LOGIT_CACHE = {"top_k": 32, "tail_samples": 32}
#: the stages making the logit caches (lmkd.study.seq2seq): on the validation rows, and on the transfer rows
#: with each target a Word-KD variant trains on -- the gold one (word-kd) and the teacher's (seq-kd+word-kd).
#: (The stage names keep their old "kd-cache" spelling: a stage's name is part of the hashes built on it.)
LOGIT_CACHE_STAGES = {
    "validation": "kd-cache-validation",
    "target": "kd-cache-target",
    "teacher": "kd-cache-teacher",
}

#: the smallest batch the token budget may leave (:meth:`Plan.fit_batch`)
MIN_BATCH = 4


#: the metadata of a field a budget table may lack or the study sets on the way: None until then, and
#: absent from :meth:`Plan.to_dict` until set (report.json prints only what was set)
_LATER = {"omit_none": True}


@dataclass
class ServedModel:
    """The student exported for serving (:mod:`lmkd.study.serving`), as the report names it.

    Args:
        student: the stage name of the student exported.
        metric: the validation metric it was chosen by (its stopping rule's).
        validation_metric: its best value of that metric.
        format: the export format.
    """

    student: str  # the stage name of the student exported
    metric: str  # the validation metric it was chosen by (the students' stopping rule's)
    validation_metric: float  # its best value of that metric
    format: str  # the export: a key of FORMAT_NAMES


@dataclass(kw_only=True)
class Plan:
    """What a study runs: a budget's table (:data:`BUDGETS`) with the command's overrides, and what the
    study learns on the way (the lengths, the teacher's check, the served model).  Built in one place,
    :meth:`for_study` (from :meth:`StudyOptions.resolve`), and read by attribute; :meth:`to_dict` is the
    form report.json prints and a worker process receives (the field order is its key order).

    Attributes:
        One per field below (each described where it is declared), passed as keyword arguments
        only; the budget's fields are required, the others have defaults.
    """

    # ---- the budget's table, with --teacher-steps / --student-steps / --beams applied
    train_rows: int | None  # rows of the training split used (None: all)
    transfer_rows: int | None  # seq2seq: training rows in the students' transfer set (None: all)
    validation_rows: int | None  # rows of the validation split used (None: all)
    test_rows: int | None  # rows of the test split the report is measured on (None: all)
    vocab_size: int  # the vocabulary of a tokenizer trained from scratch
    teacher: dict[str, int]  # the from-scratch teacher's shape: d_model, layers, heads, ffn
    teacher_steps: (
        int  # steps of the seq2seq teacher's training, or of the classifier teacher's fine-tuning
    )
    teacher_mlm_steps: int  # classification: steps of the teacher's masked-LM pre-training
    student_steps: int  # every student's step cap (it stops earlier on its validation plateau)
    eval_every: int  # steps between two validation evaluations of a student
    patience: int  # evaluations in a row without improvement before a student stops
    min_delta: (
        float  # the validation-CE gain (nats) that counts as an improvement (MLM distillation)
    )
    # the validation task-metric gain (BLEU / ROUGE-L / accuracy points) that counts as an improvement
    metric_min_delta: float
    batch_size: int  # the training batch (fitted to batch_tokens once max_length is known)
    teacher_lr: float  # the learning rate of a teacher trained from scratch
    student_lr: float  # the learning rate of the seq2seq students and of MLM distillation
    finetune_lr: (
        float  # the learning rate of every classifier (the teacher's fine-tuning, the students)
    )
    warmup_steps: int  # warm-up steps of every training (at most a third of its steps)
    beams: int  # beam size of the transfer set and of the beam evaluation
    max_new_tokens: int  # the longest generation
    max_length: (
        int  # the longest input and target in tokens: the budget's cap, then sized from the data
    )
    # input tokens per step the batch is fitted to (None: not fitted)
    batch_tokens: int | None = field(default=None, metadata=_LATER)
    speed_examples: int  # test inputs per model and round of the speed stage
    speed_repeats: int  # rounds of the speed stage (the median is reported)
    dropout: float  # dropout of a teacher trained from scratch
    workers: int  # students and evaluations run this many at a time (--jobs; capped by the cores)
    # ---- resolved from the options
    threads_per_worker: int = 1  # torch threads of each worker process (when workers > 1)
    kd_alpha: float = 0.5  # the weight of the KD term in the KD variants (--kd-alpha)
    kd_temperature: float = 1.0  # the KD softmax temperature (--kd-temperature; task default)
    # the Word-KD variants' logit cache (LOGIT_CACHE); None: online (--online-kd, classification)
    logit_cache: dict[str, int] | None = field(default=None, metadata={"key": "kd_cache"})
    check_rows: int | None = (
        None  # validation rows the teacher check scores (None: all of them up to 200)
    )
    notes: list[str] = field(
        default_factory=list
    )  # sentences the report prints on what the study did, why
    # ---- set while the study runs
    # the budget's max_length: the cap of the length sized from the data
    max_length_cap: int | None = field(default=None, metadata=_LATER)
    # the position tables of the models built (lmkd.study.lengths)
    positions: int | None = field(default=None, metadata=_LATER)
    # the record of the length sizing (lmkd.study.lengths.size_lengths)
    length_sizing: dict | None = field(default=None, metadata=_LATER)
    # the budget's batch, before it was fitted to batch_tokens
    batch_size_cap: int | None = field(default=None, metadata=_LATER)
    teacher_check: dict | None = (
        None  # the teacher's check (teacher_check.json), once the teacher is ready
    )
    # the student exported for serving, once exported
    served: ServedModel | None = field(default=None, metadata=_LATER)

    def __post_init__(self) -> None:
        if self.check_rows is None:
            self.check_rows = min(200, self.validation_rows or 200)

    @classmethod
    def for_study(
        cls,
        budget: str,
        task: str,
        *,
        teacher_steps: int | None = None,
        student_steps: int | None = None,
        beams: int | None = None,
        jobs: int | None = None,
        kd_alpha: float = 0.5,
        kd_temperature: float | None = None,
        online_kd: bool = False,
    ) -> Plan:
        """The plan of checked options (:meth:`lmkd.study.options.StudyOptions.resolve`): the budget's table,
        the overrides, the workers and the KD settings.

        Args:
            budget: a key of :data:`BUDGETS`.
            task: the study task.
            teacher_steps: overrides the budget's (None: the budget's).
            student_steps: overrides the budget's student step cap.
            beams: overrides the budget's beam size.
            jobs: students and evaluations at a time (None: the budget's ``workers``, at most the cores).
            kd_alpha: the KD weight.
            kd_temperature: the KD temperature (None: 2 for classification, else 1).
            online_kd: the Word-KD variants run the teacher instead of reading a logit cache.

        Returns:
            The plan, with no notes yet.
        """
        from lmkd.study.stages import threads_per_worker

        table = copy.deepcopy(BUDGETS[budget])
        table.update(copy.deepcopy(TASK_BUDGETS.get(task, {}).get(budget, {})))
        overrides = {"teacher_steps": teacher_steps, "student_steps": student_steps, "beams": beams}
        for key, value in overrides.items():
            if value is not None:
                table[key] = value
        table["workers"] = jobs or max(1, min(table.get("workers", 1), os.cpu_count() or 1))
        cls_task = task == "classification"
        return cls(
            **table,
            threads_per_worker=threads_per_worker(table["workers"]),
            kd_alpha=kd_alpha,
            kd_temperature=kd_temperature or (2.0 if cls_task else 1.0),
            # classification's task KD reads class logits, which lmkd cache-logits does not store
            # (causal-lm: its KD variants run the teacher online)
            logit_cache=None if online_kd or cls_task or task == "causal-lm" else dict(LOGIT_CACHE),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Plan:
        """A plan from its :meth:`to_dict` form (report.json's ``plan``).

        Args:
            values: every budget field and any of the others, under their report.json keys.

        Returns:
            A new plan holding copies of the values.
        """
        attr = {f.metadata.get("key", f.name): f.name for f in fields(cls)}
        kwargs = {attr.get(k, k): copy.deepcopy(v) for k, v in values.items()}
        if isinstance(kwargs.get("served"), Mapping):
            kwargs["served"] = ServedModel(**kwargs["served"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The plan as report.json prints it, each field under its key, in field order; a field set on
        the way (:data:`_LATER`) only once it is set.

        Returns:
            A JSON-able dict (copies of the values).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            value = asdict(value) if is_dataclass(value) else copy.deepcopy(value)
            out[f.metadata.get("key", f.name)] = value
        return out

    def note(self, text: str) -> None:
        """Add a sentence the report prints among its notes.

        Args:
            text: the sentence.
        """
        self.notes.append(text)

    def length_cap(self) -> int:
        """The cap of the length sized from the data: the budget's ``max_length`` (kept in
        :attr:`max_length_cap`, so that it survives :meth:`apply_lengths`).

        Returns:
            The cap in tokens.
        """
        if self.max_length_cap is None:
            self.max_length_cap = self.max_length
        return self.max_length_cap

    def apply_lengths(self, sizing: dict) -> None:
        """Take the lengths sized from the data (:func:`lmkd.study.lengths.size_lengths`) and fit the batch.

        Args:
            sizing: the sizing record, with ``max_length`` and ``positions``.
        """
        self.max_length, self.positions = sizing["max_length"], sizing["positions"]
        self.length_sizing = sizing
        self.fit_batch()

    def fit_batch(self) -> None:
        """Fit :attr:`batch_size` to the :attr:`batch_tokens` budget of input tokens per step, now that
        :attr:`max_length` is known: ``min(batch_size, batch_tokens // max_length)``, at least
        :data:`MIN_BATCH` (the budget's batch is the base every time).  Short rows keep the budget's
        batch; long documents get a smaller one, and a note says so."""
        if not self.batch_tokens:
            return
        if self.batch_size_cap is None:
            self.batch_size_cap = self.batch_size
        base = self.batch_size_cap
        self.batch_size = max(MIN_BATCH, min(base, self.batch_tokens // self.max_length))
        if self.batch_size < base:
            self.note(
                f"Batch {self.batch_size} rather than {base}: inputs of up to {self.max_length} "
                f"tokens, and the budget's {self.batch_tokens} input tokens per step."
            )


def plan_view(plan: Plan | Mapping[str, Any]) -> Plan:
    """``plan`` to be read by attribute, whichever form it comes in: a :class:`Plan` as it is; a mapping
    (a worker's JSON, report.json's ``plan``, or a budget table with a few settings as the benchmarks
    build it) as a namespace of its keys, report.json's keys read as the fields they are.

    Args:
        plan: a plan, or a mapping of (some of) its report.json keys.

    Returns:
        ``plan`` itself, or a read-only view of the mapping's values.
    """
    if isinstance(plan, Plan):
        return plan
    attr = {f.metadata.get("key", f.name): f.name for f in fields(Plan)}
    return cast(Plan, SimpleNamespace(**{attr.get(k, k): v for k, v in plan.items()}))


#: the export the best student is served as, per model kind (lmkd.study.serving; ``lmkd compress``'s formats)
SERVE_FORMATS = {SEQ2SEQ: "ct2-int8", CLASSIFICATION: "onnx-int8"}
#: how the report names them
FORMAT_NAMES = {"ct2-int8": "CTranslate2 int8", "onnx-int8": "ONNX Runtime int8"}


def serve_format(task: str) -> str:
    """The export a study of ``task`` serves its best student as.

    Args:
        task: the study task.

    Returns:
        The export format of ``task``'s best student (:data:`SERVE_FORMATS`).
    """
    return SERVE_FORMATS[TASK_KIND[task]]


def engine_installed(task: str) -> bool:
    """Whether the engine that serves ``task``'s models is importable (else the serving stage is skipped).

    Args:
        task: the study task.

    Returns:
        Whether its serving engine's packages are installed.
    """
    import importlib.util

    from lmkd.models import engines

    packages = engines.PACKAGES.get(engines.engine_of(serve_format(task)), ())
    return all(importlib.util.find_spec(p) is not None for p in packages)


def classification_variants(mlm_head: bool = True) -> tuple[str, ...]:
    """The classification variants a teacher allows: all of :data:`CLS_VARIANTS` with an MLM head,
    else those that need none.

    Args:
        mlm_head: whether the teacher has MLM head weights.

    Returns:
        The variant names.
    """
    return CLS_VARIANTS if mlm_head else tuple(v for v in CLS_VARIANTS if v not in MLM_VARIANTS)


def thread_options(plan: Plan | Mapping[str, Any]) -> dict:
    """What a student or evaluation stage's hash records of how it ran: the threads of each worker
    process when stages run side by side (a different thread count may change the last digits of
    a training), nothing when they run one at a time in the study's own process.

    Args:
        plan: the study's plan (or a mapping of its keys: :func:`plan_view`; no ``workers``: one).

    Returns:
        ``{"threads": n}`` or ``{}``.
    """
    view = plan_view(plan)
    return {"threads": view.threads_per_worker} if getattr(view, "workers", 1) > 1 else {}


def size_name(fraction: float) -> str:
    """The stage-name prefix of a student size: 0.25 -> ``s025``.

    Args:
        fraction: the student's size, a fraction of the teacher.

    Returns:
        The prefix.
    """
    return f"s{fraction:g}".replace(".", "")

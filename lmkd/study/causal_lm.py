"""The causal-LM study's pieces: prompt/completion rows, their tokenisation with the loss on the
completion only, the student init (copied teacher layers) and every training (:func:`train_causal`,
one :class:`lmkd.DistillationTrainer` per variant, stopped on the validation ROUGE-L of its greedy
responses by the study's :class:`~lmkd.study.stopping.StoppingRule`).

The variants (:data:`CAUSAL_VARIANTS`) are settings of lmkd's own DistillationConfig
(:data:`VARIANT_SETTINGS`): no loss is written here.

The data and its prompt masking are :mod:`lmkd.study.causal_lm_data`'s.
"""

from __future__ import annotations

import os

from lmkd.core.constants import IGNORE_INDEX
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, read_rows
from lmkd.study.causal_lm_data import PadCollator, encode_rows, pad_id_of
from lmkd.study.plan import Plan, plan_view
from lmkd.study.stopping import TRAIN_LOG, PlateauStopping, StoppingRule

#: the students, each trained on the whole training set by the same stopping rule: supervised
#: fine-tuning on the gold responses (the baseline), Seq-KD (SFT on the teacher's responses), four
#: token-level divergences mixed with the gold CE, TAID, and on-policy KD (GKD)
CAUSAL_VARIANTS = ("sft", "seq-kd", "fkl", "rkl", "jsd", "skew-kl", "taid", "on-policy")
#: the DistillationConfig fields of each variant (besides kd_alpha and the teacher): lmkd's losses
#: (lmkd.losses) and its on-policy regime (lmkd.train.regimes.on_policy).  on-policy is GKD with
#: lambda 0.5 (half the batches are the student's own samples, scored by the teacher with JSD
#: beta 0.5; the others are the gold rows with CE + JSD), as Agarwal et al.'s best setting.
VARIANT_SETTINGS: dict[str, dict] = {
    "sft": {},
    "seq-kd": {},
    "fkl": {"kd_loss": "forward_kl"},
    "rkl": {"kd_loss": "reverse_kl"},
    "jsd": {"kd_loss": "jsd", "jsd_beta": 0.5},
    "skew-kl": {"kd_loss": "skew_kl", "skew_alpha": 0.1},
    "taid": {"kd_loss": "taid", "taid_t_start": 0.4, "taid_t_end": 1.0},
    "on-policy": {
        "kd_loss": "jsd",
        "jsd_beta": 0.5,
        "on_policy_fraction": 0.5,
        "on_policy_temperature": 1.0,
    },
}
#: the variants that train on the teacher's responses instead of the gold ones
TEACHER_TARGET_VARIANTS = ("seq-kd",)
#: the variants with no teacher in their loss
NO_TEACHER_VARIANTS = ("sft", "seq-kd")
#: the architecture of a causal teacher trained from scratch (lmkd.models.scratch.model_config)
CAUSAL_TEACHER_ARCH = "llama"


def causal_student_init(out: str, teacher_dir: str, fraction: float) -> None:
    """The student init: ``fraction`` of the teacher's layers (at least one, spread from the first to
    the last, as Shleifer & Rush; DistilGPT-2 kept every other) copied by make_student; ``init.json``
    says which layers and the share of the teacher's parameters.

    Args:
        out: the stage's directory.
        teacher_dir: the causal teacher.
        fraction: the share of its layers kept.

    Raises:
        LmkdError: a one-layer teacher (no smaller student of copied layers).
    """
    from lmkd.models.loading import load_model, load_tokenizer
    from lmkd.models.size import count_parameters
    from lmkd.models.student import make_student, spread_layers, stacks_of

    teacher = load_model(teacher_dir)
    field = stacks_of(teacher)["layers"][1]
    n = getattr(teacher.config, field)
    if n < 2:
        raise LmkdError(
            "the causal-LM study copies a fraction of the teacher's layers into its students; "
            f"this teacher has {n} layer -- give a deeper one"
        )
    keep = min(n - 1, max(1, round(fraction * n)))
    layers = spread_layers(n, keep)
    student = make_student(teacher, layers=layers)
    student.save_pretrained(out)
    load_tokenizer(teacher_dir).save_pretrained(out)
    atomic_write_json(
        os.path.join(out, "init.json"),
        {
            "init": "copied teacher layers",
            "layers": {"layers": layers},
            "asked": fraction,
            "teacher_layers": n,
            "parameters_vs_teacher": count_parameters(student) / count_parameters(teacher),
            "larger_than_asked": False,
        },
    )


def train_causal(
    out: str,
    init_dir: str,
    train_file: str,
    validation_file: str,
    plan: Plan | dict,
    *,
    variant: str,
    steps: int,
    lr: float,
    seed: int,
    teacher_dir: str | None = None,
    stopping: StoppingRule | dict | None = None,
) -> dict:
    """One training of the causal-LM study (the teacher's, as ``sft`` without stopping, or a student's):
    a :class:`lmkd.DistillationTrainer` (the on-policy regime's for ``on-policy``) on the
    :func:`encode_rows` of every training row, with the variant's :data:`VARIANT_SETTINGS`.  The
    optimiser settings are the seq2seq study's (:func:`lmkd.study.models.train_student`).

    Args:
        out: the output directory (the model, its tokenizer, ``train_log.json`` with ``stopping``).
        init_dir: the saved model it starts from.
        train_file: the training rows (``prompt``, ``completion``, and ``teacher`` for Seq-KD).
        validation_file: the validation rows (the stopping rule's).
        plan: the study's plan (or its dict): batch, warm-up, lengths, KD weight and temperature.
        variant: one of :data:`CAUSAL_VARIANTS`.
        steps: the step cap.
        lr: the learning rate.
        seed: the seed of the data order (and of the on-policy samples).
        teacher_dir: the teacher of the KD variants.
        stopping: the stopping rule (or its options); None: exactly ``steps`` steps.

    Returns:
        The training's metrics, and ``prompt_tokens_masked`` / ``completion_tokens``: the label
        positions set to ``IGNORE_INDEX`` and those trained on.
    """
    import datasets

    from lmkd.models.loading import load_model, load_tokenizer
    from lmkd.study.causal_lm_eval import ResponseScore
    from lmkd.study.models import training_settings
    from lmkd.train import regimes
    from lmkd.train.config import DistillationConfig

    if isinstance(stopping, dict):
        stopping = StoppingRule(**stopping)
    view = plan_view(plan)
    kd = variant not in NO_TEACHER_VARIANTS
    tok = load_tokenizer(init_dir)
    column = "teacher" if variant in TEACHER_TARGET_VARIANTS else "completion"
    examples = encode_rows(tok, read_rows(train_file), view.max_length, view.max_new_tokens, column)
    val_rows = read_rows(validation_file)
    settings = VARIANT_SETTINGS[variant]
    if "on_policy_fraction" in settings:
        settings = {**settings, "on_policy_max_new_tokens": view.max_new_tokens}
    args = DistillationConfig(
        **training_settings(out, view, steps, lr, seed, stopping),
        remove_unused_columns=False,
        kd_alpha=view.kd_alpha if kd else 0.0,
        kd_temperature=view.kd_temperature,
        teacher_model_name_or_path=teacher_dir if kd else None,
        disable_tqdm=True,
        **settings,
    )
    trainer_cls = regimes.trainer_class(args)
    collator = PadCollator(pad_id_of(tok))
    from lmkd.data.tokenizing import PROMPT_LENGTH

    if args.on_policy_fraction > 0:  # the prompt lengths reach the on-policy trainer
        collator = regimes.PromptLengthCollator(collator)
        train_set = datasets.Dataset.from_list(examples)
    else:
        train_set = datasets.Dataset.from_list(examples).remove_columns(PROMPT_LENGTH)
    val_set = None
    callbacks = []
    if stopping is not None:
        val = encode_rows(tok, val_rows, view.max_length, view.max_new_tokens)
        val_set = datasets.Dataset.from_list(val).remove_columns(PROMPT_LENGTH)
        callbacks = [
            ResponseScore(tok, val_rows, view.max_length, view.max_new_tokens),
            PlateauStopping(stopping),
        ]
    trainer = trainer_cls(
        model=load_model(init_dir),
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tok,
        data_collator=collator,
        callbacks=callbacks or None,
    )
    result = trainer.train()
    trainer.save_model(out)
    tok.save_pretrained(out)
    masked = sum(e["labels"].count(IGNORE_INDEX) for e in examples)
    metrics = {
        **result.metrics,
        "prompt_tokens_masked": masked,
        "completion_tokens": sum(len(e["labels"]) for e in examples) - masked,
    }
    atomic_write_json(os.path.join(out, "train_metrics.json"), metrics)
    if stopping is not None:
        atomic_write_json(os.path.join(out, TRAIN_LOG), callbacks[1].log())
    return metrics

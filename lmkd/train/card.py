"""What every saved student carries beside its weights: a model card and the settings that made it.

* :func:`run_settings` -- the keys of the three distill argument groups (model, data,
  :class:`~lmkd.train.config.DistillationConfig`) that differ from their defaults, as plain YAML values;
  ``lmkd distill lmkd_config.yaml`` accepts them and reproduces the run;
* :func:`model_card` -- ``README.md`` with the hub's YAML metadata (``library_name``, ``tags``,
  ``datasets``, ``base_model``, the evaluation metrics as ``model-index``) and a body saying the
  teacher, the method and its KD settings, the data, the steps and the exact command;
* :func:`write_card` -- both files into the student's directory;
* :func:`is_lmkd_card` -- whether a directory already holds lmkd's card (the trainer keeps it when
  ``push_to_hub`` would draft the Trainer's own).
"""

from __future__ import annotations

import dataclasses
import enum
import os

from lmkd.core.io import atomic_write_text
from lmkd.train.config import DistillationConfig

#: the files :func:`write_card` writes beside the student
CARD_NAME, SETTINGS_NAME = "README.md", "lmkd_config.yaml"
#: tags every lmkd student carries on the hub
TAGS = ("distillation", "lmkd")
#: the hub's pipeline tag of each data task
PIPELINE_TAG = {
    "translation": "translation",
    "summarization": "summarization",
    "classification": "text-classification",
    "causal-lm": "text-generation",
    "mlm": "fill-mask",
}
#: settings never written down: secrets (the card and its YAML go to the hub with push_to_hub)
#: what each run writes next to the student: its training (and evaluation) metrics
RESULTS_NAME = "distill_results.json"
SECRET_KEYS = ("hub_token", "push_to_hub_token")


def _plain(value):
    """A setting as a YAML scalar/list/mapping the distill parser reads back."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):  # e.g. a GenerationConfig object given from Python
        return _plain(value.to_dict())
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING  # a required field: always written


def run_settings(model_args, data_args, args: DistillationConfig) -> dict:
    """The keys of ``model_args``, ``data_args`` and ``args`` that differ from their defaults.

    A :class:`DistillationConfig` is compared with one built from defaults, so the values its
    ``__post_init__`` derives are not written twice.  Secrets are left out.

    Args:
        model_args: the run's :class:`lmkd.train.config.ModelArguments`.
        data_args: the run's :class:`lmkd.data.dataset.DataArguments`.
        args: the run's :class:`DistillationConfig`.

    Returns:
        key -> plain value, in the groups' field order (model, data, then the config).
    """
    try:  # the reference must not reset the process's accelerate state (a plain TrainingArguments does)
        reference = DistillationConfig(
            output_dir=args.output_dir,
            use_cpu=args.use_cpu,
            accelerator_config={"use_configured_state": True},
        )
    except ValueError:  # no state configured yet: nothing to reset
        reference = DistillationConfig(output_dir=args.output_dir, use_cpu=args.use_cpu)
    out: dict = {}
    for obj in (model_args, data_args, args):
        for f in dataclasses.fields(obj):
            if not f.init or f.name in SECRET_KEYS or f.name in out:
                continue
            value = _plain(getattr(obj, f.name))
            derived = obj is args and f.name not in (
                "output_dir",
                "use_cpu",
            )  # (those two the reference shares)
            if value == _plain(getattr(reference, f.name) if derived else _default(f)):
                continue
            out[f.name] = value
    return out


def _is_hub_id(name: str | None) -> bool:
    """A hub repo id (``org/name`` or ``name``), not a path on this disk."""
    return (
        bool(name)
        and not os.path.exists(name)
        and not name.startswith((".", "/", "~"))
        and name.count("/") <= 1
    )


def _served(args: DistillationConfig) -> str | None:
    """A served teacher (``teacher_server_url``) as the card names it; None without one."""
    if not args.teacher_server_url:
        return None
    return f"served at {args.teacher_server_url} ({args.teacher_server}, top-{args.teacher_top_k})"


def _method(args: DistillationConfig, teacher: str | None) -> list[str]:
    """Lines saying how the student learnt: the objective, its KD settings, the regime."""
    lines = []
    if args.kd_alpha > 0 and (teacher or args.logit_cache):
        loss = f"{args.kd_loss}" + (f" (beta {args.jsd_beta})" if args.kd_loss == "jsd" else "")
        lines.append(
            f"word-level KD: loss = {1 - args.kd_alpha:g} x CE + {args.kd_alpha:g} x {loss}, "
            f"temperature {args.kd_temperature:g}"
        )
    else:
        lines.append("cross-entropy on the labels alone (kd_alpha 0: no teacher signal)")
    for name in ("hidden", "attention", "relation"):
        weight = getattr(args, f"{name}_weight")
        if weight > 0:
            lines.append(
                f"{name} loss {getattr(args, f'{name}_loss')} x {weight:g}"
                + (f", layer map {args.layer_map}" if args.layer_map else "")
            )
    if args.logit_cache:
        lines.append(f"teacher logits read from the cache {args.logit_cache}")
    if args.teacher_weights:
        lines.append(f"teacher ensemble, weights {args.teacher_weights}")
    if args.cohort_size > 1:
        lines.append(f"co-distillation cohort of {args.cohort_size}")
    if args.rounds > 1:
        lines.append(
            f"born-again: {args.rounds} rounds, each student the next one's teacher (round-r/)"
        )
    if args.on_policy_fraction > 0:
        lines.append(
            f"on-policy KD on {args.on_policy_fraction:g} of the batches "
            f"(sampling temperature {args.on_policy_temperature:g})"
        )
    return lines


def _scores(metrics: dict) -> list[tuple[str, float]]:
    """(name, value) of the evaluation metrics (``eval_*``), timings left out."""
    return [
        (k[len("eval_") :], float(v))
        for k, v in sorted(metrics.items())
        if k.startswith("eval_")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not any(s in k for s in ("runtime", "per_second", "epoch"))
    ]


def _eval_results(metrics: dict, task: str, dataset: str):
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=PIPELINE_TAG[task],
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=k,
            metric_value=v,
            dataset_split="validation",
        )
        for k, v in _scores(metrics)
    ]


def model_card(
    model_args,
    data_args,
    args: DistillationConfig,
    metrics: dict,
    rows: dict | None = None,
    steps: int | None = None,
    command: str | None = None,
    teacher: str | None = None,
):
    """The model card of a student trained by ``lmkd distill``.

    Args:
        model_args: the run's :class:`lmkd.train.config.ModelArguments`.
        data_args: the run's :class:`lmkd.data.dataset.DataArguments`.
        args: the run's :class:`DistillationConfig`.
        metrics: the final validation metrics (the card's evaluation table).
        rows: rows read per split (``{"train": n, "validation": m}``).
        steps: optimizer steps taken.
        command: the command line that ran it (None: run from Python).
        teacher: what taught it when not ``args.teacher_model_name_or_path`` (e.g. "a model
            passed from Python").

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    teacher = teacher or args.teacher_model_name_or_path or _served(args)
    init = str(model_args.student_model_name_or_path)
    name = os.path.basename(os.path.normpath(args.output_dir)) or "student"
    dataset = getattr(data_args, "dataset_name", None)  # a hub dataset, when the data came from one
    evaluated = _eval_results(
        metrics, data_args.task, dataset or os.path.basename(data_args.validation_file or "")
    )
    data = ModelCardData(
        library_name="transformers",
        tags=list(TAGS) + [data_args.task],
        pipeline_tag=PIPELINE_TAG[data_args.task],
        datasets=[dataset] if dataset else None,
        base_model=init if _is_hub_id(init) else None,
        model_name=name if evaluated else None,
        eval_results=evaluated or None,
    )
    rows = rows or {}
    lines = [
        f"# {name}",
        "",
        f"A {data_args.task} student distilled with lmkd (knowledge distillation on the Hugging Face "
        "Trainer).",
        "",
        "## How it was made",
        "",
        f"- teacher: `{teacher}`" if teacher else "- teacher: none",
        f"- student initialised from: `{init}`",
        *[f"- method: {line}" for line in _method(args, teacher)],
        f"- training data: `{data_args.train_file}`"
        + (f", {rows['train']} rows" if "train" in rows else "")
        + (
            f" (+ unlabelled transfer set `{data_args.transfer_file}`)"
            if data_args.transfer_file
            else ""
        ),
    ]
    if data_args.validation_file:
        lines.append(
            f"- validation data: `{data_args.validation_file}`"
            + (f", {rows['validation']} rows" if "validation" in rows else "")
        )
    if steps is not None:
        lines.append(
            f"- optimizer steps: {steps} (learning rate {args.learning_rate:g}, batch "
            f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"accumulated, seed {args.seed})"
        )
    scores = _scores(metrics)
    if scores:
        lines += [
            "",
            "## Evaluation (validation data)",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {v:.4g} |" for k, v in scores],
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "The command that trained it:"
        if command
        else "It was trained from Python (lmkd.train.run.run_distill).",
        "",
    ]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Its settings are in `{SETTINGS_NAME}` beside this card; the same student again (same seed, "
        "same device):",
        "",
        "```",
        f"lmkd distill {SETTINGS_NAME} --output_dir NEW_DIR",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(
    output_dir: str, model_args, data_args, args: DistillationConfig, metrics: dict, **kwargs
) -> None:
    """Write :func:`model_card` as ``README.md`` and :func:`run_settings` as ``lmkd_config.yaml``
    into ``output_dir``.

    Args:
        output_dir: the student's directory.
        model_args: the run's :class:`lmkd.train.config.ModelArguments`.
        data_args: the run's :class:`lmkd.data.dataset.DataArguments`.
        args: the run's :class:`DistillationConfig`.
        metrics: the final validation metrics.
        **kwargs: go to :func:`model_card` (``rows``, ``steps``, ``command``, ``teacher``).
    """
    import yaml

    card = model_card(model_args, data_args, args, metrics, **kwargs)
    atomic_write_text(os.path.join(output_dir, CARD_NAME), str(card))
    header = (
        f"# lmkd distill {SETTINGS_NAME} --output_dir NEW_DIR   (the settings that trained the student "
        "in this directory; keys not listed have their defaults)\n"
    )
    settings = run_settings(model_args, data_args, args)
    atomic_write_text(
        os.path.join(output_dir, SETTINGS_NAME),
        header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True),
    )


def is_lmkd_card(output_dir: str) -> bool:
    """Whether ``output_dir/README.md`` is a card :func:`write_card` wrote (tagged ``lmkd``).

    Args:
        output_dir: the directory to look in.

    Returns:
        True for a card tagged ``lmkd``; False when there is none, it is not tagged, or the hub
        library cannot read it.
    """
    path = os.path.join(output_dir, CARD_NAME)
    if not os.path.isfile(path):
        return False
    from huggingface_hub import ModelCard

    try:
        return "lmkd" in (ModelCard.load(path).data.tags or [])
    except (ValueError, OSError):  # not a card the hub library reads: not ours
        return False

"""The study's serving stage: the best student exported for serving, measured like every other model.

A user's real question is the size, speed and quality of what they will *serve*.  After the students
are trained, the one with the best validation metric (what every student's early stopping measured --
never the test rows) is exported with :func:`lmkd.models.engines.export`, the export ``lmkd compress``
writes: CTranslate2 int8 for an encoder-decoder, ONNX Runtime int8 for a classifier.  The export is
then one more model of the study: its own eval stage (the same :func:`lmkd.evaluate.run.evaluate_models`
scoring), timed in the speed stage side by side with the teacher and the students, a row in the
report and a point on its plot, and a paired bootstrap against the student it came from.

When the engine is not installed (``pip install 'lmkd[deploy]'``) or cannot convert the architecture,
the stage is skipped and the report says why in a note.
"""

from __future__ import annotations

from lmkd.core.constants import TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.models import engines
from lmkd.models.loading import load_config
from lmkd.study.options import StudyOptions
from lmkd.study.plan import FORMAT_NAMES, ServedModel, serve_format
from lmkd.study.stages import Stages

#: the variant name of the served model's row
SERVED = "served"


def best_student(models: dict[str, dict], read_log) -> tuple[str, float, str] | None:
    """``(name, best value, metric)`` of the student with the best validation metric (its stopping
    rule's, in the rule's direction; ties: the first in model order), from each student's train log
    (``read_log(model) -> {"curve": [...], "metric", "greater_is_better"} | None``); None when no
    student has a validation curve.

    Args:
        models: ``{name: model entry}``.
        read_log: reads a model's train log.

    Returns:
        ``(name, value, metric)`` or None.
    """
    best: tuple[str, float, str] | None = None
    for name, m in models.items():
        if m["variant"] in ("teacher", SERVED):
            continue
        log = read_log(m) or {}
        values = [c["metric"] for c in log.get("curve") or [] if c.get("metric") is not None]
        if not values:
            continue
        sign = (
            -1.0 if log.get("greater_is_better") else 1.0
        )  # one rule for every student of a study
        value = min(values, key=lambda v: sign * v)
        if best is None or sign * value < sign * best[1]:
            best = (name, float(value), str(log.get("metric", "validation metric")))
    return best


def serve_stage(
    st: Stages, opts: StudyOptions, models: dict[str, dict], read_log
) -> dict[str, dict]:
    """Export the best student (see the module docstring); returns ``{"served": model}`` (a model entry
    like the students', with ``source`` and ``format``), or ``{}`` with a note in the plan when there is
    nothing to export or the engine cannot do it.

    Args:
        st: the study's stages.
        opts: the resolved options (the plan gets a note or :attr:`~lmkd.study.plan.Plan.served`).
        models: ``{name: model entry}``.
        read_log: reads a model's train log.

    Returns:
        ``{"served": model entry}`` or ``{}``.
    """
    if not opts.serve:
        return {}
    fmt = serve_format(opts.task)
    kind = TASK_KIND[opts.task]
    best = best_student(models, read_log)
    if best is None:
        opts.plan.note(
            "No served model: no student recorded a validation curve to pick the best by."
        )
        return {}
    name, value, metric = best
    src = models[name]
    try:
        engines.check_exportable(fmt, load_config(src["dir"]), kind)
    except LmkdError as e:
        opts.plan.note(f"No served model ({FORMAT_NAMES[fmt]}): {e}")
        return {}
    d = st.run(
        "serve",
        {"format": fmt, "student": name},
        [src["stage"]],
        lambda out: engines.export(src["dir"], out, fmt, kind),
        f"exporting the best student by {metric} ({name}, {value:.3f}) to {FORMAT_NAMES[fmt]} for serving",
    )
    opts.plan.served = ServedModel(student=name, metric=metric, validation_metric=value, format=fmt)
    return {
        SERVED: {
            "dir": d,
            "stage": "serve",
            "variant": SERVED,
            "size": src["size"],
            "seed": src.get("seed"),
            "source": name,
            "format": fmt,
        }
    }

"""The seq2seq study's student init: the largest student within a share of the teacher's parameters
(copied teacher layers when they fit, else the fewest that can be copied, else a fresh, narrower
model), saved once per size and seed and copied by every variant, and its shape as the report
names it.
"""

from __future__ import annotations

import os

from lmkd.core.io import atomic_write_json
from lmkd.study.models import save_model


def _fewest_copied_layers(teacher) -> dict[str, list[int]] | None:
    """The smallest student made of copied teacher layers: one encoder and one decoder layer (the
    first, :func:`~lmkd.models.student.spread_layers`); None for a model without both stacks."""
    from lmkd.models.student import spread_layers, stacks_of

    stacks = stacks_of(teacher)
    if set(stacks) != {"encoder", "decoder"}:
        return None
    config = teacher.config
    return {
        name: spread_layers(getattr(config, f) or config.num_layers, 1)
        for name, (_, f) in stacks.items()
    }


def student_init(
    teacher_dir: str, fraction: float, seed: int, out: str, copy_fewest: bool = False
) -> None:
    """The largest student within ``fraction`` of the teacher's parameters: copied teacher layers
    when they fit (shrink-and-fine-tune), else -- ``copy_fewest`` (a given, trained teacher) -- the
    fewest layers that can be copied (one encoder and one decoder layer: larger than asked), else a
    fresh, narrower model of the teacher's shape.  ``init.json`` says which, with the layers, the
    shape and the parameter share.

    Args:
        teacher_dir: the teacher.
        fraction: the asked share of the teacher's parameters.
        seed: the fresh model's seed.
        out: the stage's directory.
        copy_fewest: copy the fewest layers when none fit within ``fraction``.
    """
    import torch

    from lmkd.models.loading import AUTO_CLASS, load_model, load_tokenizer, model_kind
    from lmkd.models.size import count_parameters
    from lmkd.models.student import (
        copied_layers_within,
        make_student,
        scaled_student_config,
    )

    teacher = load_model(teacher_dir)
    copied = copied_layers_within(teacher, fraction)
    larger = False
    if copied is None and copy_fewest:
        copied = _fewest_copied_layers(teacher)
        larger = copied is not None
    if copied is not None:
        student = make_student(
            teacher, encoder_layers=copied["encoder"], decoder_layers=copied["decoder"]
        )
    else:
        torch.manual_seed(seed)
        student = AUTO_CLASS[model_kind(teacher)].from_config(
            scaled_student_config(teacher, fraction)
        )
    save_model(student, load_tokenizer(teacher_dir), out)
    share = count_parameters(student) / count_parameters(teacher)
    atomic_write_json(
        os.path.join(out, "init.json"),
        {
            "init": "copied teacher layers" if copied else "fresh",
            "layers": copied,
            "asked": fraction,
            "parameters_vs_teacher": share,
            "larger_than_asked": larger,
            "shape": init_shape(student.config),
        },
        indent=None,
    )


def init_shape(config) -> dict:
    """A seq2seq model's shape as the report names it: width and layers per stack.

    Args:
        config: the model's config (or its config.json as a dict).

    Returns:
        ``{"d_model", "encoder_layers", "decoder_layers"}`` (a missing field: None).
    """
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return {k: get(k) for k in ("d_model", "encoder_layers", "decoder_layers")}

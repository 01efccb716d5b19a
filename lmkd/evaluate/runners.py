"""What each model runs when ``lmkd evaluate`` times it: a function from inputs to predictions per
task, and one decoding exactly a fixed number of new tokens -- the runners
:func:`lmkd.scoring.timing.measure_speed` times (also :file:`eval/speed.py`'s).
"""

from __future__ import annotations

from lmkd.core.constants import LM_EVAL_TASKS
from lmkd.models import generation
from lmkd.models.truncation import fit_length


def runner_for(
    task: str,
    model,
    tokenizer,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    max_source_length: int = 512,
):
    """A function from a list of inputs to predictions, in one batch, no progress bar: what
    :func:`lmkd.scoring.timing.measure_speed` times.

    Args:
        task: the task name (an LM task runs a forward pass, classification classifies,
            others generate).
        model: the model.
        tokenizer: its tokenizer.
        num_beams: beams when generating.
        max_new_tokens: the most tokens generated per input.
        max_source_length: inputs are truncated to this many tokens (fitted to the model).

    Returns:
        The runner, a function of a list of input texts.
    """
    if task in LM_EVAL_TASKS:
        length = fit_length(max_source_length, model, tokenizer, "inputs")
        return lambda xs: model(
            **tokenizer(
                xs,
                padding=True,
                truncation=length is not None,
                max_length=length,
                return_tensors="pt",
            ).to(model.device)
        )
    if task == "classification":
        return lambda xs: generation.classify(
            model,
            tokenizer,
            xs,
            batch_size=max(len(xs), 1),
            max_source_length=max_source_length,
            progress=False,
        )
    return lambda xs: generation.generate_texts(
        model,
        tokenizer,
        xs,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=max(len(xs), 1),
        max_source_length=max_source_length,
        progress=False,
    )


def fixed_length_runner(model, tokenizer, new_tokens: int, max_source_length: int = 512):
    """A function from one input to the number of tokens decoded when exactly ``new_tokens`` are
    forced (greedy, batch 1): what :func:`lmkd.scoring.timing.measure_speed` times per token.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        new_tokens: the tokens decoded per input.
        max_source_length: inputs are truncated to this many tokens.

    Returns:
        The runner, a function of one input text.
    """
    return lambda x: generation.generate_fixed_length(
        model, tokenizer, x, new_tokens, max_source_length=max_source_length
    )

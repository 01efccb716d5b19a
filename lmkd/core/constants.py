"""Names every layer of lmkd shares: model kinds, tasks and their default columns, label padding.

The bottom layer (with :mod:`lmkd.core.errors` and :mod:`lmkd.core.io`): it imports nothing of lmkd, and
every other module takes these from here instead of keeping its own copy.
"""

from __future__ import annotations

#: the four model kinds lmkd distils (what ``lmkd.models.loading.model_kind`` returns)
SEQ2SEQ, CAUSAL, MLM, CLASSIFICATION = "seq2seq", "causal", "mlm", "classification"
MODEL_KINDS = (SEQ2SEQ, CAUSAL, MLM, CLASSIFICATION)

#: which model kind each data task trains
TASK_KIND = {
    "translation": SEQ2SEQ,
    "summarization": SEQ2SEQ,
    "causal-lm": CAUSAL,
    "mlm": MLM,
    "classification": CLASSIFICATION,
}
#: every data task (``DataArguments.task``)
TASKS = tuple(TASK_KIND)
#: the tasks scored with a quality metric (``lmkd evaluate``) and studied (``lmkd study``)
EVAL_TASKS = ("translation", "summarization", "classification")
#: the language-modelling tasks ``lmkd evaluate`` scores by perplexity and fidelity to a teacher
LM_EVAL_TASKS = ("causal-lm", "mlm")
#: the tasks ``lmkd compress`` scores: those with a quality metric, and causal-lm (perplexity)
COMPRESS_TASKS = EVAL_TASKS + ("causal-lm",)

#: (input column, label column) of each task's data files; every name is an option
DEFAULT_COLUMNS = {
    "translation": ("source", "target"),
    "summarization": ("document", "summary"),
    "classification": ("text", "label"),
    "mlm": ("text", None),
    "causal-lm": ("text", None),
}

#: label value of positions that count in no loss (the HF/PyTorch convention)
IGNORE_INDEX = -100

#: floating dtypes a model may be loaded in, by name
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: ``teacher_dtype`` / ``--dtype`` choices: ``auto`` is the student's (or the checkpoint's) dtype
AUTO_DTYPE_NAMES = ("auto", *DTYPE_NAMES)

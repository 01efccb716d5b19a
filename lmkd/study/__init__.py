"""``lmkd study``: one command runs a whole distillation study on the user's data and reports it.

Seq2seq (translation, summarization) -- Kim & Rush (2016)'s table:

    data -> tokenizer -> teacher -> transfer set (teacher beam outputs + n-best)
         -> student init (one per size and seed, saved once, copied by every variant)
         -> the logit caches (teacher log-probs) of the validation rows and Word-KD targets (unless --online-kd)
         -> baseline | word-kd | seq-kd | seq-kd+word-kd | seq-inter   (one stage each, per seed)
            and the eval of every model (greedy and beam), each as soon as its model is ready
         -> the best student exported for serving, its eval -> speed (all models, interleaved) -> report

Classification -- fine-tuning alone, task KD (the teacher's class logits), the DistilBERT path and
MLM-distil + task KD:

    data -> tokenizer -> teacher-mlm -> teacher (classifier) -> student init (every other layer)
         -> fine-tuned (no-kd) | fine-tuned with task KD (task-kd)
         -> MLM-distilled from teacher-mlm -> fine-tuned (distilbert) | with task KD (distilbert+task-kd)
            and the eval of every model, as soon as it is ready
         -> the best student exported for serving, its eval -> speed -> report

Causal LMs (``--task causal-lm``, :mod:`.causal_lm_study`) -- prompt/response rows, the loss on the
response only:

    data -> tokenizer -> teacher (Llama-style, or --teacher) + its check -> transfer set (Seq-KD)
         -> student init (copied teacher layers) -> sft | seq-kd | fkl | rkl | jsd | skew-kl | taid | on-policy
            and the eval of every model -> speed -> report

Every student learns from the whole training set and trains until the task metric of its greedy
outputs on the validation rows stops improving (BLEU / ROUGE-L / accuracy; early stopping with
patience, ``student_steps`` the cap; :class:`~lmkd.study.stopping.StoppingRule`) and keeps its best
weights; its stage holds ``train_log.json`` (steps, stopped early or not, the validation curve).
``--seeds N`` trains every student variant with N seeds (default: the budget's); a verdict must
survive their spread.

Every stage lives in ``OUTPUT/stages/NAME`` (:mod:`.stages`): it is written to a temp dir and renamed into place
when it finishes, with a ``stage.json`` holding the hash of the options it depends on (its own
options plus the hashes of the stages it reads).  Re-running the same command skips every stage
whose hash matches, so an interrupted study resumes at its first unfinished stage and a changed
option recomputes only the stages that depend on it.  ``OUTPUT/study.log`` (JSON lines) records
every stage that ran, with its timing.

One trainer does every training: :class:`lmkd.DistillationTrainer` through ``run_distill``
(:func:`train_student`) with ``kd_alpha 0`` for plain training (teacher, baseline, seq-KD) and
``kd_alpha > 0`` for word-level KD.

The package: :mod:`.budgets` (what each budget runs), :mod:`.plan` (the options, the :class:`Plan` they
resolve into, the stage count), :mod:`.stages` (the cache and the job graph; jobs name their functions,
:class:`Job`), :mod:`.worker` (a job in a process of its own), :mod:`.splits` (data stages),
:mod:`.teachers` and :mod:`.checks` (the teacher and its check), :mod:`.seq2seq` and
:mod:`.classification` (the pipelines; the seq2seq one's :mod:`.transfer` set and
:mod:`.student_init`), :mod:`.models` (train, save, score, time), :mod:`.serving`,
:mod:`.results` (the report's figures), :mod:`.verdicts` (significance and the warnings),
:mod:`.report_writer` (report.md and report.png) and :mod:`.run` (:func:`run_study`); the causal-LM
study's :mod:`.causal_lm_data`, :mod:`.causal_lm` (inits, training), :mod:`.causal_lm_eval`,
:mod:`.causal_lm_report` and :mod:`.causal_lm_study` (its stages).
"""

from lmkd.study.models import evaluate_quality, measure_models_speed, train_student
from lmkd.study.options import StudyOptions, shipped_corpus
from lmkd.study.plan import BUDGETS, CLS_VARIANTS, SEQ2SEQ_VARIANTS, Plan
from lmkd.study.run import run_study
from lmkd.study.stages import Stages, StudyStopped
from lmkd.study.transfer import make_transfer_set

__all__ = [
    "BUDGETS",
    "CLS_VARIANTS",
    "SEQ2SEQ_VARIANTS",
    "Plan",
    "Stages",
    "StudyOptions",
    "StudyStopped",
    "evaluate_quality",
    "make_transfer_set",
    "measure_models_speed",
    "run_study",
    "shipped_corpus",
    "train_student",
]

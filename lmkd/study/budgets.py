"""The study's budgets: what each one trains and evaluates, and why (the measurements behind the numbers).
A budget's table is the base of a study's :class:`~lmkd.study.plan.Plan`."""

from __future__ import annotations

# What each budget trains and evaluates.  ``quick`` is `make demo`'s (about an hour on 2 CPU cores for a
# translation study, TRANSLATION_BUDGETS); ``tiny`` for tests (seconds); ``full`` for a real study.
# A task's changes to a budget are in TASK_BUDGETS.  Row limits of None = all rows.
# ``max_length`` caps the length the study sizes from the data (lmkd.study.lengths).
# Students (every variant the same rule, lmkd.study.stopping.StoppingRule): ``student_steps`` is a cap;
# the task metric of the student's greedy outputs on the validation rows (BLEU, ROUGE-L, accuracy) is
# measured every ``eval_every`` steps and a student stops after ``patience`` evaluations without an
# improvement of at least ``metric_min_delta`` points (MLM distillation: the gold CE, ``min_delta``
# nats), keeping its best evaluation's weights -- never before half ``student_steps``
# (lmkd.study.stopping.StoppingRule.min_steps).
# Every seq2seq student learns from the whole training set (``transfer_rows`` None), as Kim & Rush's did:
# the gold targets (baseline, Word-KD) or the teacher's outputs on every training row (Seq-KD).
BUDGETS: dict[str, dict] = {
    "tiny": dict(
        train_rows=160,
        transfer_rows=None,
        validation_rows=32,
        test_rows=24,
        vocab_size=200,
        teacher=dict(d_model=32, layers=2, heads=2, ffn=64),
        teacher_steps=40,
        teacher_mlm_steps=30,
        student_steps=12,
        eval_every=4,
        patience=2,
        min_delta=0.0,
        metric_min_delta=0.0,
        batch_size=16,
        teacher_lr=3e-3,
        student_lr=3e-3,
        finetune_lr=3e-3,
        warmup_steps=4,
        beams=2,
        max_new_tokens=24,
        max_length=64,
        speed_examples=4,
        speed_repeats=1,
        dropout=0.0,
        workers=1,
    ),
    "quick": dict(
        train_rows=None,
        transfer_rows=None,
        validation_rows=200,
        test_rows=300,
        vocab_size=4000,
        teacher=dict(d_model=256, layers=3, heads=4, ffn=1024),
        teacher_steps=1500,
        teacher_mlm_steps=1000,
        # The students' cap (summarisation, classification; translation: TRANSLATION_BUDGETS).  Sized in
        # an earlier round for a 20-minute demo; the translation students ran to it still improving.
        student_steps=1500,
        eval_every=100,
        patience=3,
        min_delta=0.01,
        metric_min_delta=0.1,
        # finetune_lr: training a classifier (the teacher's fine-tuning and every classification student);
        # measured on the shipped section corpus: fine-tuned at 1e-3 the teacher collapsed (accuracy 11.0,
        # below the most frequent label's 13.5), at 3e-4 it reached 58.0.
        batch_size=32,
        teacher_lr=1e-3,
        student_lr=1e-3,
        finetune_lr=3e-4,
        warmup_steps=300,
        # Long inputs (documents) cost per step in proportion to batch x length: the quick budget caps
        # them at 64 tokens (the first sentences of a description, which name what a package is) and
        # fits the batch to ``batch_tokens`` input tokens (32 x 32 = the batch the short translation rows
        # get), so a document step costs about what a sentence step does.  Measured on the shipped
        # French descriptions, one core: batch 32 at 256 tokens ~17 s a teacher step (7 hours for
        # 1,500 steps); batch 16 at 64 tokens ~0.45 s.
        beams=4,
        max_new_tokens=64,
        max_length=64,
        batch_tokens=1024,
        # speed: 8 test inputs per model and round (each also decoded to 64 forced tokens: 512 decoding steps
        # for ms/token), 3 rounds, the median reported; 16 inputs took 2m40s of a 24.6-minute demo
        speed_examples=8,
        speed_repeats=3,
        # No dropout for the short from-scratch runs: measured on a d_model-128 BART after 1,500 steps
        # on this corpus, dropout 0.1 left it ignoring the source (val loss 3.79 with the right
        # sources vs 3.82 with shuffled ones) while dropout 0 used it (2.77 vs 5.58).
        dropout=0.0,
        # Students and evaluations run two at a time, each in its own process on one thread: these small
        # models barely use a second thread (lmkd.study.stages.Stages.run_jobs).  --jobs overrides it.
        workers=2,
    ),
    "full": dict(
        train_rows=None,
        transfer_rows=None,
        validation_rows=1000,
        test_rows=None,
        vocab_size=8000,
        teacher=dict(d_model=512, layers=6, heads=8, ffn=2048),
        teacher_steps=20000,
        teacher_mlm_steps=20000,
        student_steps=10000,
        eval_every=500,
        patience=4,
        min_delta=0.005,
        metric_min_delta=0.1,
        batch_size=64,
        teacher_lr=5e-4,
        student_lr=1e-3,
        finetune_lr=1e-4,
        warmup_steps=1000,
        beams=5,
        max_new_tokens=128,
        max_length=512,
        batch_tokens=8192,
        speed_examples=32,
        speed_repeats=5,
        dropout=0.1,
        workers=2,
    ),
}

#: how many seeds each budget trains every student variant with (``--seeds`` overrides): a verdict must
#: survive the randomness of training (seed, data order), which one seed cannot measure -- the same demo on
#: two machines of the same kind moved Seq-Inter from "behind the baseline by 2.5 BLEU (p = 0.011)" to
#: "no different (p = 0.126)".  ``tiny`` (tests) trains one.
DEFAULT_SEEDS = {"tiny": 1, "quick": 2, "full": 3}

#: what a causal-lm study (lmkd.study.causal_lm_study) changes in each budget's table.  ``max_length`` is
#: the prompt's cut in tokens (the first tokens of the instruction and the description, as the seq2seq
#: quick budget cuts descriptions at 64), ``max_new_tokens`` the response's (EOS included) and the
#: longest generation; the teacher is a Llama-style decoder of ``teacher`` (layers: the students copy
#: ``--student-sizes`` of them, 0.25 -> 1 of 4).
CAUSAL_LM_BUDGETS: dict[str, dict] = {
    "tiny": dict(
        teacher=dict(d_model=32, layers=4, heads=2, ffn=64),
        teacher_steps=40,
        student_steps=8,
        eval_every=4,
        max_length=24,
        max_new_tokens=12,
    ),
    # Sized to ~30 min on 2 cores from per-step CPU times measured on the shipped descriptions (one core,
    # batch 16, prompt cut at 64 tokens + separator + synopsis: 79 tokens a row on average, p99 92;
    # synopses 14 tokens on average, p99 26 -> max_new_tokens 32): a teacher step (256-wide, 4 layers,
    # vocab 4000, 6.0M parameters) 0.72 s; a student step (1 copied layer, 3.0M) 0.28 s, 0.58 s with
    # the teacher's forward (the KD variants), on-policy ~0.65 s; greedy responses to 64 prompts 0.18 s
    # (student), 0.59 s (teacher), beam 4 on 32 prompts 1.45 s.  So: the teacher's 800 steps ~10 min;
    # Seq-KD's transfer set greedy (beams 1: 13,922 prompts ~2.2 min; beam 4 would take ~10 min) while
    # the gold-only students train; 8 variants x 2 seeds cost 2 x (2 x 0.28 + 5 x 0.58 + 0.65) = 8.2
    # core-s per step of all of them, 250 steps ~2,050 core-s + 5 validations each (200 prompts, ~1 s)
    # -> ~18 min on two workers; evaluations and the speed stage ~3 min.  Run end to end (2026-12-08,
    # docs/results.md "The causal-LM study"): 25 min 11 s on the shipped chat corpus (5,000 rows, the
    # teacher needed its second round), 13 min 19 s on the en->fr synopses as instructions (16,973 rows).
    "quick": dict(
        teacher=dict(d_model=256, layers=4, heads=4, ffn=1024),
        teacher_steps=800,
        student_steps=250,
        eval_every=50,
        max_length=64,
        max_new_tokens=32,
        batch_size=16,
        beams=1,
    ),
    "full": dict(
        teacher=dict(d_model=512, layers=8, heads=8, ffn=2048),
        max_length=256,
        max_new_tokens=64,
    ),
}

#: what a translation study changes in each budget's table: the caps of the teacher and the students.
#: Measured on the demo's corpus (2026-12-08, docs/results.md "Why Seq-KD trails here"): at the former
#: caps (1,500 steps for the teacher and the students) every student ran to its cap still improving, and a
#: 22% student trained to its plateau (stopped at 3,100 of a 4,500 cap) beat the 1,500-step teacher by
#: 4.8 BLEU beam; trained 4,500 steps the teacher scored 38.7 (was 27.8) and every student stopped by the
#: rule at 2,600-3,100 steps.  So the teacher trains to its own validation plateau
#: (lmkd.study.stopping.StoppingRule.for_teacher: never before half its cap) and the students' cap leaves
#: the rule room to stop them.  The caps were set from where the curves level off, not from any ordering
#: of the methods.  Cost on 2 cores: `make demo` took 65 min from a fresh clone (the teacher stopped at
#: 3,700 steps, the students at 2,500-3,600; docs/results.md).
TRANSLATION_BUDGETS: dict[str, dict] = {
    "quick": dict(teacher_steps=6000, student_steps=4500),
}

#: what a summarisation study changes: the from-scratch teacher's learning rate.  At 1e-3 (translation's)
#: round 1 collapsed -- its encoder output stopped depending on the source (the same cross-entropy with
#: shuffled sources), ROUGE-2 below copying the source -- on the shipped French descriptions and on both
#: corpora derived from them; at 3e-4 the same model from the same init used its sources and passed on all
#: three (benchmarks/summ_teacher_round1.py, benchmarks/results/summ_teacher_round1.txt; validation
#: ROUGE-2 vs 10.0 for copying: shipped 3.6 -> 11.6, rows 0:5000 2.4 -> 14.5, rows 7000: 1.4 -> 12.4).
SUMMARIZATION_BUDGETS: dict[str, dict] = {
    "quick": dict(teacher_lr=3e-4),
}

#: a task's changes to every budget's table (lmkd.study.plan.Plan.for_study)
TASK_BUDGETS: dict[str, dict[str, dict]] = {
    "causal-lm": CAUSAL_LM_BUDGETS,
    "translation": TRANSLATION_BUDGETS,
    "summarization": SUMMARIZATION_BUDGETS,
}

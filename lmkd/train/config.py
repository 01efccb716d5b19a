"""DistillationConfig: the Seq2SeqTrainingArguments of an ordinary HF run plus the KD fields.

Every check of the fields -- each on its own and across fields (which regimes, losses and teacher
signals go together) -- is made in ``DistillationConfig.__post_init__``, so a bad combination is
refused when the config is built, before any model loads; the checks that read several fields, and
:func:`lmkd.train.config_checks.parse_layer_map`, are in :mod:`lmkd.train.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments

from lmkd.core.constants import AUTO_DTYPE_NAMES
from lmkd.core.errors import LmkdError
from lmkd.losses import CROSS_KD_LOSSES, KD_LOSSES, PLAIN_KD_LOSSES
from lmkd.losses.feature import ATTENTION_LOSSES, HIDDEN_LOSSES
from lmkd.losses.relation import RELATION_LOSSES, RELATION_POOLINGS
from lmkd.train.config_checks import ConfigChecks, parse_chunk_size, parse_layer_map
from lmkd.train.processes import check_process_group, settle_processes

TEACHER_DTYPES = AUTO_DTYPE_NAMES
MLM_KD_POSITIONS = ("all", "masked")


@dataclass
class DistillationConfig(Seq2SeqTrainingArguments, ConfigChecks):
    """Training arguments for :class:`lmkd.DistillationTrainer`.

    Everything of ``Seq2SeqTrainingArguments`` (learning rate, batch size, bf16, ...) plus the
    knowledge-distillation fields below.  The loss per step is::

        (1 - kd_alpha) * CE(labels, student) / n_ce  +  kd_alpha * KD(teacher, student) / n_kd

    with ``n_ce``/``n_kd`` the number of positions each term is taken over in the whole
    (accumulated, all-process) batch.  ``eval_loss`` (what ``metric_for_best_model`` reads) is this
    same quantity on the validation data, the KD term from the online teacher or, with
    ``logit_cache``, from ``eval_logit_cache``; its parts are logged as ``eval_loss_ce`` and
    ``eval_loss_kd``.  Feature and relation terms are added on top, each with its
    own weight (0 = off): ``hidden_weight * hidden + attention_weight * attention +
    relation_weight * relation``, each averaged over the mapped layer pairs (see ``layer_map``)
    and over tokens (hidden, attention) or examples (relation) of the whole batch.

    Attributes:
        Every ``Seq2SeqTrainingArguments`` field, and the knowledge-distillation fields below, each
        described by its ``help`` metadata (``lmkd distill --help-keys`` prints them); all are
        keyword arguments, and ``__post_init__`` refuses a combination that cannot run
        (:class:`lmkd.core.errors.LmkdError`).
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher checkpoint (hub id or local dir). Not needed when a model object is "
            "passed to DistillationTrainer(teacher_model=...) or when kd_alpha is 0."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the frozen teacher runs in: auto (the student's), float32, bfloat16 or float16. "
            "A lower precision halves teacher memory; softmaxes stay in float32."
        },
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={
            "help": "Token-level divergence: forward_kl (Hinton), reverse_kl, jsd (generalized JSD, "
            "see jsd_beta), mse (logit matching), skew_kl / skew_reverse_kl (DistiLLM, see "
            "skew_alpha) or taid (TAID's interpolated target, see taid_t_start). The last three run "
            "on the plain loss only (kd_chunk_size auto or 0); with teacher_tokenizer uld or uld_hybrid. "
            "Example: --kd-loss skew_kl "
            "--skew-alpha 0.1"
        },
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Cross-tokenizer KD (causal LMs and seq2seq models): the teacher's tokenizer (a path) "
            "when it differs from the student's. Each batch's text (seq2seq: source and target) is "
            "re-tokenised for the teacher, positions are aligned by character offsets (lmkd.teacher.cross_tokenizer) "
            "and the KD term is kd_loss uld (sorted-probability L1, Boizard et al. 2024) or uld_hybrid "
            "(exact KL over shared token strings + ULD over the rest). "
            "Example: --teacher-tokenizer teachers/llama --kd-loss uld"
        },
    )
    kd_alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the KD term in [0, 1]; 1 - kd_alpha weights hard-label CE. "
            "0 = plain fine-tuning with no teacher forward (the baseline), 1 = KD only."
        },
    )
    kd_temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature tau > 0 for the KL losses; the KD term is scaled by tau^2 "
            "so its gradient keeps its size (Hinton). DistilBERT used 2."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "beta of the generalized JSD in [0, 1]: 0 = forward KL, 1 = reverse KL (TRL/GKD)."
        },
    )
    skew_alpha: float = field(
        default=0.1,
        metadata={
            "help": "kd_loss skew_kl / skew_reverse_kl: the mixing weight alpha in [0, 1) of DistiLLM: "
            "KL(p || a p + (1-a) q), KL(q || (1-a) p + a q) (p teacher, q student); 0 = the plain "
            "forward / reverse KL. DistiLLM used 0.1. Example: --skew-alpha 0.1"
        },
    )
    taid_t_start: float = field(
        default=0.4,
        metadata={
            "help": "kd_loss taid: the interpolation t at step 0 of the target softmax((1-t) sg(z_s) + t z_t); "
            "it moves to taid_t_end over max_steps (TAID used 0.4 -> 1). Example: --taid-t-start 0.4"
        },
    )
    taid_t_end: float = field(
        default=1.0,
        metadata={
            "help": "kd_loss taid: t at the last step (1 = the forward KL to the teacher). "
            "Example: --taid-t-end 1.0"
        },
    )
    taid_schedule: str = field(
        default="adaptive",
        metadata={
            "help": "kd_loss taid: linear (t from taid_t_start to taid_t_end in proportion to the step) or "
            "adaptive (TAID's: never behind linear, faster while the loss falls; see taid_alpha, "
            "taid_beta). Example: --taid-schedule linear"
        },
    )
    taid_alpha: float = field(
        default=5e-4,
        metadata={
            "help": "kd_loss taid, adaptive schedule: step size of t's growth (TAID: 5e-4). "
            "Example: --taid-alpha 5e-4"
        },
    )
    taid_beta: float = field(
        default=0.99,
        metadata={
            "help": "kd_loss taid, adaptive schedule: momentum of the loss's relative change (TAID: 0.99). "
            "Example: --taid-beta 0.99"
        },
    )
    mlm_kd_positions: str = field(
        default="all",
        metadata={
            "help": "Masked LM only: distil on all non-padding positions (all, as DistilBERT) or only "
            "on the masked ones (masked). CE is always on the masked positions."
        },
    )
    kd_chunk_size: str = field(
        default="auto",
        metadata={
            "help": "Which CE+KD loss: auto (default) = the plain loss on GPUs when both models' full logits "
            "fit comfortably in free memory, else the memory-lean chunked/fused loss "
            "(lmkd.losses.chunked; always on CPU, where it is measured faster), decided on the first "
            "batch and logged once; -1 = the chunked loss with an automatic chunk size (~1M logits "
            "per chunk on CPU, 8M on GPU); N > 0 = chunks of N positions; 0 = the plain loss. Same "
            "loss and gradients; on causal and seq2seq LMs with a plain linear head the chunked loss "
            "never materialises the student's logits. Example: --kd-chunk-size 0"
        },
    )
    logit_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory written by `lmkd cache-logits`: train from the teacher's cached top-K "
            "log-probs with no teacher loaded and no teacher forward (kd_loss forward_kl, "
            "reverse_kl or jsd). The training data must be the file the cache was made from."
        },
    )
    eval_logit_cache: str | None = field(
        default=None,
        metadata={
            "help": "With logit_cache and validation data: `lmkd cache-logits` of the validation file (same "
            "settings), so that eval_loss is the same CE+KD mix as with an online teacher."
        },
    )
    teacher_server_url: str | None = field(
        default=None,
        metadata={
            "help": "URL of a teacher server (lmkd serve-teacher, vLLM or SGLang; see "
            "docs/served-teacher.md) asked, for each batch, the teacher's top-k log-probs at every "
            "KD position: no teacher in this process, the loss of the logit cache's top-K path "
            "(with teacher_tokenizer: uld/uld_hybrid over the top-k rebuilt on the teacher's "
            "vocabulary, the tail spread evenly). "
            "Several, comma-separated: each row goes to the one its teacher_id column names "
            "(from 0). Example: --teacher-server-url http://gpu-box:8000"
        },
    )
    teacher_server: str = field(
        default="lmkd",
        metadata={
            "help": "The protocol of teacher_server_url: lmkd (lmkd serve-teacher), vllm (its "
            "OpenAI-compatible /v1/completions with prompt_logprobs) or sglang (/generate)."
        },
    )
    teacher_server_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds to wait for one answer of the teacher server; a timeout or dropped "
            "connection is retried with exponential back-off, then the run stops resumably."
        },
    )
    teacher_top_k: int = field(
        default=20,
        metadata={
            "help": "Log-probs asked per position from the teacher server (20: vLLM's default "
            "--max-logprobs cap; more needs that server flag raised)."
        },
    )
    teacher_logprob_dtype: str = field(
        default="float16",
        metadata={
            "help": "The precision of the served teacher's log-probs and tail: float16 (default, as "
            "`lmkd cache-logits` stores them), bfloat16, or float32 (exact). lmkd serve-teacher "
            "sends them in it (with ids as uint16 when the vocabulary fits: the cache's bytes); "
            "vLLM's and SGLang's JSON numbers are rounded to it on arrival."
        },
    )
    teacher_prefetch: int = field(
        default=2,
        metadata={
            "help": "Batches whose teacher answers are asked for ahead of need, while the current "
            "one trains (0: each batch waits for its answer)."
        },
    )
    hidden_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the hidden-state loss between mapped layers (0 = off). When the hidden "
            "sizes differ the student's states go through a learned linear projection (FitNets "
            "hint), trained with the student but not saved with it."
        },
    )
    hidden_loss: str = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss per token: mse (mean over features, Shleifer & Rush) or cosine "
            "(1 - cos, DistilBERT's alpha_cos)."
        },
    )
    attention_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the self-attention-map loss between mapped layers (0 = off). Switches "
            "both models to eager attention (the only kind that returns attention maps)."
        },
    )
    attention_loss: str = field(
        default="kl",
        metadata={
            "help": "Attention-map loss per query token: kl (KL(teacher || student) over keys, MiniLM) "
            "or mse (squared error summed over keys, TinyBERT). Heads are averaged when the "
            "head counts differ."
        },
    )
    relation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the relation loss on the mapped layers (0 = off); needs no projection "
            "since relations do not depend on the feature size."
        },
    )
    relation_loss: str = field(
        default="rkd",
        metadata={
            "help": "rkd (Relational KD: distances + 2 x angles, Park et al. 2019) or sp "
            "(Similarity-Preserving KD: row-normalised Gram matrices, Tung & Mori 2019)."
        },
    )
    relation_pooling: str = field(
        default="mean",
        metadata={
            "help": "Relations among examples, each the mean of its tokens (mean), or among the tokens "
            "of each sequence (token)."
        },
    )
    layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Which teacher layer each student layer is compared with: '0,2,4' (teacher layer "
            "per student layer), '0:1,2:5' (student:teacher pairs), '-1:-1' (last to last), "
            "'encoder=0,2;decoder=-1:-1' per stack. Default: the layers make-student copied "
            "(lmkd_layer_map in the student's config), else evenly spaced ending at the last. On the command "
            "line write --layer-map=-1:-1 (with '=') when the value starts with '-'."
        },
    )
    # ---- regimes beyond one fixed teacher (lmkd.train.regimes) ----
    teacher_weights: str | None = field(
        default=None,
        metadata={
            "help": "Teacher ensemble: with teacher_model_name_or_path a comma-separated list of teachers, "
            "their weights ('0.7,0.3'; default equal). KD targets the weighted average of their "
            "softened distributions."
        },
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Born-again self-distillation: train N students in turn from the same init, round r's "
            "student the teacher of round r+1 (output_dir/round-r; the last also in output_dir). "
            "1 = one ordinary run."
        },
    )
    cohort_size: int = field(
        default=1,
        metadata={
            "help": "Co-distillation (deep mutual learning): train K >= 2 students together, each with CE + "
            "KD towards the detached average of the others; no teacher (output_dir/member-k; member 0 "
            "also in output_dir). The members start from student_model_name_or_path: K checkpoints "
            "'a,b,c' (one per member), or one loaded K times (member k under seed + k for weights it "
            "lacks) that then diverge through dropout; a cohort that cannot differ (identical weights, "
            "no dropout) is refused. 1 = off."
        },
    )
    on_policy_fraction: float = field(
        default=0.0,
        metadata={
            "help": "On-policy KD (GKD) lambda in [0, 1]: share of batches (drawn from the seed and the "
            "batch's index: a resumed run draws the same) whose targets are the student's own samples, "
            "scored by the teacher with kd_loss jsd. 0 = off."
        },
    )
    on_policy_temperature: float = field(
        default=1.0,
        metadata={"help": "On-policy KD: sampling temperature of the student's generations."},
    )
    on_policy_max_new_tokens: int = field(
        default=64, metadata={"help": "On-policy KD: length limit of the student's generations."}
    )
    on_policy_prompt_tokens: int = field(
        default=16,
        metadata={
            "help": "On-policy KD, causal LMs: the student continues the first N tokens of each row (at "
            "most all but its last), unless the data name each row's prompt (prompt_column)."
        },
    )

    def __post_init__(self):
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise LmkdError(
                f"kd_alpha must be in [0, 1], got {self.kd_alpha}; it weights KD against CE"
            )
        if not self.kd_temperature > 0:
            raise LmkdError(
                f"kd_temperature must be > 0, got {self.kd_temperature}; 1 is the plain softmax, "
                "DistilBERT used 2"
            )
        if self.kd_loss not in KD_LOSSES + PLAIN_KD_LOSSES + CROSS_KD_LOSSES:
            raise LmkdError(
                f"unknown kd_loss {self.kd_loss!r}; choose one of "
                f"{', '.join(KD_LOSSES + PLAIN_KD_LOSSES + CROSS_KD_LOSSES)}"
            )
        self._check_cross_tokenizer()
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise LmkdError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise LmkdError(
                f"unknown teacher_dtype {self.teacher_dtype!r}; choose one of {', '.join(TEACHER_DTYPES)}"
            )
        if self.mlm_kd_positions not in MLM_KD_POSITIONS:
            raise LmkdError(
                f"unknown mlm_kd_positions {self.mlm_kd_positions!r}; choose all or masked"
            )
        self.kd_chunk_size = parse_chunk_size(self.kd_chunk_size)
        self._check_plain_losses()
        self._check_label_smoothing()
        self._check_served_teacher()
        if self.logit_cache is not None and self.kd_loss == "mse":
            raise LmkdError(
                "kd_loss mse needs the teacher's full logits, which a top-K logit_cache does not "
                "hold; use forward_kl, reverse_kl or jsd, or drop logit_cache"
            )
        if self.eval_logit_cache and not self.logit_cache:
            raise LmkdError(
                "eval_logit_cache goes with logit_cache (an online teacher scores the validation "
                "data itself); drop it or set logit_cache"
            )
        for name in ("hidden_weight", "attention_weight", "relation_weight"):
            if not getattr(self, name) >= 0:
                raise LmkdError(
                    f"{name} must be >= 0, got {getattr(self, name)}; 0 turns that loss off"
                )
        for name, choices in (
            ("hidden_loss", HIDDEN_LOSSES),
            ("attention_loss", ATTENTION_LOSSES),
            ("relation_loss", RELATION_LOSSES),
            ("relation_pooling", RELATION_POOLINGS),
        ):
            if getattr(self, name) not in choices:
                raise LmkdError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}"
                )
        if isinstance(self.layer_map, (list, tuple)):
            self.layer_map = ",".join(str(int(i)) for i in self.layer_map)
        if self.layer_map is not None:
            parse_layer_map(self.layer_map)
        if (
            self.relation_weight > 0
            and self.relation_pooling == "mean"
            and self.per_device_train_batch_size < 2
        ):
            raise LmkdError(
                "relation_pooling mean relates the examples of a batch, so it needs "
                "per_device_train_batch_size >= 2; raise it or use relation_pooling token"
            )
        self._check_regimes()
        self._check_sizes()
        self._check_optimisation()
        settle_processes(self)  # several processes launched: one process group, or one line
        self._check_precision()
        super().__post_init__()
        check_process_group(self)


@dataclass
class ModelArguments:
    """Which student to train (the teacher is a DistillationConfig field).

    Attributes:
        student_model_name_or_path: the student checkpoint (hub id or local dir), e.g. one
            written by ``lmkd make-student``.
        tokenizer_name: the tokenizer to use (None: the student's).
    """

    student_model_name_or_path: str = field(
        metadata={
            "help": "Student checkpoint (hub id or local dir), e.g. one written by `lmkd make-student`."
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the student's)."}
    )

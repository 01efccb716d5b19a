"""The checks of :class:`lmkd.train.config.DistillationConfig` that read more than one field, and
the parsing of its structured fields.

* :func:`parse_layer_map` -- ``layer_map`` -> the (student, teacher) layer pairs of each stack;
  :func:`parse_chunk_size` -- ``kd_chunk_size`` as given (YAML int, CLI string).
* :class:`ConfigChecks` -- the cross-field checks (cross-tokenizer KD, the plain-only losses, sizes,
  optimisation, precision, regimes, co-distillation) that ``DistillationConfig.__post_init__``
  runs, so a bad combination is refused when the config is built, before any model loads.
"""

from __future__ import annotations

from lmkd.core.errors import LmkdError
from lmkd.losses import CROSS_KD_LOSSES, PLAIN_KD_LOSSES, TOPK_KD_LOSSES
from lmkd.teacher.logit_cache import LOGPROB_DTYPES

#: the protocols a teacher server may speak (``teacher_server``)
TEACHER_SERVERS = ("lmkd", "vllm", "sglang")

LAYER_STACK_NAMES = ("layers", "encoder", "decoder")


def parse_layer_map(spec: str) -> dict[str, list[tuple[int, int]]]:
    """``DistillationConfig.layer_map`` -> ``{stack: [(student layer, teacher layer), ...]}``.

    ``"0,2,4"`` gives the teacher layer of student layers 0, 1, 2; ``"0:1,2:5"`` explicit
    ``student:teacher`` pairs (a subset of layers is fine); negative indices count from the last
    layer (``"-1:-1"``: last to last, DistilBERT's cosine loss).  ``"encoder=0,2;decoder=-1:-1"``
    maps the stacks of an encoder-decoder separately; without a name (key ``"*"``) the map applies
    to every stack.  Layers are transformer blocks counted from 0 (the embeddings are not one).

    Args:
        spec: the ``layer_map`` string.

    Returns:
        The (student layer, teacher layer) pairs of each stack (``"*"``: every stack).

    Raises:
        LmkdError: a spec that is not one of these forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LmkdError(f"layer_map must be a string like '0,2,4' or '0:0,1:2', got {spec!r}")
    out: dict[str, list[tuple[int, int]]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, sep, body = part.partition("=")
        name = name.strip() if sep else "*"
        body = body if sep else part
        if sep and name not in LAYER_STACK_NAMES:
            raise LmkdError(
                f"layer_map names an unknown layer stack {name!r}; use {', '.join(LAYER_STACK_NAMES)}"
            )
        if name in out:
            raise LmkdError(f"layer_map gives the {name!r} stack twice")
        items = [x.strip() for x in body.split(",") if x.strip()]
        if not items or (any(":" in x for x in items) and not all(":" in x for x in items)):
            raise LmkdError(
                f"layer_map {spec!r}: write either teacher layers per student layer ('0,2,4') or "
                "student:teacher pairs ('0:0,1:2'), not a mix"
            )
        try:
            if ":" in items[0]:
                pairs = [tuple(int(v) for v in x.split(":")) for x in items]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
            else:
                pairs = list(enumerate(int(x) for x in items))
        except ValueError:
            raise LmkdError(
                f"layer_map {spec!r} is not a list of integer layer indices like '0,2,4' or "
                "'0:0,1:2'"
            ) from None
        out[name] = pairs
    if not out:
        raise LmkdError(f"layer_map {spec!r} maps no layers")
    if "*" in out and len(out) > 1:
        raise LmkdError(f"layer_map {spec!r}: name every stack ('encoder=...;decoder=...') or none")
    return out


def parse_chunk_size(value) -> str | int:
    """``kd_chunk_size`` as given (YAML int, CLI string): "auto", or an int >= -1.

    Args:
        value: the field's value as given.

    Returns:
        ``"auto"`` or the number.

    Raises:
        LmkdError: anything else.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = None
    if size is None or size < -1 or isinstance(value, (bool, float)):
        raise LmkdError(
            f"kd_chunk_size must be auto, -1 (automatic chunk size), 0 (plain loss) or a number of "
            f"positions, got {value!r}"
        )
    return size


class ConfigChecks:
    """The cross-field checks of :class:`lmkd.train.config.DistillationConfig` (a base class of it:
    each method reads the config's fields).

    Attributes:
        None of its own: the checks read the fields of the :class:`DistillationConfig` they are
        part of, and raise :class:`lmkd.core.errors.LmkdError` for a combination that cannot run.
    """

    def _check_cross_tokenizer(self) -> None:
        if self.kd_loss in CROSS_KD_LOSSES and not self.teacher_tokenizer:
            raise LmkdError(
                f"kd_loss {self.kd_loss} is the cross-tokenizer loss: set teacher_tokenizer (the teacher's "
                "tokenizer path), or use forward_kl with a teacher of the student's tokenizer"
            )
        if self.teacher_tokenizer and self.kd_loss not in CROSS_KD_LOSSES:
            raise LmkdError(
                f"teacher_tokenizer is set, so teacher and student vocabularies differ: kd_loss "
                f"{self.kd_loss} needs one vocabulary; use kd_loss uld or uld_hybrid"
            )
        if self.teacher_tokenizer:
            other = [
                name
                for name, on in (
                    ("logit_cache", self.logit_cache),
                    ("on_policy_fraction", self.on_policy_fraction > 0),
                    ("cohort_size", self.cohort_size > 1),
                    ("teacher_weights", self.teacher_weights),
                    (
                        "hidden/attention/relation weights",
                        self.hidden_weight > 0
                        or self.attention_weight > 0
                        or self.relation_weight > 0,
                    ),
                )
                if on
            ]
            if other:
                raise LmkdError(
                    f"teacher_tokenizer (cross-tokenizer KD) does not combine with {other[0]}; drop one"
                )

    def _check_plain_losses(self) -> None:
        """skew_alpha and the TAID schedule, and the paths skew KL / TAID cannot take."""
        if not 0.0 <= self.skew_alpha < 1.0:
            raise LmkdError(
                f"skew_alpha must be in [0, 1), got {self.skew_alpha}; 0 is the plain KL, at 1 the "
                "skew KL is identically 0"
            )
        if not 0.0 <= self.taid_t_start <= self.taid_t_end <= 1.0:
            raise LmkdError(
                f"TAID needs 0 <= taid_t_start <= taid_t_end <= 1, got {self.taid_t_start} and "
                f"{self.taid_t_end}"
            )
        if self.taid_schedule not in ("linear", "adaptive"):
            raise LmkdError(
                f"unknown taid_schedule {self.taid_schedule!r}; choose linear or adaptive"
            )
        if not (0.0 <= self.taid_alpha <= 1.0 and 0.0 <= self.taid_beta < 1.0):
            raise LmkdError(
                f"taid_alpha must be in [0, 1] and taid_beta in [0, 1), got {self.taid_alpha} and "
                f"{self.taid_beta}"
            )
        if self.kd_loss not in PLAIN_KD_LOSSES:
            return
        self._require_plain_loss(f"kd_loss {self.kd_loss} is computed")
        if self.logit_cache:
            raise LmkdError(
                f"kd_loss {self.kd_loss} needs the teacher's full logits, which a top-K logit_cache "
                "does not hold; use forward_kl, reverse_kl or jsd, or drop logit_cache"
            )

    def _check_label_smoothing(self) -> None:
        """label_smoothing_factor is applied to the CE term on the plain loss (full logits): the
        chunked and fused paths compute no smoothed CE, so they refuse it rather than ignore it."""
        if self.label_smoothing_factor:
            self._require_plain_loss(
                f"label_smoothing_factor {self.label_smoothing_factor} is applied"
            )

    def _require_plain_loss(self, what: str) -> None:
        """Refuse a chunked or fused ``kd_chunk_size`` for something only the plain loss computes.

        Args:
            what: the subject of the error line (e.g. ``"kd_loss taid is computed"``).
        """
        if self.kd_chunk_size not in ("auto", 0):
            raise LmkdError(
                f"{what} on the plain loss only: set kd_chunk_size: 0 (or auto), not "
                f"{self.kd_chunk_size}"
            )

    def _check_served_teacher(self) -> None:
        """teacher_server_url and its settings, and what a served top-k teacher cannot feed."""
        if self.teacher_server not in TEACHER_SERVERS:
            raise LmkdError(
                f"unknown teacher_server {self.teacher_server!r}; choose one of "
                f"{', '.join(TEACHER_SERVERS)}"
            )
        for name, value, low in (
            ("teacher_top_k", self.teacher_top_k, 1),
            ("teacher_prefetch", self.teacher_prefetch, 0),
        ):
            if not (isinstance(value, int) and value >= low):
                raise LmkdError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.teacher_logprob_dtype not in LOGPROB_DTYPES:
            raise LmkdError(
                f"unknown teacher_logprob_dtype {self.teacher_logprob_dtype!r}; choose one of "
                f"{', '.join(LOGPROB_DTYPES)}"
            )
        if not self.teacher_server_timeout > 0:
            raise LmkdError(
                f"teacher_server_timeout must be > 0 seconds, got {self.teacher_server_timeout}"
            )
        if not self.teacher_server_url:
            return
        for url in self.teacher_server_url.split(","):
            if not url.strip().startswith(("http://", "https://")):
                raise LmkdError(
                    f"teacher_server_url must start with http:// or https:// (several: comma-"
                    f"separated), got {url.strip()!r} (e.g. http://gpu-box:8000)"
                )
        if self.kd_loss not in TOPK_KD_LOSSES and not self.teacher_tokenizer:
            # (with teacher_tokenizer: uld or uld_hybrid over the top-k rebuilt on the teacher's
            # vocabulary, lmkd.losses.dense_logprobs; _check_cross_tokenizer checks kd_loss)
            raise LmkdError(
                f"kd_loss {self.kd_loss} needs the teacher's full logits, which a served top-k "
                f"teacher does not send; use {', '.join(TOPK_KD_LOSSES)}"
            )
        other = [
            name
            for name, on in (
                ("teacher_model_name_or_path", self.teacher_model_name_or_path),
                ("logit_cache", self.logit_cache),
                ("rounds", self.rounds > 1),
                ("cohort_size", self.cohort_size > 1),
                (
                    "hidden/attention/relation weights",
                    self.hidden_weight > 0 or self.attention_weight > 0 or self.relation_weight > 0,
                ),
            )
            if on
        ]
        if other:
            raise LmkdError(
                f"teacher_server_url (a served teacher) does not combine with {other[0]}; the "
                "server is the teacher: drop one"
            )

    def _check_sizes(self) -> None:
        """Batch sizes and step counts the Trainer would only trip over later (a ZeroDivisionError or
        a DataLoader error after the models load and output_dir is made)."""
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise LmkdError(f"{name} must be an integer >= 1, got {value}")
        if self.eval_accumulation_steps is not None and not self.eval_accumulation_steps >= 1:
            raise LmkdError(
                f"eval_accumulation_steps must be >= 1 (or unset), got {self.eval_accumulation_steps}"
            )
        if self.dataloader_num_workers < 0:
            raise LmkdError(
                f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}"
            )
        for name in ("save_steps", "eval_steps", "logging_steps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LmkdError(
                    f"{name} must be > 0 (an integer, or a fraction < 1 of the training steps), "
                    f"got {value}"
                )

    def _check_optimisation(self) -> None:
        """Optimiser settings and a training length the Trainer would take without a word: a negative
        learning rate (torch's ValueError traceback after output_dir is made), or no step to run (an
        untrained student saved as if trained)."""
        if not self.learning_rate >= 0:  # (0 holds the weights still: a flat baseline)
            raise LmkdError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if not self.max_steps > 0 and not self.num_train_epochs > 0:
            raise LmkdError(
                f"training would run no step: max_steps is {self.max_steps} (<= 0: unset) and "
                f"num_train_epochs {self.num_train_epochs}; set max_steps > 0 or "
                "num_train_epochs > 0"
            )
        for name, high in (
            ("weight_decay", None),
            ("adam_epsilon", None),
            ("max_grad_norm", None),
            ("warmup_steps", None),
            ("adam_beta1", 1.0),
            ("adam_beta2", 1.0),
            ("label_smoothing_factor", 1.0),
        ):
            value = getattr(self, name, None)
            if value is not None and not (value >= 0 and (high is None or value < high)):
                raise LmkdError(
                    f"{name} must be >= 0"
                    + (f" and < {high:g}" if high is not None else "")
                    + f", got {value}"
                )
        for name in ("generation_num_beams", "generation_max_length"):
            value = getattr(self, name, None)
            if value is not None and not value >= 1:
                raise LmkdError(f"{name} must be >= 1 (or unset), got {value}")

    def _check_precision(self) -> None:
        """bf16 without a device that runs it: transformers refuses with a ValueError (and a hint about
        use_cpu); say it in one line with the device-independent fix."""
        if not (self.bf16 or self.bf16_full_eval) or self.use_cpu:
            return
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            raise LmkdError(
                "bf16 needs a GPU with bfloat16 support and none was found; choose by device "
                "(bf16=torch.cuda.is_available() from Python; on the command line override the "
                "recipe's key, e.g. --bf16 false --use-cpu true on a CPU)"
            )

    def _check_regimes(self) -> None:
        for name in (
            "rounds",
            "cohort_size",
            "on_policy_max_new_tokens",
            "on_policy_prompt_tokens",
        ):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise LmkdError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise LmkdError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if not self.on_policy_temperature > 0:
            raise LmkdError(f"on_policy_temperature must be > 0, got {self.on_policy_temperature}")
        if self.on_policy_fraction > 0 and self.kd_loss != "jsd":
            raise LmkdError(
                f"on-policy KD scores the student's samples with the generalized JSD: set kd_loss jsd "
                f"(jsd_beta 0 = forward KL, 1 = reverse KL), not {self.kd_loss}"
            )
        if self.cohort_size > 1 and (
            self.teacher_model_name_or_path or self.rounds > 1 or self.on_policy_fraction
        ):
            raise LmkdError(
                "cohort_size > 1 (co-distillation) trains without a teacher: drop "
                "teacher_model_name_or_path, rounds and on_policy_fraction"
            )
        if self.cohort_size > 1:
            self.check_co_distillation()
        teachers = [t for t in (self.teacher_model_name_or_path or "").split(",") if t.strip()]
        if self.teacher_weights is not None:
            try:
                weights = [float(w) for w in str(self.teacher_weights).split(",")]
            except ValueError:
                raise LmkdError(
                    f"teacher_weights must be numbers like '0.7,0.3', got {self.teacher_weights!r}"
                ) from None
            if len(weights) != len(teachers) or any(not w > 0 for w in weights):
                raise LmkdError(
                    f"teacher_weights {self.teacher_weights!r}: give one weight > 0 per teacher of "
                    f"teacher_model_name_or_path ({len(teachers)})"
                )
        if len(teachers) > 1 and self.kd_loss == "mse":
            raise LmkdError(
                "a teacher ensemble averages softened distributions, which logit matching (kd_loss "
                "mse) cannot use; choose forward_kl, reverse_kl or jsd"
            )
        if len(teachers) > 1 and self.uses_features:
            raise LmkdError(
                "hidden/attention/relation losses compare with one teacher's layers, not an ensemble; "
                "set their weights 0 or name one teacher"
            )
        if len(teachers) > 1 and self.logit_cache and self.kd_alpha > 0:
            raise LmkdError(
                "logit_cache holds one teacher's logits; drop it to distil from an ensemble"
            )

    @property
    def uses_features(self) -> bool:
        """Whether any feature/relation term is on (a hidden, attention or relation weight > 0)."""
        return self.hidden_weight > 0 or self.attention_weight > 0 or self.relation_weight > 0

    def check_co_distillation(self) -> None:
        """Refuse the losses co-distillation (a cohort of students, no teacher) cannot compute.  Run
        by ``__post_init__`` for ``cohort_size > 1``, and by :class:`lmkd.train.regimes.CoDistillationTrainer`
        for a cohort it is given as a model."""
        if self.kd_loss == "mse" or self.kd_loss in PLAIN_KD_LOSSES:
            raise LmkdError(
                "co-distillation averages the members' distributions: use kd_loss forward_kl, "
                f"reverse_kl or jsd, not {self.kd_loss}"
            )
        if self.uses_features or self.logit_cache:
            raise LmkdError(
                "co-distillation uses the members' output distributions only: set hidden/attention/"
                "relation weights 0 and drop logit_cache"
            )

"""DistillationTrainer: an HF Seq2SeqTrainer with a frozen teacher and a distillation loss."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict, defaultdict

import torch
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import logit_cache, losses
from .losses import chunked
from .config import DistillationConfig, parse_layer_map
from .errors import LmkdError
from .modeling import (
    CAUSAL,
    CLASSIFICATION,
    MLM,
    SEQ2SEQ,
    load_model,
    load_tokenizer,
    model_kind,
    shared_vocab_size,
    unwrap,
    vocab_size_of,
)

logger = logging.getLogger(__name__)

#: the feature/relation terms, each logged as ``loss_<name>``
FEATURE_TERMS = ("hidden", "attention", "relation")
#: which output fields hold each layer stack's (hidden states, attention maps)
_STACK_OUTPUTS = {
    "layers": ("hidden_states", "attentions"),
    "encoder": ("encoder_hidden_states", "encoder_attentions"),
    "decoder": ("decoder_hidden_states", "decoder_attentions"),
}
#: file holding the hint projections in each checkpoint dir (never in the saved student)
PROJECTIONS_NAME = "lmkd_projections.pt"


class DistillationTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` + a frozen teacher + token-level KD.

    The teacher (a model, or a path in ``args.teacher_model_name_or_path``) is moved to the
    student's device in ``args.teacher_dtype``, put in ``eval()`` with gradients off, and kept out
    of the Trainer's model: it is never wrapped by DDP/FSDP, never in the optimizer and never in
    a checkpoint (under DeepSpeed ZeRO-3, where loading partitions it, it runs in a DeepSpeed
    inference engine of its own).  With ``kd_alpha == 0`` no teacher is loaded or run.

    ``compute_loss`` sums the hard-label CE and the KD divergence over their positions and divides
    each by its count in the whole accumulated (and, across processes, gathered) batch, so gradient
    accumulation and data parallelism give the gradient of one large batch.
    """

    # compute_loss normalises by the token count of the whole accumulated batch itself
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationConfig | None = None, teacher_model=None,
                 teacher_tokenizer=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="lmkd_output")
        if not isinstance(args, DistillationConfig):
            raise LmkdError("DistillationTrainer needs args=DistillationConfig(...), not plain TrainingArguments")
        super().__init__(model=model, args=args, **kwargs)
        # Make the Trainer count label tokens over the accumulated batch (see _get_num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self.kind = model_kind(self.model)
        self.teacher = None
        self._vocab = None
        self._stats = {"train": defaultdict(float), "eval": defaultdict(float)}
        # learned student->teacher projections of the hint loss, one per layer stack (see _setup_features)
        self.projections = nn.ModuleDict()
        self._feature_totals = None
        self._pair_cache: dict = {}
        if self.uses_teacher:
            self._setup_teacher(teacher_model, teacher_tokenizer)
        if self._features_on:
            self._setup_features()
        self._fused_head = None  # lmkd.losses.chunked.Head once the fused loss is checked, False when off
        self._teacher_head = None  # the same for computing the teacher's logits per chunk
        if args.teacher_cache:
            self._setup_teacher_cache()
        if args.fsdp and not self.is_fsdp_enabled:
            # accelerate switches to FSDP only for accelerator processes (GPU/NPU/XPU...); with CPU
            # processes the Trainer quietly wraps the student in DDP instead
            logger.warning("fsdp is set but accelerate did not enable FSDP (it does only on GPU-like devices): "
                           "this run is plain data parallel (DDP), every process holding the whole student")

    # ---- teacher ------------------------------------------------------------------------------

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss term needs the teacher's outputs."""
        return (self.args.kd_alpha > 0 and not self.args.teacher_cache) or self._features_on

    def _setup_teacher(self, teacher, teacher_tokenizer) -> None:
        source = teacher if teacher is not None else self.args.teacher_model_name_or_path
        if source is None:
            raise LmkdError("kd_alpha > 0 (or a hidden/attention/relation weight > 0) needs a teacher: set "
                            "teacher_model_name_or_path (or pass teacher_model=...), or set kd_alpha 0 for "
                            "plain fine-tuning")
        if isinstance(source, str):
            if teacher_tokenizer is None:
                teacher_tokenizer = load_tokenizer(source, required=False)
            teacher = load_model(source, kind=self.kind)
        if model_kind(teacher) != self.kind:
            raise LmkdError(f"teacher is a {model_kind(teacher)} model but the student a {self.kind} model; "
                            "distil between models of the same kind")
        zero3 = self._zero3()
        if not zero3:
            dtype = self.args.teacher_dtype
            if dtype == "auto":
                dtype = next(unwrap(self.model).parameters()).dtype
            else:
                dtype = getattr(torch, dtype)
            teacher = teacher.to(device=self.args.device, dtype=dtype)
        elif self.args.teacher_dtype != "auto":
            raise LmkdError(f"teacher_dtype {self.args.teacher_dtype} is not supported under DeepSpeed ZeRO-3: the "
                            "teacher takes the precision of the DeepSpeed config (bf16/fp16); set teacher_dtype auto")
        teacher.eval()
        teacher.requires_grad_(False)
        # Teacher forward at its floor: no KV cache, no hidden states/attentions unless a loss asks
        # for them explicitly (as a forward kwarg, see _feature_output_flags).
        for flag in ("use_cache", "output_hidden_states", "output_attentions"):
            if getattr(teacher.config, flag, None):
                setattr(teacher.config, flag, False)
        self._vocab = shared_vocab_size(self.model, teacher, self.processing_class, teacher_tokenizer)
        if self._vocab is not None:
            logger.info("teacher and student vocabularies differ only by padding rows; KD uses the first %d",
                        self._vocab)
        self.teacher = self._deepspeed_teacher(teacher) if zero3 else teacher

    def _zero3(self) -> bool:
        """Whether this run uses DeepSpeed ZeRO stage 3 (parameters partitioned across processes)."""
        if not self.is_deepspeed_enabled:
            return False
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        return int(config.get("zero_optimization", {}).get("stage", 0)) == 3

    def _deepspeed_teacher(self, teacher):
        """Under ZeRO-3, ``from_pretrained`` builds every model partitioned (``zero.Init``), the
        teacher included, so a plain forward would see empty weights.  Wrap the teacher in a
        DeepSpeed engine of its own -- ZeRO-3, no optimizer -- whose forward gathers each layer's
        parameters just in time and frees them after, as DeepSpeed inference and TRL's
        ``prepare_deepspeed`` do.  The engine is never the Trainer's model: not in the optimizer,
        not saved.  (Under ZeRO-1/2 the teacher is an ordinary full replica and stays unwrapped.)"""
        import copy

        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):  # training-only; an engine without them optimises nothing
            config.pop(key, None)
        zero = config.setdefault("zero_optimization", {})
        for key in ("offload_optimizer", "stage3_gather_16bit_weights_on_model_save"):
            zero.pop(key, None)
        cfg = unwrap(teacher).config
        hidden = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "hidden_size", None)
        if isinstance(hidden, int):  # the values the Trainer derives for the student, from the teacher's width
            zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                        stage3_param_persistence_threshold=10 * hidden)

        def settle(node):  # "auto" values left are the Trainer's to fill for the student: DeepSpeed defaults here
            for k in [k for k, v in node.items() if v == "auto"]:
                del node[k]
            for v in node.values():
                if isinstance(v, dict):
                    settle(v)

        settle(config)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        engine.requires_grad_(False)
        logger.info("DeepSpeed ZeRO-3: the teacher runs in its own inference engine (parameters partitioned, "
                    "gathered layer by layer for its forward)")
        return engine

    # ---- positions ----------------------------------------------------------------------------

    def _masks(self, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(CE mask, KD mask) over the aligned positions of a batch -- the logits' leading shape
        after the causal shift.  The CE mask is None when the batch has no labels."""
        labels = inputs.get("labels")
        if self.kind == CLASSIFICATION:
            n = inputs["input_ids"].shape[0]
            kd = torch.ones(n, dtype=torch.bool, device=inputs["input_ids"].device)
            return (kd if labels is not None else None), kd
        if self.kind == CAUSAL:
            if labels is not None:
                ce = labels[:, 1:].ne(losses.IGNORE_INDEX)
                return ce, ce
            att = inputs.get("attention_mask")
            kd = att[:, 1:].bool() if att is not None else torch.ones_like(inputs["input_ids"][:, 1:], dtype=torch.bool)
            return None, kd
        if self.kind == MLM:
            ce = labels.ne(losses.IGNORE_INDEX) if labels is not None else None
            if self.args.mlm_kd_positions == "masked" and ce is not None:
                return ce, ce
            att = inputs.get("attention_mask")
            kd = att.bool() if att is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            return ce, kd
        # seq2seq: one position per target token
        if labels is None:
            raise LmkdError("a seq2seq batch needs labels (the target tokens)")
        ce = labels.ne(losses.IGNORE_INDEX)
        return ce, ce

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Counts of CE and KD positions in the whole accumulated batch, summed over processes."""
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            ce, kd = self._masks(batch)
            counts[0] += int(ce.sum()) if ce is not None else 0
            counts[1] += int(kd.sum())
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
        self._feature_totals = self._count_feature_items(batch_samples, device) if self._features_on else None
        return counts

    # ---- loss ---------------------------------------------------------------------------------

    def _forward_inputs(self, model, inputs: dict) -> dict:
        fwd = {k: v for k, v in inputs.items() if k != "labels" and k not in logit_cache.BATCH_KEYS}
        if self.kind == SEQ2SEQ and "decoder_input_ids" not in fwd:
            fwd["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        if self._features_on:
            fwd.update(self._feature_output_flags())
        return fwd

    def _aligned(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, :-1] if self.kind == CAUSAL else logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        fwd = self._forward_inputs(model, inputs)
        with self._lean_head(model, return_outputs) as lean_head:  # fused CE+KD: the LM head runs in the loss
            outputs = model(**fwd)
        s_logits = self._aligned(outputs.logits)
        ce_mask, kd_mask = self._masks(inputs)

        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2:
            n_ce, n_kd = num_items_in_batch.tolist()
            scale = self.accelerator.num_processes if (args.average_tokens_across_devices and args.world_size > 1) else 1
        else:
            n_ce = int(ce_mask.sum()) if ce_mask is not None else 0
            n_kd = int(kd_mask.sum())
            scale = 1

        alpha = args.kd_alpha if (self.teacher is not None or logit_cache.MASK in inputs) else 0.0
        loss = s_logits.new_zeros((), dtype=torch.float32)
        stats = self._stats[mode]
        lean = self._lean_ce_kd(inputs, outputs, s_logits, lean_head, ce_mask, kd_mask, n_ce, n_kd, alpha, stats)
        if lean is not None:  # lmkd.losses.chunked / the logit cache did CE and KD
            loss = loss + lean[0]
        if lean is None and ce_mask is not None and alpha < 1:
            labels = inputs["labels"]
            labels = labels[:, 1:] if self.kind == CAUSAL else labels
            ce_sum = losses.cross_entropy(s_logits, labels)
            loss = loss + (1 - alpha) * ce_sum / max(n_ce, 1)
            stats["ce_sum"] += ce_sum.item()
            stats["ce_n"] += int(ce_mask.sum())
        t_outputs = lean[1] if lean is not None else None
        if lean is None and alpha > 0:
            with torch.no_grad():
                t_outputs = self.teacher(**self._forward_inputs(self.teacher, inputs))
                t_logits = self._aligned(t_outputs.logits)
            s_kd, t_kd = s_logits, t_logits
            if self._vocab is not None:
                s_kd, t_kd = s_kd[..., : self._vocab], t_kd[..., : self._vocab]
            kd_sum = losses.token_kd_loss(s_kd, t_kd, kd_mask, loss=args.kd_loss,
                                          temperature=args.kd_temperature, beta=args.jsd_beta)
            loss = loss + alpha * kd_sum / max(n_kd, 1)
            stats["kd_sum"] += kd_sum.item()
            stats["kd_n"] += int(kd_mask.sum())
        if self._features_on:
            loss = loss + self._feature_losses(outputs, t_outputs, inputs, stats, num_items_in_batch)

        if not torch.isfinite(loss):
            raise LmkdError(f"the loss became {loss.item()} at step {self.state.global_step}; lower the "
                            "learning rate, use bf16 instead of fp16, or check the data for empty targets")
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    # ---- feature and relation losses -----------------------------------------------------------

    @property
    def _features_on(self) -> bool:
        a = self.args
        return a.hidden_weight > 0 or a.attention_weight > 0 or a.relation_weight > 0

    def _stacks(self) -> tuple[str, ...]:
        return ("encoder", "decoder") if self.kind == SEQ2SEQ else ("layers",)

    def _feature_output_flags(self) -> dict:
        """Ask the models for hidden states / attention maps only when a loss needs them."""
        a = self.args
        flags = {}
        if a.hidden_weight > 0 or a.relation_weight > 0:
            flags["output_hidden_states"] = True
        if a.attention_weight > 0:
            flags["output_attentions"] = True
        return flags

    def _setup_features(self) -> None:
        """Eager attention when attention maps are needed; hint projections when sizes differ."""
        args = self.args
        self._layer_spec = parse_layer_map(args.layer_map) if args.layer_map is not None else None
        student, teacher = unwrap(self.model), unwrap(self.teacher)
        if not isinstance(teacher, PreTrainedModel):
            raise LmkdError(f"hidden/attention/relation losses need one Hugging Face teacher model, not a "
                            f"{type(teacher).__name__} (e.g. a teacher ensemble); set their weights to 0")
        if args.attention_weight > 0:
            for who, m in (("student", student), ("teacher", teacher)):
                if m.config._attn_implementation != "eager":
                    try:
                        m.set_attn_implementation("eager")
                    except (ValueError, ImportError) as e:
                        raise LmkdError(f"attention_weight > 0 needs attention maps but the {who} cannot use "
                                        f"eager attention ({str(e).splitlines()[0]}); set attention_weight 0")
        if args.hidden_weight > 0:
            d_s = student.config.get_text_config().hidden_size
            d_t = teacher.config.get_text_config().hidden_size
            if d_s != d_t:
                if self.is_deepspeed_enabled:
                    raise LmkdError(f"student hidden size {d_s} differs from the teacher's {d_t}: the hint "
                                    "projection is not supported under DeepSpeed; use relation_weight (no "
                                    "projection needed) or a student of the teacher's width")
                dtype = next(student.parameters()).dtype
                dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
                for stack in self._stacks():
                    self.projections[stack] = nn.Linear(d_s, d_t).to(device=self.args.device, dtype=dtype)
                logger.info("hidden sizes differ (student %d, teacher %d): training a linear projection per layer "
                            "stack (%s) for the hint loss", d_s, d_t, ", ".join(self.projections))

    def _feature_masks(self, inputs: dict) -> dict[str, torch.Tensor]:
        """Per layer stack, the (batch, seq) mask of the real tokens its hidden states cover."""
        ids = inputs["input_ids"]
        att = inputs.get("attention_mask")
        enc = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
        if self.kind == SEQ2SEQ:
            return {"encoder": enc, "decoder": inputs["labels"].ne(losses.IGNORE_INDEX)}
        return {"layers": enc}

    def _count_feature_items(self, batch_samples: list, device) -> dict[str, int]:
        """Tokens per stack and examples in the whole accumulated (all-process) batch."""
        names = list(self._stacks()) + ["examples"]
        counts = torch.zeros(len(names), dtype=torch.long)
        for batch in batch_samples:
            masks = self._feature_masks(batch)
            for k, name in enumerate(names[:-1]):
                counts[k] += int(masks[name].sum())
            counts[-1] += int(batch["input_ids"].shape[0])
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.to(device).unsqueeze(0)).sum(0).cpu()
        return dict(zip(names, counts.tolist()))

    def _layer_pairs(self, stack: str, n_s: int, n_t: int) -> list[tuple[int, int]]:
        """(student layer, teacher layer) pairs of ``stack``, from ``layer_map``, else the layers
        make_student copied (``lmkd_layer_map``), else evenly spaced ending at the last layer."""
        key = (stack, n_s, n_t)
        if key in self._pair_cache:
            return self._pair_cache[key]
        copied = getattr(unwrap(self.model).config, "lmkd_layer_map", None)
        copied = copied.get(stack) if isinstance(copied, dict) else None
        if self._layer_spec is not None:
            pairs = self._layer_spec.get(stack, self._layer_spec.get("*"))
            where = f"layer_map {self.args.layer_map!r}"
            if pairs is None:
                raise LmkdError(f"{where} says nothing about the {stack} stack; add '{stack}=...'")
        elif copied is not None and len(copied) == n_s:
            pairs, where = list(enumerate(copied)), "the student's lmkd_layer_map (from make-student)"
        else:
            pairs = [(i, (i + 1) * n_t // n_s - 1) for i in range(n_s)]
            where = "the evenly spaced layer map"
        resolved = []
        for i, j in pairs:
            i2, j2 = i + n_s if i < 0 else i, j + n_t if j < 0 else j
            if not (0 <= i2 < n_s and 0 <= j2 < n_t):
                raise LmkdError(f"{where} pairs {stack} layers {i}:{j}, but the student has {n_s} and the teacher "
                                f"{n_t} {stack} layers; set layer_map (e.g. '-1:-1')")
            resolved.append((i2, j2))
        self._pair_cache[key] = resolved
        return resolved

    def _feature_losses(self, outputs, t_outputs, inputs: dict, stats: dict, num_items_in_batch) -> torch.Tensor:
        """``hidden_weight * hidden + attention_weight * attention + relation_weight * relation``.

        Each term is the mean over all mapped (stack, layer) pairs of a per-token (hidden,
        attention) or per-example (relation) loss, normalised by the tokens/examples of the whole
        accumulated batch like the KD term.  The logged ``loss_<term>`` is the mean over
        micro-batches of the micro-batch's own average.
        """
        args = self.args
        if t_outputs is None:
            with torch.no_grad():
                t_outputs = self.teacher(**self._forward_inputs(self.teacher, inputs))
        masks = self._feature_masks(inputs)
        local = {stack: int(m.sum()) for stack, m in masks.items()}
        local["examples"] = int(inputs["input_ids"].shape[0])
        totals = self._feature_totals if (num_items_in_batch is not None and self._feature_totals) else local

        pairs = {}
        for stack in masks:
            hs_key, att_key = _STACK_OUTPUTS[stack]
            key = hs_key if "output_hidden_states" in self._feature_output_flags() else att_key
            s_out, t_out = outputs.get(key), t_outputs.get(key)
            if not s_out or not t_out:
                raise LmkdError(f"the models returned no {key}; feature losses need models whose forward accepts "
                                f"output_hidden_states/output_attentions (and eager attention for attention maps)")
            shift = 1 if key == hs_key else 0  # hidden_states[0] is the embedding output
            pairs[stack] = self._layer_pairs(stack, len(s_out) - shift, len(t_out) - shift)
        n_pairs = sum(len(p) for p in pairs.values())

        total = torch.zeros((), dtype=torch.float32, device=inputs["input_ids"].device)
        for name, weight in (("hidden", args.hidden_weight), ("attention", args.attention_weight),
                             ("relation", args.relation_weight)):
            if weight <= 0:
                continue
            value, logged = 0.0, 0.0
            for stack, mask in masks.items():
                hs_key, att_key = _STACK_OUTPUTS[stack]
                raw = 0.0
                for i, j in pairs[stack]:
                    if name == "hidden":
                        raw = raw + losses.hint_loss(outputs[hs_key][i + 1], t_outputs[hs_key][j + 1],
                                                     self.projections[stack] if stack in self.projections else None,
                                                     mask, loss=args.hidden_loss)
                    elif name == "attention":
                        raw = raw + losses.attention_loss(outputs[att_key][i], t_outputs[att_key][j], mask,
                                                          loss=args.attention_loss)
                    else:
                        raw = raw + losses.relation_loss(outputs[hs_key][i + 1], t_outputs[hs_key][j + 1], mask,
                                                         loss=args.relation_loss, pooling=args.relation_pooling)
                count = "examples" if name == "relation" else stack
                value = value + raw / max(totals[count], 1)
                logged += float(raw.detach()) / max(local[count], 1)
            total = total + weight * value / n_pairs
            stats[f"{name}_sum"] += logged / n_pairs
            stats[f"{name}_n"] += 1
        # Keep hidden states/attention maps out of what prediction_step gathers as predictions.
        for keys in _STACK_OUTPUTS.values():
            for k in keys:
                if k in outputs:
                    OrderedDict.__delitem__(outputs, k)  # ModelOutput forbids del
                    object.__setattr__(outputs, k, None)
        return total

    # ---- optimisation and checkpoints of the hint projections -----------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, plus the hint projections (when there are any) as extra groups."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if len(self.projections):
            if fresh:
                params = dict(self.projections.named_parameters())
                optimizer.add_param_group({"params": [p for n, p in params.items() if not n.endswith("bias")],
                                           "weight_decay": self.args.weight_decay})
                optimizer.add_param_group({"params": [p for n, p in params.items() if n.endswith("bias")],
                                           "weight_decay": 0.0})
            else:
                logger.warning("a ready-made optimizer was given: add trainer.projections.parameters() to it, or "
                               "the hint projections stay at their random initialisation")
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The projections live outside the DDP-wrapped model: average their gradients by hand.
        if (len(self.projections) and self.args.world_size > 1 and self.accelerator.sync_gradients
                and torch.distributed.is_available() and torch.distributed.is_initialized()):
            for p in self.projections.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.args.world_size
        return loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if len(self.projections):  # clipped on their own, so the model's reported norm is unchanged
            torch.nn.utils.clip_grad_norm_(self.projections.parameters(), self.args.max_grad_norm)
        return norm

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if len(self.projections) and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder):
                torch.save(self.projections.state_dict(), os.path.join(folder, PROJECTIONS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.projections):
            path = os.path.join(resume_from_checkpoint, PROJECTIONS_NAME)
            if os.path.isfile(path):
                self.projections.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
            else:
                logger.warning("%s has no %s: the hint projections restart from a random initialisation",
                               resume_from_checkpoint, PROJECTIONS_NAME)

    # ---- memory-lean CE + KD (lmkd.losses.chunked) and the cached teacher (lmkd.logit_cache) ----------

    def _setup_teacher_cache(self) -> None:
        """Train from `lmkd cache-logits` output: tag each training row with its cache row, and
        collate the cached top-K with each batch."""
        cache = logit_cache.LogitCache(self.args.teacher_cache)
        if self.train_dataset is not None:
            if not hasattr(self.train_dataset, "column_names"):
                raise LmkdError("teacher_cache needs the training data as a datasets.Dataset (tokenised, with "
                                "the rows the cache was made from)")
            self.train_dataset = logit_cache.attach_cache(self.train_dataset, cache, self.kind)
        top = max((int(s["ids"].max()) for s in cache.shards if len(s["ids"])), default=0)
        if top >= vocab_size_of(self.model):
            raise LmkdError(f"the logit cache {cache.path} holds token id {top} but the student has only "
                            f"{vocab_size_of(self.model)} outputs; cache with the student's teacher and tokenizer")
        side = getattr(self.processing_class, "padding_side", "right") or "right"
        self.data_collator = logit_cache.CachedLogitsCollator(self.data_collator, cache, side)
        self._cache = cache

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.teacher_cache and logit_cache.CACHE_ROW not in self._signature_columns:
            # keep the cache row number through remove_unused_columns
            self._signature_columns = [*self._signature_columns, logit_cache.CACHE_ROW]

    def _head_for_fused_loss(self, model):
        """The student's LM head as lmkd.losses.chunked.Head, or (None, why not)."""
        m = unwrap(model)
        if self.kind not in (CAUSAL, SEQ2SEQ):
            return None, f"{self.kind} models are not supported"
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return None, "the head is sharded (FSDP/DeepSpeed)"
        if m is unwrap(self.model) and self.args.world_size > 1:
            # the fused loss differentiates the head outside DDP's forward, so DDP's gradient hooks
            # would fire twice for the (tied) head weight
            return None, "the student is wrapped for data parallelism (DDP)"
        head = m.get_output_embeddings()
        if type(head) is not nn.Linear:
            return None, f"the output layer is a {type(head).__name__}, not a plain nn.Linear"
        cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
        scale = getattr(cfg, "logit_scale", None)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        extra = getattr(m, "final_logits_bias", None)
        return chunked.Head(head.weight, head.bias, extra if isinstance(extra, torch.Tensor) else None,
                            float(scale) if isinstance(scale, (int, float)) else 1.0,
                            float(softcap) if softcap else None), ""

    @contextlib.contextmanager
    def _head_skipped(self, model, decided):
        """Around a forward of ``model``: with ``decided`` a Head, the LM head only records its input
        and returns zeros of width 1 (Marian/BART's final_logits_bias is swapped for a (1, 1) zero
        meanwhile, so no (B, T, V) tensor is made); with ``decided`` None a hook records the head's
        input so the caller can check the fused head against the model's real logits."""
        module = unwrap(model).get_output_embeddings()
        box = {"hidden": [], "probe": decided is None}
        if box["probe"]:
            handle = module.register_forward_hook(lambda m, args, out: box["hidden"].append(args[0]))
            try:
                yield box
            finally:
                handle.remove()
            return
        inner = unwrap(model)
        swap = "final_logits_bias" in inner._buffers
        width = 1 if (not swap or inner is model) else module.out_features  # never swap under a wrapper
        swap = swap and width == 1

        def skip(hidden, *a, **k):
            box["hidden"].append(hidden)
            return hidden.new_zeros(()).expand(*hidden.shape[:-1], width)

        bias = inner._buffers.get("final_logits_bias")
        module.forward = skip
        if swap:
            inner._buffers["final_logits_bias"] = bias.new_zeros(1, 1)
        try:
            yield box
        finally:
            del module.forward
            if swap:
                inner._buffers["final_logits_bias"] = bias

    def _lean_head(self, model, return_outputs: bool = False):
        """The student's forward context: head skipped when the fused loss is on (training only, and
        never when the caller wants the outputs: their logits would be placeholders)."""
        use = (model.training and not return_outputs and self.args.kd_chunk_size != 0
               and self._fused_head is not False and self.kind in (CAUSAL, SEQ2SEQ))
        return self._head_skipped(model, self._fused_head) if use else contextlib.nullcontext(None)

    def _check_head(self, model, box, outputs, who: str):
        """Once per model: does lmkd.losses.chunked.Head reproduce the model's logits?  The Head, or False."""
        head, why = self._head_for_fused_loss(model)
        if head is not None and len(box["hidden"]) != 1:
            head, why = None, "the LM head is called more than once per forward"
        if head is not None:
            with torch.no_grad():
                real = outputs.logits.float()
                mine = head.logits(box["hidden"][0]).float()
                tol = 1e-4 if real.dtype == torch.float32 and head.weight.dtype == torch.float32 else 1e-2
                ok = mine.shape == real.shape and bool(
                    (mine - real).abs().max() <= tol * real.abs().max().clamp(min=1.0))
            if not ok:
                head, why = None, "the model transforms its logits in a way lmkd cannot reproduce"
        if head is None:
            if who == "student":
                logger.info("fused linear KD loss off (%s); using the chunked loss on the full logits -- the "
                            "same objective", why)
            else:
                logger.info("teacher logits computed whole, not per chunk (%s)", why)
        return head if head is not None else False

    def _teacher_for_loss(self, inputs):
        """(teacher outputs, teacher logits for lmkd.losses.chunked): per-chunk logits from the teacher's
        final hidden states when its head is checked (no (N, V) teacher tensor), else its logits."""
        use = self.args.kd_chunk_size != 0 and self._teacher_head is not False and self.kind in (CAUSAL, SEQ2SEQ)
        ctx = self._head_skipped(self.teacher, self._teacher_head) if use else contextlib.nullcontext(None)
        with ctx as box, torch.no_grad():
            t_outputs = self.teacher(**self._forward_inputs(self.teacher, inputs))
        if box is not None and box["probe"]:
            self._teacher_head = self._check_head(self.teacher, box, t_outputs, "teacher")
        elif box is not None:
            hidden = self._aligned(box["hidden"][0])
            return t_outputs, chunked.LazyLogits(hidden.reshape(-1, hidden.shape[-1]), self._teacher_head)
        return t_outputs, self._aligned(t_outputs.logits)

    def _lean_ce_kd(self, inputs, outputs, s_logits, lean_head, ce_mask, kd_mask, n_ce, n_kd, alpha, stats):
        """CE + KD in one chunked pass (lmkd.losses.chunked), or against the cached teacher.  Returns
        (weighted loss, teacher outputs or None), or None for the plain path of compute_loss."""
        args = self.args
        cached = logit_cache.MASK in inputs
        if args.kd_chunk_size == 0 and not cached:
            return None
        model = self.model
        if lean_head is not None and lean_head["probe"]:
            self._fused_head = self._check_head(model, lean_head, outputs, "student")
            lean_head = None
        w_ce = (1 - alpha) / max(n_ce, 1) if (ce_mask is not None and alpha < 1) else 0.0
        w_kd = alpha / max(n_kd, 1) if alpha > 0 else 0.0
        labels = None
        if w_ce:
            labels = inputs["labels"][:, 1:] if self.kind == CAUSAL else inputs["labels"]
        teacher, t_outputs = None, None
        if w_kd:
            if cached:
                teacher = logit_cache.batch_topk(inputs, kd_mask)
            else:
                t_outputs, teacher = self._teacher_for_loss(inputs)
        kw = dict(loss=args.kd_loss, temperature=args.kd_temperature, beta=args.jsd_beta, ce_weight=w_ce,
                  kd_weight=w_kd, kd_vocab=self._vocab, chunk_size=args.kd_chunk_size)
        if lean_head is not None:
            hidden = self._aligned(lean_head["hidden"][0])
            total, ce_sum, kd_sum = chunked.fused_linear_distill_loss(hidden, self._fused_head, teacher, labels,
                                                                      kd_mask, **kw)
        elif args.kd_chunk_size == 0:  # the cached teacher on the plain (autograd) path
            zero = s_logits.new_zeros((), dtype=torch.float32)
            ce_sum = losses.cross_entropy(s_logits, labels) if w_ce else zero
            s_kd = s_logits[..., : self._vocab] if self._vocab is not None else s_logits
            kd_sum = (chunked.topk_kd_loss(s_kd, teacher, kd_mask, loss=args.kd_loss,
                                           temperature=args.kd_temperature, beta=args.jsd_beta) if w_kd else zero)
            total = w_ce * ce_sum + w_kd * kd_sum
        else:
            total, ce_sum, kd_sum = chunked.chunked_distill_loss(s_logits, teacher, labels, kd_mask, **kw)
        if w_ce:
            stats["ce_sum"] += ce_sum.item()
            stats["ce_n"] += int(ce_mask.sum())
        if w_kd:
            stats["kd_sum"] += kd_sum.item()
            stats["kd_n"] += int(kd_mask.sum())
        return total, t_outputs

    # ---- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stats = self._stats[mode]
        prefix = "eval_" if mode == "eval" else ""
        if stats.get("ce_n"):
            logs[f"{prefix}loss_ce"] = round(stats["ce_sum"] / stats["ce_n"], 6)
        if stats.get("kd_n"):
            logs[f"{prefix}loss_kd"] = round(stats["kd_sum"] / stats["kd_n"], 6)
        for name in FEATURE_TERMS:
            if stats.get(f"{name}_n"):
                logs[f"{prefix}loss_{name}"] = round(stats[f"{name}_sum"] / stats[f"{name}_n"], 6)
        stats.clear()
        super().log(logs, start_time)

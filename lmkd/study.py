"""``lmkd study``: one command runs a whole distillation study on the user's data and reports it.

Seq2seq (translation, summarization) -- Kim & Rush (2016)'s table:

    data -> tokenizer -> teacher -> transfer set (teacher beam outputs + n-best)
         -> student init (one per size, saved once, copied by every variant)
         -> baseline | word-kd | seq-kd | seq-kd+word-kd | seq-inter   (one stage each)
         -> eval of every model (greedy and beam) -> speed (all models, interleaved) -> report

Classification -- the DistilBERT path against plain fine-tuning:

    data -> tokenizer -> teacher-mlm -> teacher (classifier) -> student init (every other layer)
         -> student MLM-distilled from teacher-mlm -> fine-tuned | student fine-tuned without KD
         -> eval -> speed -> report

Every stage lives in ``OUTPUT/stages/NAME``: it is written to a temp dir and renamed into place
when it finishes, with a ``stage.json`` holding the hash of the options it depends on (its own
options plus the hashes of the stages it reads).  Re-running the same command skips every stage
whose hash matches, so an interrupted study resumes at its first unfinished stage and a changed
option recomputes only the stages that depend on it.  ``OUTPUT/study.log`` (JSON lines) records
every stage that ran, with its timing.

One trainer does every training: :class:`lmkd.DistillationTrainer` through ``run_distill`` with
``kd_alpha 0`` for plain training (teacher, baseline, seq-KD) and ``kd_alpha > 0`` for word-level KD.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LmkdError

TASKS = ("translation", "summarization", "classification")
SEQ2SEQ_VARIANTS = ("baseline", "word-kd", "seq-kd", "seq-kd+word-kd", "seq-inter")
CLS_VARIANTS = ("no-kd", "distilbert")
STOP_ENV = "LMKD_STUDY_STOP_AFTER"  # test hook: stop (as if interrupted) right after this stage

# What each budget trains and evaluates.  ``quick`` is sized for `make demo` (<= 20 min on 2 CPU
# cores); ``tiny`` for tests (seconds); ``full`` for a real study.  Row limits of None = all rows.
BUDGETS: dict[str, dict] = {
    "tiny": dict(
        train_rows=160, transfer_rows=64, validation_rows=32, test_rows=24, vocab_size=200,
        teacher=dict(d_model=32, layers=2, heads=2, ffn=64), teacher_steps=40, teacher_mlm_steps=30,
        student_steps=12, batch_size=16, teacher_lr=3e-3, student_lr=3e-3, warmup_steps=4,
        beams=2, max_new_tokens=24, max_length=64, speed_examples=4, speed_repeats=1, dropout=0.0,
    ),
    "quick": dict(
        train_rows=None, transfer_rows=4000, validation_rows=200, test_rows=300, vocab_size=4000,
        teacher=dict(d_model=256, layers=3, heads=4, ffn=1024), teacher_steps=1500, teacher_mlm_steps=1000,
        student_steps=600, batch_size=32, teacher_lr=1e-3, student_lr=1e-3, warmup_steps=300,
        beams=4, max_new_tokens=64, max_length=128, speed_examples=16, speed_repeats=3,
        # No dropout for the short from-scratch runs: measured on a d_model-128 BART after 1,500 steps
        # on this corpus, dropout 0.1 left it ignoring the source (val loss 3.79 with the right
        # sources vs 3.82 with shuffled ones) while dropout 0 used it (2.77 vs 5.58).
        dropout=0.0,
    ),
    "full": dict(
        train_rows=None, transfer_rows=None, validation_rows=1000, test_rows=None, vocab_size=8000,
        teacher=dict(d_model=512, layers=6, heads=8, ffn=2048), teacher_steps=20000, teacher_mlm_steps=20000,
        student_steps=10000, batch_size=64, teacher_lr=5e-4, student_lr=1e-3, warmup_steps=1000,
        beams=5, max_new_tokens=128, max_length=256, speed_examples=32, speed_repeats=5, dropout=0.1,
    ),
}


@dataclass
class StudyOptions:
    """Everything ``lmkd study`` takes (the CLI flags, one to one)."""

    task: str
    output: str
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    teacher: str | None = None
    student_sizes: list[float] | None = None
    budget: str = "quick"
    teacher_steps: int | None = None
    student_steps: int | None = None
    kd_alpha: float = 0.5
    kd_temperature: float | None = None
    beams: int | None = None
    seed: int = 42
    # filled in by resolve(): the budget's table with the overrides applied
    plan: dict = field(default_factory=dict)

    def resolve(self) -> StudyOptions:
        if self.task not in TASKS:
            raise LmkdError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.budget not in BUDGETS:
            raise LmkdError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if not 0 < self.kd_alpha <= 1:
            raise LmkdError(f"--kd-alpha must be in (0, 1], got {self.kd_alpha}; it weights word-level KD "
                            "against the gold labels in the Word-KD variants")
        if self.kd_temperature is not None and not self.kd_temperature > 0:
            raise LmkdError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        default_cols = {"translation": ("source", "target"), "summarization": ("document", "summary"),
                        "classification": ("text", "label")}[self.task]
        self.source_column = self.source_column or default_cols[0]
        self.target_column = self.target_column or default_cols[1]
        if self.train is None and self.validation is None and self.test is None:
            if self.task != "translation" or (self.source_column, self.target_column) != ("source", "target"):
                raise LmkdError("--train, --validation and --test are needed (the shipped corpus is an "
                                "en->fr translation set with source/target columns)")
            self.train, self.validation, self.test = (shipped_corpus(s) for s in ("train", "validation", "test"))
        missing = [n for n in ("train", "validation", "test") if getattr(self, n) is None]
        if missing:
            raise LmkdError(f"--{missing[0]} is missing; give all of --train, --validation and --test "
                            "(or none of them for the shipped en->fr corpus)")
        for name in ("train", "validation", "test"):  # fail before the output dir is made
            path = getattr(self, name)
            if not os.path.exists(path):
                raise LmkdError(f"--{name} file {path} does not exist; check the path")
        if self.teacher is not None:
            from .modeling import check_model_path

            check_model_path(self.teacher)
        if self.student_sizes is None:
            self.student_sizes = [0.5] if self.task == "classification" else [0.25]
        for s in self.student_sizes:
            if not 0 < s < 1:
                raise LmkdError(f"--student-sizes takes fractions of the teacher in (0, 1), got {s}")
        plan = copy.deepcopy(BUDGETS[self.budget])
        for key in ("teacher_steps", "student_steps", "beams"):
            value = getattr(self, key)
            if value is not None:
                if value < 1:
                    raise LmkdError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
                plan[key] = value
        plan["kd_alpha"] = self.kd_alpha
        plan["kd_temperature"] = self.kd_temperature or (2.0 if self.task == "classification" else 1.0)
        self.plan = plan
        return self


def shipped_corpus(split: str) -> str:
    """Path of the shipped en->fr DDTP corpus file of ``split``."""
    from importlib.resources import files

    return str(files("lmkd") / "corpora" / f"ddtp_en_fr.{split}.jsonl.gz")


# ---- stage machinery ----------------------------------------------------------------------------


class StudyStopped(Exception):
    """Raised after the stage named in $LMKD_STUDY_STOP_AFTER (a test hook that simulates an
    interruption)."""


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """Content hash of a data file (or of every file under a directory)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class Stages:
    """Runs named stages with caching in ``root/stages``; see the module docstring."""

    def __init__(self, root: str, total: int):
        self.root = Path(root)
        self.dir = self.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".tmp-*"):  # what a killed run was writing
            shutil.rmtree(stale, ignore_errors=True)
        self.keys: dict[str, str] = {}
        self.total = total
        self.count = 0
        self.start = time.time()
        self.stop_after = os.environ.get(STOP_ENV)

    def path(self, name: str) -> str:
        return str(self.dir / name.replace("+", "_"))

    def run(self, name: str, options: dict, deps: list[str], fn, what: str = "") -> str:
        """Run ``fn(tmpdir)`` unless ``stage.json`` in the stage dir holds the same key; return the dir."""
        self.count += 1
        key = _hash({"options": options, "deps": {d: self.keys[d] for d in deps}})
        final = Path(self.path(name))
        meta_path = final / "stage.json"
        label = f"[{self.count}/{self.total}] {name}"
        why = ""
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                self.keys[name] = key
                print(f"{label}: cached ({_fmt(meta.get('elapsed_s', 0))} when it ran)", flush=True)
                return str(final)
            changed = sorted(k for k in set(options) | set(meta.get("options", {}))
                             if options.get(k) != meta.get("options", {}).get(k))
            changed += sorted(d for d in deps if meta.get("deps", {}).get(d) != self.keys[d])
            why = f" (recomputing: {', '.join(changed) or 'changed'} changed)"
        print(f"{label}: {what or 'running'}{why} ...", flush=True)
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.dir))
        try:
            fn(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        elapsed = time.time() - t0
        meta = {"stage": name, "key": key, "options": options, "deps": {d: self.keys[d] for d in deps},
                "elapsed_s": round(elapsed, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "stage.json").write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.keys[name] = key
        with open(self.root / "study.log", "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": name, "key": key, "elapsed_s": round(elapsed, 2),
                                "finished": meta["finished"]}) + "\n")
        print(f"{label}: done in {_fmt(elapsed)} (study at {_fmt(time.time() - self.start)})", flush=True)
        if self.stop_after == name:
            raise StudyStopped(f"stopped after stage {name} (${STOP_ENV})")
        return str(final)


# ---- data ---------------------------------------------------------------------------------------


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _label_order(values) -> list[str]:
    """Label names in a stable order: integers numerically first, then the rest alphabetically."""
    def key(v):
        digit = v.strip().lstrip("-").isdigit()
        return (not digit, int(v) if digit else 0, v)

    return sorted(set(values), key=key)


def _prepare_split(opts: StudyOptions, split: str, out: str, labels: list[str] | None = None) -> None:
    """A normalised copy of one split: columns source/target (seq2seq) or text/label with label
    ids (classification; ``labels`` from the training split), row limit of the budget applied."""
    from .data import read_rows

    src, tgt = opts.source_column, opts.target_column
    path = getattr(opts, split)
    rows = read_rows(path)
    for col in (src, tgt):
        if col not in rows[0]:
            flag = "--source-column" if col == src else "--target-column"
            raise LmkdError(f"{path} has no column {col!r} (it has: {', '.join(rows[0])}); name the right "
                            f"one with {flag}")
    rows = [r for r in rows if str(r[src]).strip() and str(r[tgt]).strip()]
    if not rows:
        raise LmkdError(f"{path} has no row with both {src!r} and {tgt!r} filled in")
    limit = opts.plan[f"{split}_rows"]
    rows = rows[:limit] if limit is not None else rows
    info: dict = {"rows": len(rows)}
    if opts.task == "classification":
        if labels is None:
            labels = _label_order(str(r[tgt]) for r in rows)
            if len(labels) < 2:
                raise LmkdError(f"{path} has only one label ({labels[0]!r}); classification needs two or more")
            info["labels"] = labels
        ids = {v: i for i, v in enumerate(labels)}
        unknown = sorted({str(r[tgt]) for r in rows} - set(ids))
        if unknown:
            raise LmkdError(f"{path} has label {unknown[0]!r} that the training data never has; every label "
                            "needs training examples")
        rows = [{"text": str(r[src]), "label": ids[str(r[tgt])]} for r in rows]
    else:
        rows = [{"source": str(r[src]), "target": str(r[tgt])} for r in rows]
        if split == "validation":
            # every student's validation loss is measured against the gold references, whichever
            # column (gold, teacher, inter) it trains on
            rows = [{**r, "teacher": r["target"], "inter": r["target"]} for r in rows]
    _write_jsonl(os.path.join(out, f"{split}.jsonl"), rows)
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)


def _select_transfer_rows(train_file: str, n: int | None, seed: int, out: str) -> None:
    """The transfer set: the training rows (a seeded random sample of ``n``) every student learns
    from -- with the gold targets (baseline, Word-KD) or the teacher's outputs (Seq-KD)."""
    rows = read_jsonl(train_file)
    if n is not None and len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    _write_jsonl(os.path.join(out, "transfer.jsonl"), rows)


# ---- models -------------------------------------------------------------------------------------

# Width/depth fields per config family, for students scaled down from the teacher's config.
_SHAPE_FIELDS = {
    "bart": dict(d="d_model", ffn=("encoder_ffn_dim", "decoder_ffn_dim"),
                 heads=("encoder_attention_heads", "decoder_attention_heads"),
                 layers=("encoder_layers", "decoder_layers")),
    "t5": dict(d="d_model", ffn=("d_ff",), heads=("num_heads",), layers=("num_layers", "num_decoder_layers"),
               kv="d_kv"),
    "bert": dict(d="hidden_size", ffn=("intermediate_size",), heads=("num_attention_heads",),
                 layers=("num_hidden_layers",)),
}
_FAMILY = {**{t: "bart" for t in ("bart", "mbart", "marian", "pegasus", "m2m_100", "plbart", "blenderbot")},
           **{t: "t5" for t in ("t5", "mt5", "umt5")},
           **{t: "bert" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")}}


def _count_on_meta(config, kind: str) -> int:
    import torch

    from .modeling import AUTO_CLASS
    from .student import count_parameters

    with torch.device("meta"):
        return count_parameters(AUTO_CLASS[kind].from_config(config))


def scaled_student_config(teacher, fraction: float):
    """The config of a fresh student with at most ``fraction`` of the teacher's parameters: the
    teacher's config with width (d_model / 2^k, heads and feed-forward scaled alike) and depth
    chosen to give the most parameters within the limit."""
    from .modeling import model_kind
    from .student import count_parameters

    config = teacher.config
    family = _FAMILY.get(config.model_type)
    if family is None:
        raise LmkdError(f"lmkd study cannot scale down a {config.model_type!r} teacher; supported: "
                        f"{', '.join(sorted(_FAMILY))} (or build a student with lmkd make-student and distil it)")
    f = _SHAPE_FIELDS[family]
    kind = model_kind(teacher)
    limit = fraction * count_parameters(teacher)
    d0 = getattr(config, f["d"])
    heads0 = getattr(config, f["heads"][0])
    ffn0 = getattr(config, f["ffn"][0])
    layers0 = max(getattr(config, n) or getattr(config, f["layers"][0]) for n in f["layers"])
    best = None
    for k in range(0, 4):
        d = d0 // (2 ** k)
        if d < 8 or d0 % (2 ** k):
            break
        heads = max(1, heads0 // (2 ** k)) if d % max(1, heads0 // (2 ** k)) == 0 else 1
        for layers in range(1, layers0 + 1):
            cfg = copy.deepcopy(config)
            setattr(cfg, f["d"], d)
            for n in f["heads"]:
                setattr(cfg, n, heads)
            for n in f["ffn"]:
                setattr(cfg, n, max(1, ffn0 // (2 ** k)))
            for n in f["layers"]:
                setattr(cfg, n, layers)
            if "kv" in f:
                setattr(cfg, f["kv"], d // heads)
            if hasattr(cfg, "lmkd_layer_map"):
                del cfg.lmkd_layer_map
            n_params = _count_on_meta(cfg, kind)
            if n_params <= limit and (best is None or n_params > best[0]):
                best = (n_params, cfg)
    if best is None:
        raise LmkdError(f"no student of this teacher's shape fits in {fraction:g} of its parameters (the "
                        "embeddings alone are larger); pass a larger --student-sizes value")
    return best[1]


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices spread from the first to the last (k=1: the first), as Shleifer &
    Rush's shrink-and-fine-tune tables (12 -> 3: 0, 6, 11)."""
    return [0] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def copied_layers_within(teacher, fraction: float) -> dict[str, list[int]] | None:
    """The encoder/decoder layers to copy from a seq2seq teacher (make_student) for the largest
    student within ``fraction`` of its parameters, or None when even one layer each is too big
    (then the study builds a fresh, narrower student)."""
    from .student import count_parameters, stacks_of
    from .modeling import model_kind

    stacks = stacks_of(teacher)
    if set(stacks) != {"encoder", "decoder"}:
        return None
    config = teacher.config
    counts = {name: getattr(config, f) or config.num_layers for name, (_, f) in stacks.items()}
    limit = fraction * count_parameters(teacher)
    best = None
    for ke in range(1, counts["encoder"] + 1):
        for kd in range(1, counts["decoder"] + 1):
            if (ke, kd) == (counts["encoder"], counts["decoder"]):
                continue
            cfg = copy.deepcopy(config)
            setattr(cfg, stacks["encoder"][1], ke)
            setattr(cfg, stacks["decoder"][1], kd)
            n = _count_on_meta(cfg, model_kind(teacher))
            if n <= limit and (best is None or n > best[0]):
                best = (n, {"encoder": _spread(counts["encoder"], ke), "decoder": _spread(counts["decoder"], kd)})
    return best[1] if best else None


def _size_name(fraction: float) -> str:
    return f"s{fraction:g}".replace(".", "")


# ---- generation and evaluation: lmkd.seqkd and lmkd.evaluate -------------------------------------


def make_transfer_set(teacher_dir: str, data_file: str, out: str, beams: int, max_new_tokens: int,
                      max_length: int) -> str:
    """The teacher's beam-search n-best on ``data_file`` (:func:`lmkd.seqkd.generate_pseudo_targets`)
    plus the Seq-Inter choice (:func:`lmkd.seqkd.seq_inter_select`); returns the JSONL path with
    columns source, target (gold), teacher (best beam), inter (closest to the gold of the n-best)."""
    from .seqkd import JSONL_FILE, generate_pseudo_targets, seq_inter_select

    gen_dir = os.path.join(out, "generate")
    report = generate_pseudo_targets(teacher_dir, data=data_file, output_dir=gen_dir, source_column="source",
                                     num_beams=beams, num_return_sequences=beams, max_new_tokens=max_new_tokens,
                                     max_source_length=max_length, batch_size=64, output_format="jsonl")
    rows = read_jsonl(os.path.join(gen_dir, JSONL_FILE))
    if beams > 1:
        chosen, changed = seq_inter_select([r["teacher_nbest"] for r in rows], [r["target"] for r in rows])
    else:
        chosen, changed = [0] * len(rows), 0
    out_rows = [{"source": r["source"], "target": r["target"], "teacher": r["teacher_target"],
                 "inter": r["teacher_nbest"][c] if beams > 1 else r["teacher_target"]}
                for r, c in zip(rows, chosen)]
    path = os.path.join(out, "transfer.jsonl")
    _write_jsonl(path, out_rows)
    with open(os.path.join(out, "generate_report.json"), "w") as f:
        json.dump({**{k: v for k, v in report.items() if k != "output"}, "seq_inter_changed": changed}, f, indent=1)
    shutil.rmtree(gen_dir)
    return path


def evaluate_quality(model_dir: str, task: str, test_file: str, beams: int, max_new_tokens: int) -> dict:
    """Quality of one saved model on the study's test file through :func:`lmkd.evaluate.evaluate_models`:
    greedy and beam search for seq2seq (``{"greedy": {...}, "beam": {...}}``), the scores for
    classification, plus the parameter count.  The same call on the saved model gives the same numbers."""
    from .evaluate import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    modes = [("scores", 1)] if task == "classification" else [("greedy", 1), ("beam", beams)]
    out: dict = {}
    for mode, nb in modes:
        res = evaluate_models({"model": model_dir}, test_file, task, num_beams=nb, max_new_tokens=max_new_tokens,
                              source_column=cols[0], target_column=cols[1], speed_samples=0)
        m = res["models"]["model"]
        out["parameters"] = m["size"]["parameters"]
        out["bytes_on_disk"] = m["size"]["bytes_on_disk"]
        out["examples"] = res["n_examples"]
        if task == "classification":
            out.update(m["quality"])
            out["predictions"] = res["predictions"]["model"]
        else:
            out[mode] = m["quality"]
            out.setdefault("predictions", {})[mode] = res["predictions"]["model"]
            out.setdefault("signatures", {}).update(res["signatures"])
    return out


def measure_models_speed(model_dirs: dict[str, str], task: str, test_file: str, beams: int, max_new_tokens: int,
                         examples: int, repeats: int) -> dict:
    """Latency (batch 1) and throughput of every model, measured side by side in one
    :func:`lmkd.evaluate.evaluate_models` run (beam search for seq2seq)."""
    from .evaluate import evaluate_models

    cols = ("text", "label") if task == "classification" else ("source", "target")
    res = evaluate_models(dict(model_dirs), test_file, task, num_beams=beams, max_new_tokens=max_new_tokens,
                          source_column=cols[0], target_column=cols[1], max_samples=examples * 2,
                          speed_samples=examples * 2, latency_samples=examples, repeats=repeats, batch_size=32,
                          progress=False)
    return {name: m["speed"] for name, m in res["models"].items()}


# ---- training -----------------------------------------------------------------------------------


def _train(out: str, init_dir: str, task: str, train_file: str, validation_file: str, plan: dict, *,
           steps: int, lr: float, target_column: str | None = None, teacher_dir: str | None = None,
           kd_alpha: float = 0.0, seed: int = 42, **config) -> dict:
    """One run of DistillationTrainer (``kd_alpha`` 0: plain training) from ``init_dir`` into ``out``;
    ``config`` adds or overrides DistillationConfig fields (e.g. ``teacher_cache``)."""
    from .config import DistillationConfig, ModelArguments
    from .data import DataArguments
    from .distill import run_distill

    data_task = {"classification": "classification", "mlm": "mlm"}.get(task, "translation")
    if data_task == "translation":
        cols = dict(source_column="source", target_column=target_column or "target")
    elif data_task == "classification":
        cols = dict(source_column="text", target_column="label")
    else:
        cols = dict(source_column="text")
    data_args = DataArguments(task=data_task, train_file=train_file, validation_file=validation_file,
                              max_source_length=plan["max_length"], max_target_length=plan["max_length"], **cols)
    args = DistillationConfig(
        output_dir=out, max_steps=steps, learning_rate=lr, warmup_steps=min(plan["warmup_steps"], steps // 3),
        # constant after warm-up: small from-scratch models learn the target-side language model first
        # and only later use the source; a decaying rate slows them down before that
        lr_scheduler_type="constant_with_warmup", weight_decay=0.01, per_device_train_batch_size=plan["batch_size"],
        per_device_eval_batch_size=64, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=max(1, steps // 5), seed=seed, data_seed=seed, dataloader_num_workers=0,
        # measured on the quick teacher: with length-grouped batches and gradient clipping at 1.0 it still
        # ignored the source after 2000 steps, while random batches without clipping used it after 400
        max_grad_norm=0.0,
        dataloader_pin_memory=False, kd_alpha=kd_alpha, kd_temperature=plan["kd_temperature"],
        teacher_model_name_or_path=teacher_dir if kd_alpha > 0 else None, disable_tqdm=False,
        **config,
    )
    metrics = run_distill(ModelArguments(student_model_name_or_path=init_dir), data_args, args)
    return metrics


def _save(model, tokenizer, out: str) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- the study ----------------------------------------------------------------------------------


def _teacher_stages(st: Stages, opts: StudyOptions, data: dict) -> dict[str, str]:
    """Stages that produce the teacher; returns {"teacher": dir, "teacher-mlm": dir (classification)}."""
    plan = opts.plan
    cls = opts.task == "classification"
    if opts.teacher is not None:
        from .modeling import load_tokenizer

        load_tokenizer(opts.teacher)  # a teacher without a tokenizer is a user mistake: say so now
        given = {"path": os.path.abspath(opts.teacher), "digest": file_digest(opts.teacher)}
        if not cls:
            st.run("teacher", given, [], lambda out: None, "using the given teacher")
            return {"teacher": opts.teacher}
        st.run("teacher-mlm", given, [], lambda out: None, "using the given teacher as the MLM encoder")
        mlm_dir = opts.teacher
    else:
        from .scratch import train_tokenizer

        def tokenizer_fn(out):
            rows = read_jsonl(data["train"])
            texts = [r["text"] for r in rows] if cls else [r["source"] for r in rows] + [r["target"] for r in rows]
            train_tokenizer(texts, vocab_size=plan["vocab_size"]).save_pretrained(out)

        tok_dir = st.run("tokenizer", {"vocab_size": plan["vocab_size"]}, ["data-train"], tokenizer_fn,
                         f"training a {plan['vocab_size']}-token unigram tokenizer")
        arch = "bert" if cls else "bart"
        shape = plan["teacher"]
        teacher_opts = {"arch": arch, "shape": shape, "steps": plan["teacher_mlm_steps" if cls else "teacher_steps"],
                        "lr": plan["teacher_lr"], "batch": plan["batch_size"], "warmup": plan["warmup_steps"],
                        "max_length": plan["max_length"], "seed": opts.seed, "dropout": plan["dropout"]}

        def teacher_fn(out, kind=None):
            from .modeling import load_tokenizer
            from .scratch import build_model

            tok = load_tokenizer(tok_dir)
            init = os.path.join(out, "init")
            model = build_model(arch, len(tok), seed=opts.seed, max_positions=max(256, plan["max_length"] + 2),
                                dropout=plan["dropout"], **shape)
            _save(model, tok, init)
            task = "mlm" if cls else opts.task
            _train(out, init, task, data["train"], data["validation"], plan, steps=teacher_opts["steps"], lr=plan["teacher_lr"], seed=opts.seed)
            shutil.rmtree(init)

        name = "teacher-mlm" if cls else "teacher"
        n = f"{shape['d_model']}-wide, {shape['layers']}{'' if cls else '+' + str(shape['layers'])} layers"
        what = (f"pre-training a BERT-style masked-LM teacher ({n}) for {teacher_opts['steps']} steps" if cls else
                f"training a BART-style teacher ({n}) for {teacher_opts['steps']} steps")
        mlm_dir = st.run(name, teacher_opts, ["tokenizer", "data-train", "data-validation"], teacher_fn, what)
        if not cls:
            return {"teacher": mlm_dir}

    def teacher_cls_fn(out):
        init = os.path.join(out, "init")
        _classifier_from(mlm_dir, data["train_dir"], init)
        _train(out, init, "classification", data["train"], data["validation"], plan, steps=plan["teacher_steps"], lr=plan["teacher_lr"],
               seed=opts.seed)
        shutil.rmtree(init)

    cls_opts = {"steps": plan["teacher_steps"], "lr": plan["teacher_lr"], "batch": plan["batch_size"],
                "warmup": plan["warmup_steps"], "max_length": plan["max_length"], "seed": opts.seed}
    teacher_dir = st.run("teacher", cls_opts, ["teacher-mlm", "data-train", "data-validation"], teacher_cls_fn,
                         f"fine-tuning the teacher classifier for {plan['teacher_steps']} steps")
    return {"teacher": teacher_dir, "teacher-mlm": mlm_dir}


def _classifier_from(encoder_dir: str, data_dir: str, out: str) -> None:
    """Save ``encoder_dir`` as a sequence classifier with the study's label set (a fresh head)."""
    from transformers import AutoModelForSequenceClassification

    from .modeling import load_tokenizer

    with open(os.path.join(data_dir, "info.json")) as f:
        labels = json.load(f)["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)})
    _save(model, load_tokenizer(encoder_dir), out)


def _count_stages(opts: StudyOptions) -> int:
    n_sizes = len(opts.student_sizes)
    given = opts.teacher is not None
    if opts.task == "classification":
        pre = 3 + (0 if given else 1) + 2  # data x3, tokenizer, teacher-mlm, teacher
        per_size = 1 + 3  # init, mlm-distil, distilbert, no-kd
        models = 1 + 2 * n_sizes
    else:
        pre = 3 + (0 if given else 1) + 1 + 2  # data x3, tokenizer, teacher, transfer-rows, transfer
        per_size = 1 + len(SEQ2SEQ_VARIANTS)
        models = 1 + len(SEQ2SEQ_VARIANTS) * n_sizes
    return pre + per_size * n_sizes + models + 2  # evals, speed, report


def run_study(opts: StudyOptions) -> dict:
    """Run (or resume) the study described by ``opts``; return the report dict (also written to
    ``OUTPUT/report.json``)."""
    opts.resolve()
    plan = opts.plan
    os.makedirs(opts.output, exist_ok=True)
    st = Stages(opts.output, _count_stages(opts))
    cls = opts.task == "classification"
    print(f"lmkd study: {opts.task}, budget {opts.budget}, output {opts.output}", flush=True)

    data: dict[str, str] = {}
    labels = None
    for split in ("train", "validation", "test"):
        split_opts = {"task": opts.task, "columns": [opts.source_column, opts.target_column],
                      "file": file_digest(getattr(opts, split)), "rows": plan[f"{split}_rows"]}
        d = st.run(f"data-{split}", split_opts, [] if split == "train" else ["data-train"],
                   lambda out, split=split: _prepare_split(opts, split, out, labels), f"reading the {split} data")
        data[split], data[f"{split}_dir"] = os.path.join(d, f"{split}.jsonl"), d
        if split == "train" and cls:
            with open(os.path.join(d, "info.json")) as f:
                labels = json.load(f)["labels"]
    val_file, test_file = data["validation"], data["test"]

    teachers = _teacher_stages(st, opts, data)
    teacher_dir = teachers["teacher"]
    models: dict[str, dict] = {"teacher": {"dir": teacher_dir, "stage": "teacher", "variant": "teacher",
                                           "size": None}}

    if not cls:
        rows_dir = st.run("transfer-rows", {"rows": plan["transfer_rows"], "seed": opts.seed}, ["data-train"],
                          lambda out: _select_transfer_rows(data["train"], plan["transfer_rows"], opts.seed, out),
                          "choosing the transfer set (the rows every student learns from)")
        rows_file = data["transfer_rows"] = os.path.join(rows_dir, "transfer.jsonl")
        gen_opts = {"beams": plan["beams"], "max_new_tokens": plan["max_new_tokens"]}

        def transfer_fn(out):
            make_transfer_set(teacher_dir, rows_file, out, plan["beams"],
                              plan["max_new_tokens"], plan["max_length"])

        transfer_dir = st.run("transfer", gen_opts, ["teacher", "transfer-rows"], transfer_fn,
                              f"teacher beam search (beam {plan['beams']}) on the transfer set")
        transfer_file = os.path.join(transfer_dir, "transfer.jsonl")

    for fraction in opts.student_sizes:
        size = _size_name(fraction)
        if cls:
            models.update(_classification_students(st, opts, teachers, data, fraction))
            continue

        def init_fn(out, fraction=fraction):
            from .modeling import AUTO_CLASS, load_model, load_tokenizer, model_kind

            import torch

            teacher = load_model(teacher_dir)
            copied = copied_layers_within(teacher, fraction)
            if copied is not None:  # shrink-and-fine-tune: teacher layers fit in the budget
                from .student import make_student

                student = make_student(teacher, encoder_layers=copied["encoder"], decoder_layers=copied["decoder"])
            else:  # a fresh model of the teacher's shape, scaled down
                torch.manual_seed(opts.seed)
                student = AUTO_CLASS[model_kind(teacher)].from_config(scaled_student_config(teacher, fraction))
            _save(student, load_tokenizer(teacher_dir), out)
            with open(os.path.join(out, "init.json"), "w") as f:
                json.dump({"init": "copied teacher layers" if copied else "fresh", "layers": copied}, f)

        init_dir = st.run(f"{size}-init", {"fraction": fraction, "seed": opts.seed, "rule": "copy-if-fits"},
                          ["teacher"], init_fn, f"the student init with <= {fraction:g} of the teacher's parameters")
        student_opts = {"steps": plan["student_steps"], "lr": plan["student_lr"], "batch": plan["batch_size"],
                        "warmup": plan["warmup_steps"], "max_length": plan["max_length"], "seed": opts.seed}
        kd = {"kd_alpha": plan["kd_alpha"], "kd_temperature": plan["kd_temperature"]}
        for variant in SEQ2SEQ_VARIANTS:
            word = "word-kd" in variant
            target = {"baseline": "target", "word-kd": "target", "seq-kd": "teacher", "seq-kd+word-kd": "teacher",
                      "seq-inter": "inter"}[variant]
            data_file = rows_file if target == "target" else transfer_file
            deps = [f"{size}-init", "data-validation"] + (["transfer"] if target != "target" else ["transfer-rows"]) + \
                (["teacher"] if word else [])

            def fn(out, init_dir=init_dir, data_file=data_file, target=target, word=word):
                _train(out, init_dir, opts.task, data_file, val_file, plan, steps=plan["student_steps"],
                       lr=plan["student_lr"], target_column=target, teacher_dir=teacher_dir if word else None,
                       kd_alpha=plan["kd_alpha"] if word else 0.0, seed=opts.seed)

            name = f"{size}-{variant}"
            what = (f"training student {variant}: targets = {target}"
                    + (f", word-level KD alpha {plan['kd_alpha']}" if word else ""))
            stage_dir = st.run(name, {**student_opts, "target": target, **(kd if word else {})}, deps, fn, what)
            models[name] = {"dir": stage_dir, "stage": name, "variant": variant, "size": fraction}

    # ---- evaluation, speed, report
    eval_opts = {"beams": plan["beams"], "max_new_tokens": plan["max_new_tokens"], "evaluate": "evaluate_models"}
    results: dict[str, dict] = {}
    for name, m in models.items():
        def eval_fn(out, m=m):
            res = evaluate_quality(m["dir"], opts.task, test_file, plan["beams"], plan["max_new_tokens"])
            with open(os.path.join(out, "quality.json"), "w") as f:
                json.dump(res, f, indent=1)

        ed = st.run(f"eval-{name}", eval_opts, [m["stage"], "data-test"], eval_fn, f"evaluating {name} on the test set")
        with open(os.path.join(ed, "quality.json")) as f:
            results[name] = json.load(f)

    speed_opts = {"beams": plan["beams"], "max_new_tokens": plan["max_new_tokens"],
                  "examples": plan["speed_examples"], "repeats": plan["speed_repeats"]}

    def speed_fn(out):
        res = measure_models_speed({n: m["dir"] for n, m in models.items()}, opts.task, test_file, plan["beams"],
                                   plan["max_new_tokens"], plan["speed_examples"], plan["speed_repeats"])
        with open(os.path.join(out, "speed.json"), "w") as f:
            json.dump(res, f, indent=1)

    sd = st.run("speed", speed_opts, [m["stage"] for m in models.values()] + ["data-test"], speed_fn,
                f"measuring the speed of {len(models)} models side by side")
    with open(os.path.join(sd, "speed.json")) as f:
        speed = json.load(f)

    report = build_report(opts, models, results, speed, data)

    def report_fn(out):
        write_report(report, out)

    rd = st.run("report", {"v": 1}, [f"eval-{n}" for n in models] + ["speed"], report_fn, "writing the report")
    for fname in ("report.md", "report.json", "report.png"):
        shutil.copyfile(os.path.join(rd, fname), os.path.join(opts.output, fname))
    with open(os.path.join(opts.output, "report.md")) as f:
        table = f.read()
    print("\n" + table, flush=True)
    print(f"lmkd study: finished in {_fmt(time.time() - st.start)}; report in {opts.output}/report.md", flush=True)
    return report


def _classification_students(st: Stages, opts: StudyOptions, teachers: dict, data: dict,
                             fraction: float) -> dict[str, dict]:
    """DistilBERT path (MLM-distil a layer-copied student, then fine-tune) vs plain fine-tuning of the
    same init, for one student size (``fraction`` of the teacher's layers, evenly spaced)."""
    from .student import every_other

    plan = opts.plan
    size = _size_name(fraction)
    mlm_dir = teachers["teacher-mlm"]
    train_file, val_file = data["train"], data["validation"]

    def init_fn(out):
        from .modeling import load_model, load_tokenizer
        from .student import make_student

        teacher = load_model(mlm_dir, kind="mlm")
        n = teacher.config.num_hidden_layers
        keep = max(1, round(n * fraction))
        layers = every_other(n) if keep == len(every_other(n)) else \
            sorted({round(i * (n - 1) / max(1, keep - 1)) for i in range(keep)})
        _save(make_student(teacher, layers=layers), load_tokenizer(mlm_dir), out)

    init_dir = st.run(f"{size}-init", {"fraction": fraction}, ["teacher-mlm"], init_fn,
                      f"a student of {fraction:g} of the teacher's layers (copied, DistilBERT-style)")
    common = {"lr": plan["student_lr"], "batch": plan["batch_size"], "warmup": plan["warmup_steps"],
              "max_length": plan["max_length"], "seed": opts.seed}

    def mlm_fn(out):
        _train(out, init_dir, "mlm", train_file, val_file, plan, steps=plan["student_steps"], lr=plan["student_lr"],
               teacher_dir=mlm_dir, kd_alpha=plan["kd_alpha"], seed=opts.seed)

    mlm_opts = {**common, "steps": plan["student_steps"], "kd_alpha": plan["kd_alpha"],
                "kd_temperature": plan["kd_temperature"]}
    distil_dir = st.run(f"{size}-mlm-distil", mlm_opts, [f"{size}-init", "teacher-mlm", "data-train",
                                                         "data-validation"], mlm_fn,
                        f"MLM-distilling the student from the teacher (alpha {plan['kd_alpha']})")
    out_models = {}
    for variant, start, dep in (("distilbert", distil_dir, f"{size}-mlm-distil"), ("no-kd", init_dir, f"{size}-init")):
        def fn(out, start=start):
            init = os.path.join(out, "init")
            _classifier_from(start, data["train_dir"], init)
            _train(out, init, "classification", train_file, val_file, plan, steps=plan["student_steps"],
                   lr=plan["student_lr"], seed=opts.seed)
            shutil.rmtree(init)

        name = f"{size}-{variant}"
        d = st.run(name, {**common, "steps": plan["student_steps"]}, [dep, "data-train", "data-validation"], fn,
                   f"fine-tuning the {variant} student on the labels")
        out_models[name] = {"dir": d, "stage": name, "variant": variant, "size": fraction}
    return out_models


# ---- report -------------------------------------------------------------------------------------


def _main_metric(task: str) -> tuple[str, list[tuple[str, str]]]:
    """(headline metric key, [(column label, key path)])."""
    if task == "classification":
        return "accuracy", [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    if task == "summarization":
        return "beam.rouge2", [("ROUGE-2 greedy", "greedy.rouge2"), ("ROUGE-L greedy", "greedy.rougeL"),
                               ("ROUGE-2 beam", "beam.rouge2"), ("ROUGE-L beam", "beam.rougeL")]
    return "beam.bleu", [("BLEU greedy", "greedy.bleu"), ("chrF greedy", "greedy.chrf"),
                         ("BLEU beam", "beam.bleu"), ("chrF beam", "beam.chrf")]


def _get(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def build_report(opts: StudyOptions, models: dict, results: dict, speed: dict, data: dict) -> dict:
    plan = opts.plan
    main, cols = _main_metric(opts.task)
    t_params = results["teacher"]["parameters"]
    t_lat = speed["teacher"]["latency_ms"]
    t_score = _get(results["teacher"], main)
    info = {}
    for split in ("train", "validation", "test"):
        with open(os.path.join(data[f"{split}_dir"], "info.json")) as f:
            split_info = json.load(f)
        info[f"{split}_rows"] = split_info["rows"]
        if "labels" in split_info:
            info["labels"] = split_info["labels"]
    if "transfer_rows" in data:
        info["transfer_rows"] = len(read_jsonl(data["transfer_rows"]))
    rows = []
    for name, m in models.items():
        r = results[name]
        sp = speed[name]
        rows.append({
            "model": name, "variant": m["variant"], "size": m["size"], "path": os.path.abspath(m["dir"]),
            "parameters": r["parameters"], "parameters_vs_teacher": r["parameters"] / t_params,
            "quality": {k: v for k, v in r.items() if k not in ("parameters", "predictions")},
            "main_metric": main, "score": _get(r, main),
            "score_vs_teacher": (_get(r, main) / t_score) if t_score else None,
            "latency_ms": sp["latency_ms"], "throughput_per_s": sp["throughput_per_s"],
            "speedup": t_lat / sp["latency_ms"] if sp["latency_ms"] else None,
        })
    return {"task": opts.task, "budget": opts.budget, "plan": plan,
            "data": {"train": opts.train, "validation": opts.validation, "test": opts.test, **info},
            "teacher": opts.teacher or "trained from scratch", "columns": [c for c, _ in cols],
            "column_keys": [k for _, k in cols], "speed_setup": {k: v for k, v in speed["teacher"].items()
                                                               if k not in ("latency_ms", "throughput_per_s")},
            "rows": rows}


def report_markdown(report: dict) -> str:
    cols = report["columns"]
    keys = report["column_keys"]
    main_label = cols[keys.index(report["rows"][0]["main_metric"])]
    head = ["model", "params", "size"] + cols + ["latency ms", "speed-up", f"{main_label} vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        vals = [r["model"], f"{r['parameters'] / 1e6:.2f}M", f"{r['parameters_vs_teacher']:.0%}"]
        vals += [f"{_get(r['quality'], k):.1f}" for k in keys]
        vals += [f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x",
                 f"{r['score_vs_teacher']:.0%}" if r["score_vs_teacher"] is not None else "-"]
        lines.append("| " + " | ".join(vals) + " |")
    plan = report["plan"]
    d = report["data"]
    sp = report["speed_setup"]
    notes = [
        f"# lmkd study: {report['task']} ({report['budget']} budget)", "",
        "\n".join(lines), "",
        f"Teacher: {report['teacher']}. Data: {d.get('train_rows')} training rows"
        + (f" ({d['transfer_rows']} in the transfer set every student learns from)" if "transfer_rows" in d else "")
        + f", {d.get('validation_rows')} validation, {d.get('test_rows')} test rows.",
        f"Students: {plan['student_steps']} steps each, batch {plan['batch_size']}, lr {plan['student_lr']}; "
        f"word-level KD alpha {plan['kd_alpha']}, temperature {plan['kd_temperature']}."
        + ("" if report["task"] == "classification" else f" Beam size {plan['beams']}."),
        f"Latency: ms per example at batch size 1 ({'beam search' if report['task'] != 'classification' else 'forward'}), "
        f"median of {sp.get('repeats')} rounds over {sp.get('latency_examples')} examples, models interleaved; "
        "speed-up = teacher latency / model latency.",
    ]
    return "\n".join(notes) + "\n"


def write_report(report: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(report))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        ax.scatter(r["latency_ms"], r["score"], s=40, color="black" if r["model"] == "teacher" else "tab:blue")
        ax.annotate(r["model"], (r["latency_ms"], r["score"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("latency (ms per example, batch 1)")
    ax.set_ylabel(report["columns"][report["column_keys"].index(report["rows"][0]["main_metric"])])
    ax.set_title(f"lmkd study: {report['task']} ({report['budget']} budget)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report.png"), dpi=120)
    plt.close(fig)


__all__ = ["BUDGETS", "StudyOptions", "StudyStopped", "run_study", "shipped_corpus"]

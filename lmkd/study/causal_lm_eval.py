"""What the causal-LM study measures of a model: its greedy responses to prompts
(:func:`generate_responses`), the teacher check against trivial floors (:func:`check_causal_teacher`),
the evaluation of every model on the test rows (:func:`evaluate_causal`: ROUGE-L and chrF of its greedy
responses, perplexity of the gold responses, fidelity to the teacher) and the speed of all of them
side by side (:func:`causal_speed`); the Seq-KD transfer set (:func:`transfer_stage`) and the stopping
rule's validation score (:class:`ResponseScore`) generate with it too."""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import Counter

import torch
from transformers import TrainerCallback

from lmkd.core.io import atomic_write_json, read_rows, write_jsonl
from lmkd.study.causal_lm_data import PadCollator, encode_rows, pad_id_of, prompt_ids
from lmkd.study.checks import QUALITY_MARGIN, SOURCE_USE_MARGIN
from lmkd.study.plan import Plan, plan_view

#: the metric the causal-LM study's students stop on, its check and its verdicts run on
CAUSAL_METRIC = "rougeL"


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    prompt_tokens: int,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 32,
) -> list[str]:
    """The model's responses to ``prompts`` (greedy, or beam search with ``num_beams``), in order:
    each prompt as :func:`~lmkd.study.causal_lm_data.prompt_ids` makes it, left-padded, decoded up to the
    first EOS without special tokens.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        prompts: the prompts' texts.
        prompt_tokens: the prompts' cut.
        max_new_tokens: the longest response.
        num_beams: 1 (greedy) or the beam size.
        batch_size: prompts per generate call.

    Returns:
        One response per prompt.
    """
    from lmkd.models.loop_rules import eos_token_ids, trim_at_eos

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    eos = eos_token_ids(model) | {tokenizer.eos_token_id}
    ids = [prompt_ids(tokenizer, p, prompt_tokens) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        inp = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for k, i in enumerate(chunk):
            inp[k, width - len(ids[i]) :], att[k, width - len(ids[i]) :] = torch.tensor(ids[i]), 1
        gen = model.generate(
            input_ids=inp.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            pad_token_id=pad,
            eos_token_id=sorted(eos),
        )
        for k, i in enumerate(chunk):
            new = trim_at_eos(gen[k, width:].tolist(), eos, pad)
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    if was_training:
        model.train()
    return out


def token_batches(tokenizer, rows: list[dict], plan: Plan | dict, batch_size: int = 32):
    """The rows' encoded examples (the loss on the response only) in padded batches, for
    :func:`lmkd.evaluate.fidelity.score_tokens`.

    Args:
        tokenizer: the tokenizer.
        rows: ``prompt``/``completion`` rows.
        plan: the study's plan (its ``max_length`` and ``max_new_tokens`` cut prompts and responses).
        batch_size: rows per batch.

    Returns:
        The list of batches.
    """
    from lmkd.data.tokenizing import PROMPT_LENGTH

    view = plan_view(plan)
    enc = encode_rows(tokenizer, rows, view.max_length, view.max_new_tokens)
    enc = [{k: v for k, v in e.items() if k != PROMPT_LENGTH} for e in enc]
    collate = PadCollator(pad_id_of(tokenizer))
    return [collate(enc[i : i + batch_size]) for i in range(0, len(enc), batch_size)]


def trivial_floors(train_rows: list[dict], rows: list[dict]) -> dict[str, float]:
    """ROUGE-L of the answers that need no model: copying the first words of the input (as many as
    the median training response has) and repeating the most frequent training response.

    Args:
        train_rows: the training rows.
        rows: the rows scored.

    Returns:
        ``{answer: ROUGE-L}``.
    """
    from lmkd.scoring.metrics import rouge

    words = int(statistics.median(len(r["completion"].split()) for r in train_rows)) or 1
    refs = [r["completion"] for r in rows]
    frequent = Counter(r["completion"] for r in train_rows).most_common(1)[0][0]
    copied = [" ".join(r["source"].split()[:words]) for r in rows]
    return {
        f"copying the first {words} words of the input": rouge(copied, refs)[CAUSAL_METRIC],
        "the most frequent response": rouge([frequent] * len(rows), refs)[CAUSAL_METRIC],
    }


def check_causal_teacher(
    model_dir: str,
    train_rows: list[dict],
    validation_rows: list[dict],
    plan: Plan | dict,
    *,
    rows: int,
    seed: int,
) -> dict:
    """The causal teacher's check on (up to ``rows``) validation rows: the ROUGE-L of its greedy
    responses must be ``QUALITY_MARGIN`` points above the trivial floors (:func:`trivial_floors`), and
    it must use its prompt -- its cross-entropy on the gold responses must rise by
    ``SOURCE_USE_MARGIN`` nats per token when the prompts are shuffled among the rows.

    Args:
        model_dir: the teacher.
        train_rows: the training rows (the floors).
        validation_rows: the validation rows.
        plan: the study's plan (lengths).
        rows: how many validation rows to score.
        seed: the seed of the shuffle.

    Returns:
        ``metric``, ``score``, ``floors``, ``floor``, ``floor_name``, ``ce_real_sources``,
        ``ce_shuffled_sources``, ``passed`` and ``reasons`` (the fields of lmkd.study.checks).
    """
    from lmkd.evaluate.fidelity import score_tokens
    from lmkd.models.loading import load_model, load_tokenizer
    from lmkd.scoring.metrics import rouge

    view = plan_view(plan)
    val = validation_rows[:rows]
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    hyps = generate_responses(
        model, tok, [r["prompt"] for r in val], view.max_length, view.max_new_tokens
    )
    out: dict = {
        "metric": CAUSAL_METRIC,
        "rows": len(val),
        "quality_margin": QUALITY_MARGIN,
        "score": rouge(hyps, [r["completion"] for r in val])[CAUSAL_METRIC],
        "distinct_outputs": len(set(hyps)) / max(len(hyps), 1),
        "floors": trivial_floors(train_rows, val),
    }
    order = list(range(len(val)))
    rng = random.Random(seed)
    while len(val) > 1 and any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    shuffled = [{**r, "prompt": val[j]["prompt"]} for r, j in zip(val, order)]

    def ce(rows_):
        return score_tokens({"m": model}, token_batches(tok, rows_, plan), "causal-lm")["m"]["ce"]

    out["ce_real_sources"], out["ce_shuffled_sources"] = ce(val), ce(shuffled)
    out["source_use_margin"] = SOURCE_USE_MARGIN
    out["floor_name"], out["floor"] = max(out["floors"].items(), key=lambda kv: kv[1])
    reasons = []
    if out["score"] < out["floor"] + QUALITY_MARGIN:
        reasons.append(
            f"ROUGE-L {out['score']:.1f} on validation is not {QUALITY_MARGIN:g} above "
            f"{out['floor']:.1f} for {out['floor_name']}"
        )
    if out["ce_shuffled_sources"] - out["ce_real_sources"] < SOURCE_USE_MARGIN:
        reasons.append(
            f"it ignores the prompt (cross-entropy {out['ce_real_sources']:.2f} with the real prompts "
            f"vs {out['ce_shuffled_sources']:.2f} with shuffled ones)"
        )
    out["passed"], out["reasons"] = not reasons, reasons
    return out


def check_summary(check: dict) -> str:
    """The check in one sentence for the report.

    Args:
        check: :func:`check_causal_teacher`'s figures.

    Returns:
        The sentence.
    """
    if check.get("skipped"):
        return "not checked (--skip-teacher-check)"
    return (
        f"ROUGE-L {check['score']:.1f} on {check['rows']} validation rows vs {check['floor']:.1f} for "
        f"{check['floor_name']}; cross-entropy of the gold responses {check['ce_real_sources']:.2f} "
        f"with the real prompts vs {check['ce_shuffled_sources']:.2f} shuffled"
        + (": passed" if check["passed"] else ": FAILED (" + "; ".join(check["reasons"]) + ")")
    )


def evaluate_causal(
    out: str, model_dir: str, teacher_dir: str, test_file: str, plan: Plan | dict
) -> None:
    """An evaluation stage (``quality.json``): on the test rows, the ROUGE-1/2/L and chrF of the model's
    greedy responses against the gold ones, the perplexity of the gold responses (their tokens and
    EOS only) and, against the teacher on those tokens, top-1 agreement and KL(teacher || model) per
    token (:func:`lmkd.evaluate.fidelity.score_tokens`), the parameters and bytes on disk.

    Args:
        out: the stage's directory.
        model_dir: the model.
        teacher_dir: the teacher (fidelity).
        test_file: the test rows.
        plan: the study's plan (or its dict).
    """
    from lmkd.evaluate.fidelity import score_tokens
    from lmkd.models.loading import load_model, load_tokenizer
    from lmkd.models.size import count_parameters, weights_bytes
    from lmkd.scoring.metrics import chrf, rouge

    view = plan_view(plan)
    rows = read_rows(test_file)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    hyps = generate_responses(
        model, tok, [r["prompt"] for r in rows], view.max_length, view.max_new_tokens
    )
    refs = [r["completion"] for r in rows]
    scores = {**rouge(hyps, refs), "chrf": chrf(hyps, refs)[0]}
    models = {"model": model}
    if os.path.abspath(teacher_dir) != os.path.abspath(model_dir):
        models["teacher"] = load_model(teacher_dir)
    else:
        models = {"teacher": model}
    tokens = score_tokens(models, token_batches(tok, rows, plan), "causal-lm", teacher="teacher")
    mine = tokens["model" if "model" in tokens else "teacher"]
    atomic_write_json(
        os.path.join(out, "quality.json"),
        {
            "parameters": count_parameters(model),
            "bytes_on_disk": weights_bytes(model_dir),
            "examples": len(rows),
            "greedy": scores,
            **{
                k: mine[k]
                for k in ("tokens", "ce", "perplexity", "top1_agreement", "kl_to_teacher")
            },
            "predictions": {"greedy": hyps},
        },
    )


@torch.inference_mode()
def causal_speed(model_dirs: dict[str, str], test_file: str, plan: Plan | dict) -> dict:
    """The models' decoding speed, side by side: in each of ``speed_repeats`` rounds every model in turn
    decodes the first ``speed_examples`` test prompts one at a time, forced to ``max_new_tokens`` new
    tokens (ms per token: the architecture's speed, not its responses' length); the median round.

    Args:
        model_dirs: ``{name: model dir}``.
        test_file: the test rows.
        plan: the study's plan (or its dict).

    Returns:
        ``{name: {"ms_per_token", "rounds_ms_per_token"}}``.
    """
    from lmkd.models.loading import load_model, load_tokenizer

    view = plan_view(plan)
    prompts = [r["prompt"] for r in read_rows(test_file)[: view.speed_examples]]
    loaded = {n: (load_model(d).eval(), load_tokenizer(d)) for n, d in model_dirs.items()}
    n_new = view.max_new_tokens

    def one_round(model, tok) -> float:
        t0 = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([prompt_ids(tok, p, view.max_length)])
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=pad_id_of(tok),
            )
        return 1000 * (time.perf_counter() - t0) / (len(prompts) * n_new)

    for model, tok in loaded.values():  # warm-up
        one_round(model, tok)
    rounds: dict[str, list[float]] = {n: [] for n in loaded}
    for _ in range(view.speed_repeats):
        for n, (model, tok) in loaded.items():
            rounds[n].append(one_round(model, tok))
    return {
        n: {"ms_per_token": statistics.median(r), "rounds_ms_per_token": r}
        for n, r in rounds.items()
    }


def transfer_stage(out: str, teacher_dir: str, train_file: str, plan: Plan | dict) -> None:
    """Seq-KD's transfer set: the teacher's beam response (``plan.beams``) to every training prompt,
    in the column ``teacher`` beside the gold ``completion``.

    Args:
        out: the stage's directory.
        teacher_dir: the teacher.
        train_file: the training rows.
        plan: the study's plan (or its dict).
    """
    from lmkd.models.loading import load_model, load_tokenizer

    view = plan_view(plan)
    rows = read_rows(train_file)
    model, tok = load_model(teacher_dir), load_tokenizer(teacher_dir)
    hyps = generate_responses(
        model, tok, [r["prompt"] for r in rows], view.max_length, view.max_new_tokens, view.beams
    )
    write_jsonl(
        os.path.join(out, "transfer.jsonl"), [{**r, "teacher": h} for r, h in zip(rows, hyps)]
    )
    same = sum(h.strip() == r["completion"].strip() for r, h in zip(rows, hyps))
    atomic_write_json(os.path.join(out, "memorisation.json"), {"identical": same / len(rows)})


class ResponseScore(TrainerCallback):
    """A transformers callback: at each evaluation, the model's greedy responses to the validation
    prompts scored by ROUGE-L against the gold responses, added to the evaluation's metrics as
    ``eval_rougeL`` before :class:`~lmkd.study.stopping.PlateauStopping` (the next callback) reads
    them -- seq2seq studies get the same figure from ``predict_with_generate``.

    Args:
        tokenizer: the student's tokenizer.
        rows: the validation rows (``prompt``, ``completion``).
        prompt_tokens: the prompts' cut.
        max_new_tokens: the longest response.
    """

    def __init__(self, tokenizer, rows: list[dict], prompt_tokens: int, max_new_tokens: int):
        self.tokenizer, self.rows = tokenizer, rows
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """Add ``eval_rougeL`` to ``metrics``.

        Args:
            args: the Trainer's arguments (transformers.TrainerCallback's signature).
            state: the Trainer's state.
            control: the Trainer's control flags.
            metrics: the evaluation's metrics (updated in place).
            model: the model evaluated.
            **kwargs: the callback's other arguments.
        """
        from lmkd.scoring.metrics import rouge

        if metrics is None or model is None:
            return
        hyps = generate_responses(
            model,
            self.tokenizer,
            [r["prompt"] for r in self.rows],
            self.prompt_tokens,
            self.max_new_tokens,
        )
        model.train()
        metrics["eval_rougeL"] = rouge(hyps, [r["completion"] for r in self.rows])["rougeL"]

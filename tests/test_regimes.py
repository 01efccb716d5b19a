"""lmkd.train.regimes: unlabelled transfer sets, teacher ensembles, born-again rounds, co-distillation
and on-policy KD -- each checked against a hand computation or an independent run."""

import copy
import json

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml

from lmkd import DistillationConfig, DistillationTrainer, LmkdError, losses
from lmkd.cli import main
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.tokenizing import tokenize
from lmkd.models.scratch import build_model
from lmkd.teacher.ensemble import EnsembleTeacher
from lmkd.train.regimes import (
    LABELLED,
    ON_POLICY,
    CoDistillationTrainer,
    CohortModel,
    OnPolicyDistillationTrainer,
    RegimeTrainer,
    TransferCollator,
    add_transfer_set,
)


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        kd_alpha=0.5,
        kd_temperature=2.0,
        seed=0,
        disable_tqdm=True,
        warmup_steps=0,
        kd_chunk_size=0,
    )
    base.update(kw)
    return DistillationConfig(**base)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_yaml(path, **keys):
    path.write_text("# lmkd distill " + str(path) + "\n" + yaml.safe_dump(keys))
    return str(path)


def distill(tmp_path, name, *overrides, **keys):
    """`lmkd distill NAME.yaml [--key value ...]` with the keys written to a YAML file."""
    keys = dict(dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True), **keys)
    return main(["distill", write_yaml(tmp_path / f"{name}.yaml", **keys), *overrides])


def lm_dataset(rows, tokenizer, task="causal-lm"):
    return tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in rows]),
        tokenizer,
        DataArguments(task=task, train_file="-"),
    )


def kl_to_teacher(student, teacher, batch, tau=1.0):
    """Mean KL(teacher || student) per example of a classification batch."""
    student.eval(), teacher.eval()
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s, t = student(**fwd).logits, teacher(**fwd).logits
    return float(losses.forward_kl(s, t, temperature=tau)) / s.shape[0]


# ---- unlabelled transfer sets ----------------------------------------------------------------------


def confident_classifier_pair(tmp_path, tokenizer):
    teacher = build_model(
        "bert", len(tokenizer), kind="classification", seed=1, layers=2, dropout=0.0
    )
    with torch.no_grad():
        teacher.classifier.weight *= (
            40  # a confident teacher, far from the student's near-uniform outputs
        )
    student = build_model(
        "bert", len(tokenizer), kind="classification", seed=2, layers=1, dropout=0.0
    )
    return (
        teacher,
        student,
        save(teacher, tokenizer, tmp_path / "t"),
        save(student, tokenizer, tmp_path / "s"),
    )


def test_kd_only_on_unlabelled_data_moves_student_to_teacher(tmp_path, tokenizer, corpus, capsys):
    """kd_alpha 1 on classification data whose label column is garbage (it would fail if read):
    training runs, logs no CE, and the student's KL to the teacher on the transfer rows falls.
    (Measured on held-out rows it passed with the unigram test tokenizer and not with BPE: 6 steps
    on 32 rows do not generalise reliably; the rows distilled on are what KD must move.)"""
    teacher, student, tdir, sdir = confident_classifier_pair(tmp_path, tokenizer)
    rows = [{"text": r["source"], "label": "not-a-label"} for r in corpus[:32]]
    train = write_jsonl(tmp_path / "unlabelled.jsonl", rows)
    held = tokenize(
        datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:32]]),
        tokenizer,
        DataArguments(task="classification", train_file="-"),
        labelled=False,
    )
    batch = collator_for("classification", tokenizer)([held[i] for i in range(len(held))])
    before = kl_to_teacher(student, teacher, batch)
    out = tmp_path / "out"
    assert (
        distill(
            tmp_path,
            "kd",
            student_model_name_or_path=sdir,
            teacher_model_name_or_path=tdir,
            task="classification",
            train_file=train,
            target_column="label",
            output_dir=str(out),
            kd_alpha=1.0,
            kd_temperature=1.0,
            max_steps=6,
            learning_rate=1e-2,
            per_device_train_batch_size=8,
            logging_steps=1,
            warmup_steps=0,
        )
        == 0
    )
    trained = type(student).from_pretrained(out)
    after = kl_to_teacher(trained, teacher, batch)
    assert after < 0.7 * before, (before, after)
    logs = capsys.readouterr().err  # (the per-step logs: stderr, stdout is the JSON)
    assert "'loss_kd'" in logs and "'loss_ce'" not in logs


def test_kd_only_on_data_without_a_label_column(tmp_path, tokenizer, corpus, capsys):
    teacher, student, tdir, sdir = confident_classifier_pair(tmp_path, tokenizer)
    train = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["source"]} for r in corpus[:8]])
    keys = dict(
        student_model_name_or_path=sdir,
        teacher_model_name_or_path=tdir,
        task="classification",
        train_file=train,
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        logging_steps=1,
    )
    assert distill(tmp_path, "kd", kd_alpha=1.0, **keys) == 0
    trained = type(student).from_pretrained(tmp_path / "out")
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in student.state_dict().items())
    logs = capsys.readouterr().err
    assert "'loss_kd'" in logs and "'loss_ce'" not in logs
    # with CE in the loss the label column is needed, and its absence is a one-line error
    assert (
        distill(tmp_path, "ce", kd_alpha=0.5, **dict(keys, output_dir=str(tmp_path / "out-ce")))
        == 2
    )
    assert "has no column 'label'" in capsys.readouterr().err


def mixed_data(tokenizer, corpus, task):
    """3 labelled + 3 unlabelled rows (tagged by add_transfer_set), and the wrapped collator."""
    from lmkd.core.constants import TASK_KIND

    args = DataArguments(task=task, train_file="-")
    if task == "classification":
        lab = datasets.Dataset.from_list(
            [{"text": r["source"], "label": i % 2} for i, r in enumerate(corpus[:3])]
        )
    else:
        lab = datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[:3]])
    train = tokenize(lab, tokenizer, args)
    raw = datasets.Dataset.from_list([{"text": r["source"]} for r in corpus[3:6]])
    ds = add_transfer_set(train, raw, args, tokenizer)
    assert ds[LABELLED] == [1, 1, 1, 0, 0, 0]
    return ds, TransferCollator(collator_for(task, tokenizer, seed=0), TASK_KIND[task])


def test_transfer_mix_classification_ce_on_labelled_rows_only(tmp_path, tokenizer, corpus):
    teacher = build_model("bert", len(tokenizer), kind="classification", seed=1, layers=2)
    student = build_model("bert", len(tokenizer), kind="classification", seed=2, layers=1)
    teacher.eval(), student.eval()
    ds, collator = mixed_data(tokenizer, corpus, "classification")
    batch = collator([ds[i] for i in range(6)])
    assert (
        batch["labels"].tolist()[3:] == [-100] * 3
        and batch[LABELLED].tolist() == [True] * 3 + [False] * 3
    )
    trainer = RegimeTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=0.3, per_device_train_batch_size=6),
        teacher_model=teacher,
        train_dataset=ds,
        data_collator=collator,
    )
    # the flag survives the Trainer's remove_unused_columns into its batches
    assert int(next(iter(trainer.get_train_dataloader()))[LABELLED].sum()) == 3
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        fwd = {k: v for k, v in batch.items() if k not in ("labels", LABELLED)}
        s, t = student(**fwd).logits, teacher(**fwd).logits
    ce = F.cross_entropy(s[:3], batch["labels"][:3])  # mean over the 3 labelled rows
    kd = losses.forward_kl(s, t, temperature=2.0) / 6  # all 6 rows
    assert torch.allclose(got, 0.7 * ce + 0.3 * kd, rtol=1e-5), (got, 0.7 * ce + 0.3 * kd)


@pytest.mark.parametrize("arch,task", [("gpt2", "causal-lm"), ("bert", "mlm")])
def test_transfer_mix_lm_kd_covers_unlabelled_tokens(tmp_path, tokenizer, corpus, arch, task):
    teacher = build_model(arch, len(tokenizer), seed=1, layers=2)
    student = build_model(arch, len(tokenizer), seed=2, layers=1)
    teacher.eval(), student.eval()
    ds, collator = mixed_data(tokenizer, corpus, task)
    batch = collator([ds[i] for i in range(6)])
    trainer = RegimeTrainer(
        model=student, args=config(tmp_path, kd_alpha=0.4), teacher_model=teacher
    )
    shift = 1 if task == "causal-lm" else 0
    att = batch["attention_mask"][:, shift:].bool()
    labels = batch["labels"][:, shift:]
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        fwd = {k: v for k, v in batch.items() if k not in ("labels", LABELLED)}
        s, t = student(**fwd).logits, teacher(**fwd).logits
        s, t = (s[:, :-1], t[:, :-1]) if shift else (s, t)
    assert (labels[3:] == -100).all() and (
        labels[:3] != -100
    ).any()  # no CE targets on unlabelled rows
    ce_mask = labels != -100
    ce = F.cross_entropy(s[ce_mask], labels[ce_mask])
    kd = losses.forward_kl(s, t, att, temperature=2.0) / att.sum()  # every real token, all 6 rows
    assert torch.allclose(got, 0.6 * ce + 0.4 * kd, rtol=1e-5)


def test_transfer_file_through_cli_never_reads_its_labels(tmp_path, tokenizer, corpus):
    teacher = build_model("bert", len(tokenizer), kind="classification", seed=1, layers=2)
    student = build_model("bert", len(tokenizer), kind="classification", seed=2, layers=1)
    tdir, sdir = save(teacher, tokenizer, tmp_path / "t"), save(student, tokenizer, tmp_path / "s")
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": r["source"], "label": i % 2} for i, r in enumerate(corpus[:8])],
    )
    transfer = write_jsonl(
        tmp_path / "transfer.jsonl",
        [{"text": r["source"], "label": "poison"} for r in corpus[8:24]],
    )
    out = tmp_path / "out"
    keys = dict(
        student_model_name_or_path=sdir,
        teacher_model_name_or_path=tdir,
        task="classification",
        train_file=train,
        transfer_file=transfer,
        output_dir=str(out),
        kd_alpha=0.5,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        logging_steps=1,
    )
    assert distill(tmp_path, "mix", **keys) == 0
    results = json.loads((out / "distill_results.json").read_text())
    # one epoch saw 8 labelled + 16 unlabelled rows
    assert round(results["train_samples_per_second"] * results["train_runtime"]) == 24, results
    # seq2seq transfer sets need `lmkd generate`: a one-line error
    keys.update(
        task="translation",
        source_column="text",
        target_column="label",
        output_dir=str(tmp_path / "o2"),
    )
    assert distill(tmp_path, "mix2", **keys) == 2


# ---- teacher ensembles -----------------------------------------------------------------------------


@pytest.fixture()
def causal_batch(tokenizer, corpus):
    ds = lm_dataset(corpus[:4], tokenizer)
    return collator_for("causal-lm", tokenizer)([ds[i] for i in range(4)])


@pytest.mark.parametrize("chunk", [0, -1])
def test_ensemble_of_identical_teachers_is_the_single_teacher(
    tmp_path, tokenizer, causal_batch, chunk
):
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    teacher.eval(), student.eval()
    args = config(tmp_path, kd_alpha=0.7, kd_temperature=3.0, kd_chunk_size=chunk)
    single = DistillationTrainer(model=student, args=args, teacher_model=teacher)
    pair = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=EnsembleTeacher([teacher, copy.deepcopy(teacher)], temperature=3.0),
    )
    with torch.no_grad():
        a = single.compute_loss(student, causal_batch)
        b = pair.compute_loss(student, causal_batch)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a, b)


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl"])
def test_ensemble_targets_the_weighted_average_distribution(
    tmp_path, tokenizer, causal_batch, kd_loss
):
    t1 = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    t2 = build_model("gpt2", len(tokenizer), seed=3, layers=2)
    student = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    for m in (t1, t2, student):
        m.eval()
    tau = 2.0
    trainer = RegimeTrainer(
        model=student,
        args=config(tmp_path, kd_alpha=1.0, kd_temperature=tau, kd_loss=kd_loss),
        teacher_model=EnsembleTeacher([t1, t2], [3, 1], temperature=tau),
    )
    with torch.no_grad():
        got = trainer.compute_loss(student, causal_batch)
        s = student(**causal_batch).logits[:, :-1]
        p1 = torch.softmax(t1(**causal_batch).logits[:, :-1] / tau, -1)
        p2 = torch.softmax(t2(**causal_batch).logits[:, :-1] / tau, -1)
    mask = causal_batch["labels"][:, 1:] != -100
    pbar = (0.75 * p1 + 0.25 * p2)[mask].double()
    log_ps = torch.log_softmax(s[mask].double() / tau, -1)
    if kd_loss == "forward_kl":
        kl = (pbar * (pbar.log() - log_ps)).sum(-1)
    else:
        kl = (log_ps.exp() * (log_ps - pbar.log())).sum(-1)
    ref = kl.sum() * tau**2 / mask.sum()
    assert torch.allclose(got.double(), ref, rtol=1e-5), (got, ref)


def test_ensemble_through_cli_and_vocab_guard_per_teacher(tmp_path, tokenizer, corpus):
    from lmkd.models.scratch import train_tokenizer

    t1 = save(build_model("gpt2", len(tokenizer), seed=1, layers=2), tokenizer, tmp_path / "t1")
    t2 = save(build_model("gpt2", len(tokenizer), seed=3, layers=2), tokenizer, tmp_path / "t2")
    other_tok = train_tokenizer([r["target"] for r in corpus], vocab_size=len(tokenizer))
    bad = save(build_model("gpt2", len(other_tok), seed=4, layers=2), other_tok, tmp_path / "bad")
    sdir = save(build_model("gpt2", len(tokenizer), seed=2, layers=1), tokenizer, tmp_path / "s")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": r["source"]} for r in corpus[:8]])
    common = dict(
        student_model_name_or_path=sdir,
        task="causal-lm",
        train_file=train,
        max_steps=2,
        per_device_train_batch_size=4,
        kd_alpha=1.0,
    )
    assert (
        distill(
            tmp_path,
            "ens",
            teacher_model_name_or_path=f"{t1},{t2}",
            teacher_weights="0.7,0.3",
            output_dir=str(tmp_path / "out"),
            **common,
        )
        == 0
    )
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (
        distill(
            tmp_path,
            "bad",
            teacher_model_name_or_path=f"{t1},{bad}",
            output_dir=str(tmp_path / "o2"),
            **common,
        )
        == 2
    )
    for extra, message in (
        ({"teacher_weights": "1,2,3"}, "one weight > 0 per teacher"),
        ({"kd_loss": "mse"}, "averages softened distributions"),
    ):
        with pytest.raises(LmkdError, match=message):
            config(tmp_path, teacher_model_name_or_path=f"{t1},{t2}", **extra)


# ---- born-again ------------------------------------------------------------------------------------


def test_born_again_two_rounds(tmp_path, tokenizer, corpus):
    """rounds 2: two saved students; round 2's student is exactly what one run against round 1's
    student (as teacher) from the same init gives; output_dir holds the last one."""
    teacher = save(build_model("gpt2", len(tokenizer), seed=1, layers=2), tokenizer, tmp_path / "t")
    sdir = save(build_model("gpt2", len(tokenizer), seed=2, layers=1), tokenizer, tmp_path / "s")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": r["source"]} for r in corpus[:8]])
    keys = dict(
        student_model_name_or_path=sdir,
        teacher_model_name_or_path=teacher,
        task="causal-lm",
        train_file=train,
        validation_file=train,
        max_eval_samples=4,
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        kd_alpha=0.5,
        learning_rate=1e-2,
        seed=3,
    )
    out = tmp_path / "ban"
    assert (
        main(
            [
                "distill",
                write_yaml(tmp_path / "ban.yaml", **keys),
                "--rounds",
                "2",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    from transformers import AutoModelForCausalLM

    r1 = AutoModelForCausalLM.from_pretrained(out / "round-1")
    r2 = AutoModelForCausalLM.from_pretrained(out / "round-2")
    top = AutoModelForCausalLM.from_pretrained(out)
    init = AutoModelForCausalLM.from_pretrained(sdir)
    assert any(not torch.equal(v, r1.state_dict()[k]) for k, v in init.state_dict().items())
    assert all(torch.equal(v, top.state_dict()[k]) for k, v in r2.state_dict().items())
    args2 = torch.load(out / "round-2" / "training_args.bin", weights_only=False)
    assert args2.teacher_model_name_or_path == str(out / "round-1")
    results = json.loads((out / "distill_results.json").read_text())
    assert set(results["rounds"]) == {"round-1", "round-2"}
    assert all("eval_loss" in m for m in results["rounds"].values())  # every round evaluated
    # an independent run with round 1's student as the teacher reproduces round 2 bit for bit
    keys.update(
        teacher_model_name_or_path=str(out / "round-1"), output_dir=str(tmp_path / "manual")
    )
    assert main(["distill", write_yaml(tmp_path / "manual.yaml", **keys)]) == 0
    manual = AutoModelForCausalLM.from_pretrained(tmp_path / "manual")
    assert all(torch.equal(v, manual.state_dict()[k]) for k, v in r2.state_dict().items())


# ---- co-distillation -------------------------------------------------------------------------------


def test_co_distillation_loss_gradients_and_training(tmp_path, tokenizer, corpus):
    m0 = build_model("gpt2", len(tokenizer), seed=1, layers=1, dropout=0.0)
    m1 = build_model("gpt2", len(tokenizer), seed=2, layers=1, dropout=0.0)
    cohort = CohortModel([m0, m1])
    ds = lm_dataset(corpus[:16], tokenizer)
    collator = collator_for("causal-lm", tokenizer)
    alpha, tau = 0.6, 2.0
    trainer = CoDistillationTrainer(
        model=cohort,
        args=config(tmp_path, kd_alpha=alpha, kd_temperature=tau, max_steps=2),
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    assert trainer.teacher is None
    batch = collator([ds[i] for i in range(4)])
    cohort.train()
    loss = trainer.compute_loss(cohort, batch)
    grads = torch.autograd.grad(loss, [m0.transformer.wte.weight, m1.transformer.wte.weight])

    # by hand: each member's CE + KD towards the other's detached distribution
    z = [m(**batch).logits[:, :-1] for m in (m0, m1)]
    mask = batch["labels"][:, 1:] != -100
    labels = batch["labels"][:, 1:][mask]
    n = mask.sum()

    def member_loss(k):
        s, t = z[k][mask], z[1 - k][mask].detach()
        kl = (
            F.kl_div(
                torch.log_softmax(s / tau, -1),
                torch.log_softmax(t / tau, -1),
                log_target=True,
                reduction="sum",
            )
            * tau**2
        )
        return (1 - alpha) * F.cross_entropy(s, labels) + alpha * kl / n

    ref0, ref1 = member_loss(0), member_loss(1)
    assert torch.allclose(loss, ref0 + ref1, rtol=1e-5), (loss, ref0 + ref1)
    # member 0's gradient comes from its own terms only: the KD target (member 1) is detached
    g0 = torch.autograd.grad(ref0, m0.transformer.wte.weight, retain_graph=True)[0]
    g1 = torch.autograd.grad(ref1, m1.transformer.wte.weight)[0]
    assert torch.allclose(grads[0], g0, atol=1e-7, rtol=1e-5) and torch.allclose(
        grads[1], g1, atol=1e-7, rtol=1e-5
    )

    before = [state(m0), state(m1)]
    trainer.train()
    for m, b in zip((m0, m1), before):
        assert any(not torch.equal(v, m.state_dict()[k]) for k, v in b.items()), (
            "a member did not change"
        )
    trainer.save_model(str(tmp_path / "saved"))
    for k, m in enumerate((m0, m1)):
        back = type(m).from_pretrained(tmp_path / "saved" / f"member-{k}")
        assert all(torch.equal(v, back.state_dict()[name]) for name, v in m.state_dict().items())


@pytest.mark.slow
def test_co_distillation_resumes_from_a_checkpoint(tmp_path, tokenizer, corpus):
    """Stopped after step 1 and resumed, a cohort ends where an uninterrupted run ends."""
    ds = lm_dataset(corpus[:16], tokenizer)
    init = [build_model("gpt2", len(tokenizer), seed=s, layers=1, dropout=0.0) for s in (1, 2)]

    def run(out, resume=None, max_steps=3):
        cohort = CohortModel([copy.deepcopy(m) for m in init])
        trainer = CoDistillationTrainer(
            model=cohort,
            args=config(
                tmp_path,
                output_dir=str(out),
                max_steps=max_steps,
                save_strategy="steps",
                save_steps=1,
                kd_alpha=0.5,
            ),
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator_for("causal-lm", tokenizer),
        )
        trainer.train(resume_from_checkpoint=resume)
        return [state(m) for m in cohort.members]

    full = run(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-1" / "member-1" / "model.safetensors").exists()
    resumed = run(tmp_path / "full2", resume=str(tmp_path / "full" / "checkpoint-1"))
    for a, b in zip(full, resumed):
        assert all(torch.allclose(v, b[k], atol=1e-6) for k, v in a.items())
    # and the resume did start from the checkpoint, not from scratch: a 2-step run differs
    short = run(tmp_path / "short", max_steps=2)
    assert any(not torch.allclose(v, short[0][k], atol=1e-6) for k, v in full[0].items())


def test_co_distillation_through_cli(tmp_path, tokenizer, corpus):
    sdir = save(
        build_model("bert", len(tokenizer), kind="classification", seed=2, layers=1),
        tokenizer,
        tmp_path / "s",
    )
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": r["source"], "label": i % 2} for i, r in enumerate(corpus[:8])],
    )
    out = tmp_path / "out"
    assert (
        distill(
            tmp_path,
            "dml",
            student_model_name_or_path=sdir,
            task="classification",
            train_file=train,
            validation_file=train,
            cohort_size=3,
            kd_alpha=0.5,
            output_dir=str(out),
            max_steps=2,
            per_device_train_batch_size=4,
        )
        == 0
    )
    assert all((out / f"member-{k}" / "model.safetensors").exists() for k in range(3))
    assert "eval_loss" in json.loads((out / "distill_results.json").read_text())
    with pytest.raises(LmkdError, match="without a teacher"):
        config(tmp_path, cohort_size=2, teacher_model_name_or_path=sdir)


# ---- on-policy KD ----------------------------------------------------------------------------------


def test_on_policy_fraction_zero_is_off_policy_bit_for_bit(tmp_path, tokenizer, corpus):
    teacher = build_model("gpt2", len(tokenizer), seed=1, layers=2)
    init = build_model("gpt2", len(tokenizer), seed=2, layers=1)
    ds = lm_dataset(corpus[:16], tokenizer)
    finals = []
    for cls, extra in (
        (DistillationTrainer, {}),
        (OnPolicyDistillationTrainer, {"on_policy_fraction": 0.0}),
    ):
        student = copy.deepcopy(init)
        trainer = cls(
            model=student,
            args=config(tmp_path, kd_loss="jsd", jsd_beta=0.3, max_steps=3, **extra),
            teacher_model=teacher,
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator_for("causal-lm", tokenizer),
        )
        trainer.train()
        finals.append(state(student))
    assert all(torch.equal(v, finals[1][k]) for k, v in finals[0].items())
    assert any(not torch.equal(v, finals[0][k]) for k, v in init.state_dict().items())


class Recording(OnPolicyDistillationTrainer):
    def on_policy_batch(self, model, batch):
        out = super().on_policy_batch(model, batch)
        self.recorded.append((batch, out, self.last_generation_seed))
        return out


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_on_policy_targets_are_the_students_samples(tmp_path, tokenizer, corpus, arch):
    task = "causal-lm" if arch == "gpt2" else "translation"
    teacher = build_model(arch, len(tokenizer), seed=1, layers=2)
    student = build_model(arch, len(tokenizer), seed=2, layers=1)
    init = copy.deepcopy(student)
    if task == "causal-lm":
        ds = lm_dataset(corpus[:8], tokenizer)
    else:
        ds = tokenize(
            datasets.Dataset.from_list(
                [{"source": r["source"], "target": r["target"]} for r in corpus[:8]]
            ),
            tokenizer,
            DataArguments(task=task, train_file="-"),
        )
    args = config(
        tmp_path,
        kd_loss="jsd",
        jsd_beta=0.5,
        kd_alpha=1.0,
        on_policy_fraction=1.0,
        max_steps=2,
        on_policy_max_new_tokens=6,
        on_policy_temperature=1.3,
        on_policy_prompt_tokens=3,
    )
    trainer = Recording(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator_for(task, tokenizer, student),
    )
    trainer.recorded = []
    trainer.train()
    assert len(trainer.recorded) == 2  # lambda 1: every batch
    batch, got, seed = trainer.recorded[0]  # generated before any update: by the initial weights
    init.eval()
    torch.manual_seed(seed)
    gen = dict(
        do_sample=True,
        temperature=1.3,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        max_new_tokens=6,
        pad_token_id=0,
    )
    if task == "causal-lm":
        prompt = batch["input_ids"][:, :3]
        ref = init.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
        new, labels = ref[:, 3:], got["labels"][:, 3:]
        assert torch.equal(got["input_ids"][:, :3], prompt) and (got["labels"][:, :3] == -100).all()
    else:
        ref = init.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **gen
        )
        new, labels = ref[:, 1:], got["labels"]
    # targets are the sampled tokens up to and including the first EOS (id 1), then ignored
    for row_new, row_lab in zip(new.tolist(), labels.tolist()):
        cut = row_new.index(1) + 1 if 1 in row_new else len(row_new)
        assert row_lab[:cut] == row_new[:cut] and all(v == -100 for v in row_lab[cut:])
    assert ON_POLICY in got

    # the loss on that batch is kd_alpha * JSD_beta on the generated tokens only, no CE
    teacher.eval(), init.eval()
    trainer.args.kd_alpha = 0.4
    with torch.no_grad():
        loss = trainer.compute_loss(init, got)
        fwd = trainer.forward_inputs(init, got)
        s, t = trainer.shifted(init(**fwd).logits), trainer.shifted(teacher(**fwd).logits)
    lab = got["labels"][:, 1:] if task == "causal-lm" else got["labels"]
    mask = lab != -100
    ref_loss = 0.4 * losses.generalized_jsd(s, t, mask, beta=0.5, temperature=2.0) / mask.sum()
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)


def test_on_policy_seq2seq_transfer_set_of_inputs_alone(tmp_path, tokenizer, corpus, capsys):
    """lambda 1: a seq2seq student distils on source sentences with no targets (the unlabelled
    transfer set of a seq2seq student); the validation data keep theirs."""
    teacher = save(build_model("bart", len(tokenizer), seed=1, layers=2), tokenizer, tmp_path / "t")
    sdir = save(build_model("bart", len(tokenizer), seed=2, layers=1), tokenizer, tmp_path / "s")
    train = write_jsonl(tmp_path / "sources.jsonl", [{"source": r["source"]} for r in corpus[:8]])
    valid = write_jsonl(tmp_path / "valid.jsonl", corpus[8:12])
    keys = dict(
        student_model_name_or_path=sdir,
        teacher_model_name_or_path=teacher,
        task="translation",
        train_file=train,
        validation_file=valid,
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        kd_loss="jsd",
        kd_alpha=1.0,
        on_policy_fraction=1.0,
        on_policy_max_new_tokens=8,
    )
    assert distill(tmp_path, "gkd", **keys) == 0
    from transformers import AutoModelForSeq2SeqLM

    before, after = (
        AutoModelForSeq2SeqLM.from_pretrained(sdir),
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out"),
    )
    assert any(not torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
    assert "eval_loss" in json.loads((tmp_path / "out" / "distill_results.json").read_text())
    capsys.readouterr()
    keys.update(
        on_policy_fraction=0.5, output_dir=str(tmp_path / "o2")
    )  # off-policy batches need targets
    assert distill(tmp_path, "gkd2", **keys) == 2
    assert "has no column 'target'" in capsys.readouterr().err


def test_on_policy_needs_jsd_and_a_generative_student(tmp_path, tokenizer):
    with pytest.raises(LmkdError, match="kd_loss jsd"):
        config(tmp_path, on_policy_fraction=0.5)
    teacher = build_model("bert", len(tokenizer), kind="classification", seed=1, layers=1)
    student = build_model("bert", len(tokenizer), kind="classification", seed=2, layers=1)
    with pytest.raises(LmkdError, match="generative"):
        OnPolicyDistillationTrainer(
            model=student,
            args=config(tmp_path, kd_loss="jsd", on_policy_fraction=0.5),
            teacher_model=teacher,
        )


def test_regime_recipes_exist():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "recipes" / "regimes"
    keys = {p.name: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert any(k.get("kd_alpha") == 1 and "transfer" in n for n, k in keys.items())
    assert any("," in str(k.get("teacher_model_name_or_path", "")) for k in keys.values())
    assert any(k.get("rounds", 1) > 1 for k in keys.values())
    assert any(k.get("cohort_size", 1) > 1 for k in keys.values())
    assert any(k.get("on_policy_fraction", 0) > 0 for k in keys.values())

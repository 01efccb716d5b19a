"""Feature and relation distillation in DistillationTrainer: the loss it computes equals one
computed by hand, hidden states / attention maps are requested only when needed, the layer map
defaults (make-student's map, else evenly spaced), hint projections are trained and checkpointed
but never saved with the student, gradient accumulation stays exact, and the hidden-state loss
really pulls the student's hidden states towards the teacher's."""

import copy
import os

import pytest
import torch
from test_trainer import config as trainer_config
from test_trainer import make_dataset, state
from transformers import AutoModelForMaskedLM

from lmkd import DistillationConfig, DistillationTrainer, LmkdError, losses, make_student
from lmkd.data.collators import collator_for
from lmkd.models.loading import load_model
from lmkd.models.scratch import build_model
from lmkd.train.config_checks import parse_layer_map
from lmkd.train.features import PROJECTIONS_NAME


def config(tmp_path, **kw):
    """test_trainer's config, with fewer steps."""
    return trainer_config(tmp_path, **{"max_steps": 4, "logging_steps": 2, **kw})


def mlm_batch(tokenizer, corpus, n=8):
    ds = make_dataset("mlm", corpus[:n], tokenizer)
    collator = collator_for("mlm", tokenizer, seed=0)
    return ds, collator, collator([ds[i] for i in range(n)])


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_weight", -1.0, "hidden_weight must be >= 0"),
        ("attention_weight", -0.5, "attention_weight must be >= 0"),
        ("hidden_loss", "l1", "unknown hidden_loss"),
        ("attention_loss", "js", "unknown attention_loss"),
        ("relation_loss", "cka", "unknown relation_loss"),
        ("relation_pooling", "cls", "unknown relation_pooling"),
        ("layer_map", "0,x", "not a list of integer layer indices"),
        ("layer_map", "0,1:2", "not a mix"),
        ("layer_map", "middle=0:1", "unknown layer stack"),
    ],
)
def test_config_rejects_bad_feature_values(tmp_path, field, value, message):
    with pytest.raises(LmkdError, match=message):
        config(tmp_path, **{field: value})


def test_pooled_relations_need_two_examples_per_batch(tmp_path):
    with pytest.raises(LmkdError, match="per_device_train_batch_size >= 2"):
        config(tmp_path, relation_weight=1.0, per_device_train_batch_size=1)
    config(tmp_path, relation_weight=1.0, relation_pooling="token", per_device_train_batch_size=1)


def test_layer_map_forms():
    assert parse_layer_map("0,2,4") == {"*": [(0, 0), (1, 2), (2, 4)]}
    assert parse_layer_map("0:1, -1:-1") == {"*": [(0, 1), (-1, -1)]}
    assert parse_layer_map("encoder=0,3;decoder=-1:-1") == {
        "encoder": [(0, 0), (1, 3)],
        "decoder": [(-1, -1)],
    }
    assert DistillationConfig(output_dir="x", layer_map=[1, 3], use_cpu=True).layer_map == "1,3"


# ---- what the trainer computes ----------------------------------------------------------------


def test_feature_loss_equals_manual_combination(tiny_model_dir, tokenizer, corpus, tmp_path):
    """Each term is the mean over mapped layer pairs of a per-token (per-example) loss, added to
    the KD/CE loss with its weight; each is logged on its own."""
    teacher = load_model(tiny_model_dir("bert"), kind="mlm")  # 4 layers
    student = make_student(teacher, layers=[1, 3])
    with torch.no_grad():  # a student that differs from its teacher, with peaked attention maps
        for name, p in student.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if "query" in name or "key" in name:
                p.mul_(20)
    teacher.eval(), student.eval()
    _, _, batch = mlm_batch(tokenizer, corpus)
    base = DistillationTrainer(
        model=student, args=config(tmp_path), teacher_model=teacher, processing_class=tokenizer
    )
    trainer = DistillationTrainer(
        model=student,
        args=config(
            tmp_path,
            hidden_weight=0.7,
            hidden_loss="cosine",
            attention_weight=0.3,
            relation_weight=2.0,
            relation_loss="rkd",
        ),
        teacher_model=teacher,
        processing_class=tokenizer,
    )
    assert (
        student.config._attn_implementation == "eager"
        and teacher.config._attn_implementation == "eager"
    )
    with torch.no_grad():
        kd_ce = base.compute_loss(student, batch)
        got = trainer.compute_loss(student, batch)
        fwd = {k: v for k, v in batch.items() if k != "labels"}
        so = student(**fwd, output_hidden_states=True, output_attentions=True)
        to = teacher(**fwd, output_hidden_states=True, output_attentions=True)
    mask = batch["attention_mask"].bool()
    n_tok, n_ex = mask.sum(), mask.shape[0]
    pairs = [(0, 1), (1, 3)]  # make_student's map: student layer i <- teacher layer [1, 3][i]
    hidden = sum(
        losses.hidden_cosine(so.hidden_states[i + 1], to.hidden_states[j + 1], mask)
        for i, j in pairs
    )
    attention = sum(
        losses.attention_loss(so.attentions[i], to.attentions[j], mask) for i, j in pairs
    )
    relation = sum(
        losses.relation_loss(so.hidden_states[i + 1], to.hidden_states[j + 1], mask, loss="rkd")
        for i, j in pairs
    )
    ref = kd_ce + (0.7 * hidden / n_tok + 0.3 * attention / n_tok + 2.0 * relation / n_ex) / len(
        pairs
    )
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    trainer.log({"eval_loss": got.item()})  # the model was in eval mode: eval_ statistics
    logged = trainer.state.log_history[-1]
    for name, value in (
        ("hidden", hidden / n_tok),
        ("attention", attention / n_tok),
        ("relation", relation / n_ex),
    ):
        assert value > 1e-3, name  # large enough for the check below to mean something
        assert logged[f"eval_loss_{name}"] == pytest.approx(value.item() / 2, rel=1e-4, abs=1e-6)


def test_outputs_requested_only_when_a_loss_needs_them(tokenizer, corpus, tmp_path):
    teacher = build_model("bert", len(tokenizer), seed=1, layers=2)
    _, _, batch = mlm_batch(tokenizer, corpus, n=4)
    cases = [
        ({}, set()),
        ({"hidden_weight": 1.0}, {"output_hidden_states"}),
        ({"relation_weight": 1.0}, {"output_hidden_states"}),
        ({"attention_weight": 1.0}, {"output_attentions"}),
    ]
    for kw, flags in cases:
        student = build_model("bert", len(tokenizer), seed=2, layers=1)
        t = copy.deepcopy(teacher)
        seen = {"s": [], "t": []}
        student.register_forward_pre_hook(
            lambda m, a, k: seen["s"].append(set(k)), with_kwargs=True
        )
        t.register_forward_pre_hook(lambda m, a, k: seen["t"].append(set(k)), with_kwargs=True)
        trainer = DistillationTrainer(
            model=student, args=config(tmp_path, **kw), teacher_model=t, processing_class=tokenizer
        )
        with torch.no_grad():
            trainer.compute_loss(student, batch)
        asked = {"output_hidden_states", "output_attentions"}
        assert seen["s"][0] & asked == flags and seen["t"][0] & asked == flags, kw
        assert len(seen["t"]) == 1  # one teacher forward, shared by KD and the feature losses
        eager = student.config._attn_implementation == "eager"
        assert eager == ("attention_weight" in kw), kw


def test_feature_losses_alone_use_the_teacher(tokenizer, corpus, tmp_path):
    teacher = build_model("bert", len(tokenizer), seed=1, layers=2)
    student = build_model("bert", len(tokenizer), seed=2, layers=1)
    args = config(tmp_path, kd_alpha=0.0, relation_weight=1.0)
    with pytest.raises(LmkdError, match="needs a teacher"):
        DistillationTrainer(model=student, args=args, processing_class=tokenizer)
    trainer = DistillationTrainer(
        model=student, args=args, teacher_model=teacher, processing_class=tokenizer
    )
    assert trainer.uses_teacher and trainer.teacher is teacher
    _, _, batch = mlm_batch(tokenizer, corpus, n=4)
    student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        ce = student(**batch).loss
        so = student(**batch, output_hidden_states=True).hidden_states
        to = teacher(**batch, output_hidden_states=True).hidden_states
    rel = (
        losses.relation_loss(so[1], to[2], batch["attention_mask"].bool()) / 4
    )  # evenly spaced: 0 <- 1
    assert got.item() == pytest.approx((ce + rel).item(), rel=1e-5)


def test_layer_map_defaults_and_errors(tokenizer, tmp_path):
    teacher = build_model("bert", len(tokenizer), seed=1, layers=4)

    def pairs(student, n_s, n_t, **kw):
        tr = DistillationTrainer(
            model=student,
            args=config(tmp_path, hidden_weight=1.0, **kw),
            teacher_model=copy.deepcopy(teacher),
            processing_class=tokenizer,
        )
        return tr.features.layer_pairs("layers", n_s, n_t)

    assert pairs(make_student(teacher, layers=[0, 3]), 2, 4) == [(0, 0), (1, 3)]  # copied layers
    plain = build_model("bert", len(tokenizer), seed=2, layers=2)
    assert pairs(plain, 2, 4) == [(0, 1), (1, 3)]  # evenly spaced, last to last
    assert pairs(build_model("bert", len(tokenizer), seed=2, layers=3), 3, 12) == [
        (0, 3),
        (1, 7),
        (2, 11),
    ]
    assert pairs(plain, 2, 4, layer_map="-1:-1") == [(1, 3)]
    assert pairs(plain, 2, 4, layer_map="2,0") == [(0, 2), (1, 0)]
    with pytest.raises(LmkdError, match="the teacher"):
        pairs(plain, 2, 4, layer_map="0:7")
    with pytest.raises(LmkdError, match="says nothing about the decoder"):
        DistillationTrainer(
            model=build_model("bart", len(tokenizer), seed=2, layers=1),
            args=config(tmp_path, hidden_weight=1.0, layer_map="encoder=0"),
            teacher_model=build_model("bart", len(tokenizer), seed=1, layers=2),
            processing_class=tokenizer,
        ).features.layer_pairs("decoder", 1, 2)


# ---- hint projections -------------------------------------------------------------------------


def test_hint_projection_trains_checkpoints_and_stays_out_of_the_student(
    tiny_model_dir, tokenizer, corpus, tmp_path
):
    teacher = load_model(tiny_model_dir("bert"), kind="mlm")  # hidden size 32
    student = build_model("bert", len(tokenizer), seed=3, layers=2, d_model=16, heads=2)
    ds, collator, _ = mlm_batch(tokenizer, corpus, n=16)
    args = config(tmp_path, hidden_weight=1.0, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    proj = trainer.projections["layers"]
    assert (proj.in_features, proj.out_features) == (16, 32)
    w0 = proj.weight.detach().clone()
    t0 = state(teacher)
    trainer.train()
    assert not torch.equal(w0, proj.weight), "the projection was not trained"
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in proj.parameters()} <= in_optimizer
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items()), "teacher changed"
    assert any(h.get("loss_hidden", 0) > 0 for h in trainer.state.log_history)

    # the checkpoint holds the projections; a fresh trainer resuming from it gets them back
    ckpt = os.path.join(args.output_dir, "checkpoint-3")
    saved = torch.load(os.path.join(ckpt, PROJECTIONS_NAME), weights_only=True)
    assert torch.equal(saved["layers.weight"], proj.weight.detach())
    fresh = DistillationTrainer(
        model=build_model("bert", len(tokenizer), seed=4, layers=2, d_model=16, heads=2),
        args=args,
        teacher_model=teacher,
        processing_class=tokenizer,
    )
    assert not torch.equal(fresh.projections["layers"].weight, proj.weight)
    fresh._load_from_checkpoint(ckpt)
    assert torch.equal(fresh.projections["layers"].weight, proj.weight)

    # the saved student is a plain HF model without the projection
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved")
    assert set(reloaded.state_dict()) == set(student.state_dict())
    assert not any("proj" in k or "lmkd" in k for k in reloaded.state_dict())
    for k, v in student.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert not os.path.exists(tmp_path / "saved" / PROJECTIONS_NAME)


def test_no_projection_when_sizes_match_or_no_hidden_loss(tokenizer, tmp_path):
    teacher = build_model("bert", len(tokenizer), seed=1, layers=2)
    same = DistillationTrainer(
        model=build_model("bert", len(tokenizer), seed=2, layers=1),
        args=config(tmp_path, hidden_weight=1.0),
        teacher_model=teacher,
    )
    narrow = DistillationTrainer(
        model=build_model("bert", len(tokenizer), seed=2, layers=1, d_model=16),
        args=config(tmp_path, relation_weight=1.0),
        teacher_model=teacher,
    )
    assert len(same.projections) == 0 and len(narrow.projections) == 0


# ---- training behaviour -----------------------------------------------------------------------


@pytest.mark.parametrize("arch,task", [("bart", "translation"), ("gpt2", "causal-lm")])
def test_gradient_accumulation_with_feature_losses_is_exact(
    tokenizer, corpus, tmp_path, arch, task
):
    """Token-level feature losses (hidden, attention) are normalised by the token count of the
    whole accumulated batch: 2 micro-batches of 4 give the update of one batch of 8."""
    teacher = build_model(arch, len(tokenizer), seed=1, layers=2, dropout=0.0)
    init = build_model(arch, len(tokenizer), seed=2, layers=1, dropout=0.0, d_model=16, heads=2)
    ds = make_dataset(task, corpus[:8], tokenizer)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student = copy.deepcopy(init)
        trainer = DistillationTrainer(
            model=student,
            args=config(
                tmp_path,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                max_steps=1,
                learning_rate=1e-2,
                optim="sgd",
                max_grad_norm=0.0,
                hidden_weight=1.0,
                attention_weight=1.0,
                attention_loss="mse",
            ),
            teacher_model=copy.deepcopy(teacher),
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator_for(task, tokenizer, student),
        )
        torch.manual_seed(5)
        trainer.projections.load_state_dict(
            {k: torch.randn_like(v) for k, v in trainer.projections.state_dict().items()}
        )
        trainer.train()
        results.append((state(student), state(trainer.projections)))
    for i in (0, 1):
        for k in results[0][i]:
            assert torch.allclose(results[0][i][k], results[1][i][k], atol=1e-6, rtol=1e-5), k


def hidden_distance(student, teacher, batch, pairs):
    with torch.no_grad():
        so = student(**batch, output_hidden_states=True).hidden_states
        to = teacher(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    return (
        sum(losses.hidden_mse(so[i + 1], to[j + 1], mask).item() for i, j in pairs)
        / mask.sum().item()
    )


def test_hidden_loss_pulls_hidden_states_towards_the_teacher(tokenizer, corpus, tmp_path):
    """Same init, same fixed batch, same steps: KD + hidden MSE ends with hidden states closer to
    the teacher's than KD alone, and closer than at the start."""
    teacher = build_model("bert", len(tokenizer), seed=1, layers=2)
    init = build_model("bert", len(tokenizer), seed=2, layers=2)
    ds, collator, _ = mlm_batch(tokenizer, corpus, n=8)
    ds = ds.select([0] * 8)  # one fixed example repeated: every step sees the same batch
    fixed = {k: v for k, v in collator([ds[i] for i in range(8)]).items() if k != "labels"}
    teacher.eval()
    pairs = [(0, 0), (1, 1)]
    start = hidden_distance(init.eval(), teacher, fixed, pairs)
    t0 = state(teacher)
    ends = {}
    for hidden_weight in (0.0, 1.0):
        student = copy.deepcopy(init)
        trainer = DistillationTrainer(
            model=student,
            args=config(
                tmp_path, kd_alpha=1.0, hidden_weight=hidden_weight, max_steps=5, learning_rate=3e-3
            ),
            teacher_model=teacher,
            train_dataset=ds,
            processing_class=tokenizer,
            data_collator=collator,
        )
        trainer.train()
        ends[hidden_weight] = hidden_distance(student.eval(), teacher, fixed, pairs)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items()), "teacher changed"
    assert ends[1.0] < 0.8 * ends[0.0], (start, ends)
    assert ends[1.0] < 0.8 * start, (start, ends)


def test_seq2seq_maps_encoder_and_decoder_separately(tiny_model_dir, tokenizer, corpus, tmp_path):
    teacher = load_model(tiny_model_dir("t5"), kind="seq2seq")  # 4 encoder + 4 decoder layers
    student = make_student(teacher, encoder_layers=[0, 3], decoder_layers=[1])
    ds = make_dataset("translation", corpus[:8], tokenizer)
    collator = collator_for("translation", tokenizer, student)
    trainer = DistillationTrainer(
        model=student,
        args=config(
            tmp_path,
            hidden_weight=1.0,
            attention_weight=1.0,
            relation_weight=1.0,
            relation_pooling="token",
            max_steps=2,
            logging_steps=1,
        ),
        teacher_model=teacher,
        train_dataset=ds,
        processing_class=tokenizer,
        data_collator=collator,
    )
    assert trainer.features.layer_pairs("encoder", 2, 4) == [(0, 0), (1, 3)]
    assert trainer.features.layer_pairs("decoder", 1, 4) == [(0, 1)]
    batch = collator([ds[i] for i in range(4)])
    student.eval(), teacher.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
        fwd = dict(
            batch,
            decoder_input_ids=student.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        )
        fwd.pop("labels")
        so, to = (
            student(**fwd, output_hidden_states=True),
            teacher(**fwd, output_hidden_states=True),
        )
    # eval outputs carry no hidden states/attention maps (prediction_step would gather them)
    assert outputs.encoder_hidden_states is None and outputs.decoder_attentions is None
    assert "encoder_hidden_states" not in outputs.keys()
    dec = batch["labels"] != -100
    enc = batch["attention_mask"].bool()
    hidden = (
        losses.hidden_mse(so.encoder_hidden_states[1], to.encoder_hidden_states[1], enc)
        + losses.hidden_mse(so.encoder_hidden_states[2], to.encoder_hidden_states[4], enc)
    ) / enc.sum() + losses.hidden_mse(
        so.decoder_hidden_states[1], to.decoder_hidden_states[2], dec
    ) / dec.sum()
    trainer.log({"eval_loss": loss.item()})
    assert trainer.state.log_history[-1]["eval_loss_hidden"] == pytest.approx(
        hidden.item() / 3, rel=1e-4
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_attention" in h and "epoch" in h]
    assert logged and all(
        h["loss_hidden"] > 0 and h["loss_attention"] > 0 and h["loss_relation"] > 0 for h in logged
    )


@pytest.mark.slow
def test_two_processes_equal_one_with_hint_projections(tiny_model_dir, tokenizer, tmp_path, corpus):
    """torchrun, 2 CPU processes (gloo) with 4 examples each = 1 process with 8: the same student and
    the same projections (their gradients, outside DDP, are averaged by hand)."""
    import json

    from _mp_helpers import assert_same_student, run_script
    from transformers import AutoModelForSeq2SeqLM

    teacher_dir = tiny_model_dir("bart", layers=2, dropout=0.0)
    student = build_model(
        "bart", len(tokenizer), seed=3, layers=1, d_model=16, heads=2, dropout=0.0
    )
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in corpus[:48]))
    common = [teacher_dir, str(tmp_path / "student"), str(data)]
    run_script("mp_feature_distill.py", [*common, str(tmp_path / "one"), "8"])
    out = run_script(
        "mp_feature_distill.py", [*common, str(tmp_path / "two"), "4"], processes=2, port=29547
    )
    assert "world_size=2 ok" in out
    assert_same_student(
        AutoModelForSeq2SeqLM, tmp_path / "one", tmp_path / "two", student.state_dict()
    )
    pa = torch.load(tmp_path / "one" / "projections.pt", weights_only=True)
    pb = torch.load(tmp_path / "two" / "projections.pt", weights_only=True)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5, rtol=1e-4), k


def test_teacher_ensemble_is_refused_for_feature_losses(tokenizer, tmp_path):
    from lmkd.teacher.ensemble import EnsembleTeacher

    teachers = [build_model("bert", len(tokenizer), seed=s, layers=1) for s in (1, 2)]
    with pytest.raises(LmkdError, match="one Hugging Face teacher model"):
        DistillationTrainer(
            model=build_model("bert", len(tokenizer), seed=3, layers=1),
            args=config(tmp_path, hidden_weight=1.0),
            teacher_model=EnsembleTeacher(teachers, temperature=2.0),
        )

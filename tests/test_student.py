"""The student trainer, in process: config, metrics, losses, streaming, export, variants.

Stores are built directly with the Store API (tests/toy.py): rows whose passage holds
"good" (positive) or "bad" (negative), teachers whose logits are a known function of that
label. The student encoder is a tiny local BERT (2 layers, hidden 32).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tmkd.data.store import StaleLabelsError, Store
import toy
from tmkd.student.config import ConfigError, config_from_dict, load_config
from tmkd.student.data import DistillStream, data_workers, epoch_batches, plan_batches
from tmkd.student.losses import distill_loss, listwise_distill_loss, listwise_kl
from tmkd.teachers.metrics import evaluate_predictions, map_mrr


def toy_config(*args, **kwargs) -> dict:
    """toy.config, naming the positive class: the toy labels (neg, pos) declare none."""
    raw = toy.config(*args, **kwargs)
    raw["eval"]["positive_label"] = "pos"
    return raw


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("student-store")
    store = toy.build_store(root, teachers=("t1", "t2", "t3"))
    toy.add_corpus(store, "ranked", [72, 56], ["t1", "t2", "t3"], group_size=4, seed=4, id_offset=300_000)
    return root


# ---- config -----------------------------------------------------------------------------------
def test_config_toml_overrides_and_errors(tmp_path, encoder, store_dir):
    raw = toy_config(store_dir, encoder, tmp_path / "out", teacher_weights={"t1": 3.0, "t2": 1.0})
    path = tmp_path / "s.toml"
    path.write_text(toy.to_toml(raw))
    cfg = load_config(path, ["stages.0.lr=5e-5", "stages.0.loss.soft=kl", "student.num_layers=1"],
                      **{"train.gradient_accumulation_steps": 2})
    assert cfg.stages[0].lr == 5e-5 and cfg.stages[0].loss.soft == "kl" and cfg.student.num_layers == 1
    assert cfg.train.gradient_accumulation_steps == 2
    assert cfg.normalised_weights() == [0.75, 0.25] and cfg.variant == "mkd"

    example = load_config(Path(__file__).resolve().parents[1] / "student" / "configs" / "tmkd.example.toml")
    assert example.variant == "tmkd" and example.student.num_layers == 3 and not example.stages[0].gold

    with pytest.raises(ConfigError, match=r"^--set stages.0.lrr=1: unknown key\(s\) stages\.0\.lrr; stages.0 takes: corpora,"):
        load_config(path, ["stages.0.lrr=1"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(path, ["stages.0.lr=fast"])
    with pytest.raises(ConfigError, match="loss.soft must be 'mse' or 'kl'"):
        load_config(path, ["stages.0.loss.soft=l1"])
    with pytest.raises(ConfigError, match="gold = false needs teachers"):
        config_from_dict(dict(raw, teachers=[], teacher_weights={},
                              stages=[{"corpora": ["unlabeled"], "gold": False}]))


def test_data_workers_auto_uses_none_on_cpu_and_respects_a_set_count(tmp_path, encoder, store_dir):
    # the default config asks for auto (-1): no worker beside a CPU training step, 2 on a GPU
    assert config_from_dict(toy_config(store_dir, encoder, tmp_path / "o") | {"data": {}}).data.num_workers == -1
    assert data_workers(-1, torch.device("cpu")) == 0
    assert data_workers(-1, torch.device("cuda", 0)) == 2
    assert data_workers(3, torch.device("cpu")) == 3 and data_workers(0, torch.device("cuda", 0)) == 0
    path = tmp_path / "s.toml"
    path.write_text(toy.to_toml(toy_config(store_dir, encoder, tmp_path / "o")))
    with pytest.raises(ConfigError, match=r"data.num_workers >= -1 \(auto\)"):
        load_config(path, ["data.num_workers=-2"])


# ---- metrics ----------------------------------------------------------------------------------
def test_map_mrr_hand_computed():
    # q1: ranking by score = [pos(0.9), neg(0.8), pos(0.3), neg(0.1)]
    #     AP = (1/1 + 2/3) / 2 = 0.8333..., RR = 1
    # q2: ranking = [neg(0.7), neg(0.6), pos(0.5)]: AP = 1/3, RR = 1/3
    # q3: only positives -> not counted; q4: only negatives -> not counted; None -> no group
    scores = [0.3, 0.9, 0.1, 0.8, 0.5, 0.7, 0.6, 0.4, 0.2, 0.9, 0.99]
    rel = [1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    groups = ["q1", "q1", "q1", "q1", "q2", "q2", "q2", "q3", "q4", "q4", None]
    out = map_mrr(np.array(scores), np.array(rel, bool), groups)
    assert out["groups_counted"] == 2 and out["groups_total"] == 4
    assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert out["mrr"] == pytest.approx((1 + 1 / 3) / 2)

    # through evaluate_predictions: logits -> positive-class score; accuracy and F1 by hand
    logits = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.5, 0.0]])
    gold = np.array([1, 0, 0, -1])  # last row has no gold label: left out
    m = evaluate_predictions(logits, gold, ["a", "a", "a", "a"])
    assert m["rows"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))  # tp=1, fp=1, fn=0
    assert m["map"] == pytest.approx(0.5) and m["mrr"] == pytest.approx(0.5)  # pos ranked 2nd of 3


# ---- losses -----------------------------------------------------------------------------------
def test_loss_formula_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.5, 0.5]]])  # [B=2, K=2, C=2]
    t = torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([1, -1])  # row 2 has no gold: soft part only
    w = torch.tensor([0.25, 0.75])
    kw = dict(weights=w, ensemble=False, temperature=2.0, alpha=0.3)
    mse = ((s - t) ** 2).mean(-1)
    ce = torch.stack([torch.nn.functional.cross_entropy(s[0], torch.tensor([1, 1]), reduction="none"),
                      torch.zeros(2)])
    per = torch.stack([0.3 * mse[0] + 0.7 * ce[0], mse[1]])
    assert distill_loss(s, t, labels, soft="mse", use_gold=True, **kw) == pytest.approx(float((per.mean(0) * w).sum()))
    # stage 1 (no gold): soft only everywhere
    assert distill_loss(s, t, labels, soft="mse", use_gold=False, **kw) == pytest.approx(float((mse.mean(0) * w).sum()))
    # KL at T=2, scaled by T^2
    pt, ps = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1) * 4
    assert distill_loss(s, t, labels, soft="kl", use_gold=False, **kw) == pytest.approx(float((kl.mean(0) * w).sum()),
                                                                                        rel=1e-5)
    # ensemble: one head against the weighted mean of the teachers
    one = s[:, :1]
    target = (t * w.view(1, 2, 1)).sum(1, keepdim=True)
    want = ((one - target) ** 2).mean(-1).mean()
    got = distill_loss(one, t, labels, soft="mse", use_gold=False, weights=w, ensemble=True, temperature=1, alpha=0)
    assert got == pytest.approx(float(want))
    # no-KD: mean CE over rows with a gold label only
    got = distill_loss(s[:, :1], None, labels, soft="mse", use_gold=True, weights=w, ensemble=False, temperature=1,
                       alpha=0)
    assert got == pytest.approx(float(torch.nn.functional.cross_entropy(s[:1, 0], labels[:1])))


def test_listwise_loss_by_hand():
    """Per head: KL of the teacher's and the student's softmax over each group's log-odds, at T, times T^2,
    averaged over the groups of 2+ rows; a lone row ranks nothing."""
    torch.manual_seed(0)
    s, t = torch.randn(7, 2, 2, requires_grad=True), torch.randn(7, 2, 2)  # [B, K, C]
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 0])  # group 2 is a lone row
    w, temp = torch.tensor([0.25, 0.75]), 2.0
    got = listwise_distill_loss(s, t, groups, 3, 2, weights=w, ensemble=False, positive=1, temperature=temp)
    want = 0.0
    for k in range(2):
        kls = []
        for g in (0, 1):
            m = groups == g
            pt = torch.softmax((t[m, k, 1] - t[m, k, 0]) / temp, 0)
            ps = torch.softmax((s[m, k, 1] - s[m, k, 0]) / temp, 0)
            kls.append((pt * (pt.log() - ps.log())).sum().detach() * temp**2)
        want += float(w[k]) * float(torch.stack(kls).mean())
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert s.grad[5].abs().sum() == 0 and s.grad[0].abs().sum() > 0  # the lone row gets no gradient
    # the positive class's log-odds: with 0 as the positive class the ranking (and the KL) flips sign
    flipped = listwise_distill_loss(s.flip(-1), t.flip(-1), groups, 3, 2, weights=w, ensemble=False, positive=0,
                                    temperature=temp)
    assert float(flipped.detach()) == pytest.approx(want, rel=1e-5)
    # a student that ranks as its teacher: 0, whatever shift each group's scores have
    x = torch.randn(6, 1)
    same = listwise_kl(x, x + torch.tensor([[3.0]] * 3 + [[-1.0]] * 3), torch.tensor([0, 0, 0, 1, 1, 1]), 2, 2, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


# ---- streaming --------------------------------------------------------------------------------
def test_stream_every_row_once_per_epoch_across_ranks_and_workers(store_dir, encoder):
    store = Store(store_dir)
    parts = store.corpus("train").parts + store.corpus("unlabeled").parts  # 5 parts of different sizes
    teachers = [store.teacher("t1"), store.teacher("t2")]
    all_ids = sorted(int(i) for p in parts for i in store.read_corpus_part(p, ["id"]).column("id").to_numpy())
    orders = []
    for epoch in (0, 1):
        seen, order = [], []
        for rank in (0, 1):
            ds = DistillStream(str(store_dir), parts, teachers, str(encoder), num_labels=2, batch_size=8,
                               max_length=32, seed=5, rank=rank, world=2, num_workers=2, shuffle_buffer=24,
                               bucket_batches=2)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
            batches = list(loader)
            assert len(batches) == ds.planned_batches()  # the step plan is exact
            for b in batches:
                assert b["teacher_logits"].shape == (len(b["ids"]), 2, 2)
                lens = b["attention_mask"].sum(1)
                assert b["input_ids"].shape[1] == int(lens.max())  # padded to the batch's longest only
            seen += [int(i) for b in batches for i in b["ids"]]
            order += [int(i) for b in batches for i in b["ids"]]
        assert sorted(seen) == all_ids  # every row exactly once across 2 ranks x 2 workers
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert plan_batches(parts, 5, 0, 2, 2, 8) != [0, 0]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_a_grouped_stream_keeps_each_group_in_one_batch_or_two(store_dir, encoder, world, workers):
    """A listwise stage's stream: every row once per epoch, the planned batch count, each group's rows
    together (a batch cut splits a group in two at most), group_index naming them within the batch; and
    a resumed grouped stream seeks to its batch."""
    store = Store(store_dir)
    parts = store.corpus("ranked").parts  # 128 rows, groups of 4
    teachers = [store.teacher("t1")]
    groups_of = {}
    for p in parts:
        t = store.read_corpus_part(p, ["id", "group"])
        groups_of.update(zip(t.column("id").to_pylist(), t.column("group").to_pylist()))

    def stream(rank, epoch, skip=0):
        ds = DistillStream(str(store_dir), parts, teachers, str(encoder), num_labels=2, batch_size=6, max_length=32,
                           seed=5, rank=rank, world=world, num_workers=workers, grouped=True)
        return list(epoch_batches(ds, epoch, skip)), ds.planned_batches()

    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            batches, planned = stream(rank, epoch)
            assert len(batches) == planned
            for b in batches:
                names = [groups_of[int(i)] for i in b["ids"]]
                assert len(set(names)) == b["num_groups"] and b["num_lists"] <= b["num_groups"]
                for n in names:  # rows of a group are next to each other
                    at = [i for i, x in enumerate(names) if x == n]
                    assert at == list(range(at[0], at[-1] + 1))
                pairs = set(zip(names, b["group_index"].tolist()))  # group_index tells the groups apart
                assert len(pairs) == len(set(names)) == len({g for _, g in pairs})
            seen += [int(i) for b in batches for i in b["ids"]]
            pieces = {}
            for b in batches:
                for n in {groups_of[int(i)] for i in b["ids"]}:
                    pieces[n] = pieces.get(n, 0) + 1
            assert max(pieces.values()) <= 2 and sum(v == 1 for v in pieces.values()) > len(pieces) // 2
        assert sorted(seen) == sorted(groups_of)
        orders.append(seen)
    assert orders[0] != orders[1]  # the groups' order is reshuffled each epoch
    full, _ = stream(0, 1)
    for skip in (1, len(full) // 2, len(full)):
        assert [b["ids"].tolist() for b in stream(0, 1, skip)[0]] == [b["ids"].tolist() for b in full[skip:]]


def test_misaligned_and_stale_label_parts_are_refused(tmp_path, encoder):
    store = toy.build_store(tmp_path / "store", teachers=("t1", "t2"), train=(16, 16), unlabeled=(16,), dev=())
    part = store.corpus("train").parts[1]
    t1 = store.teacher("t1")
    # misaligned: same fingerprint and digest, but the ids in another order
    ids = store.read_corpus_part(part, ["id"]).column("id").to_numpy()
    store.write_label_part(t1, part, ids[::-1].copy(), np.zeros((16, 2), np.float32))
    ds = DistillStream(str(store.root), [part], [t1], str(encoder), num_labels=2, batch_size=8, max_length=16, seed=0)
    # the message names the part and says the ids are the problem (its wording belongs to data/store.py)
    with pytest.raises(StaleLabelsError, match=r"ids.*part-00001\.parquet|part-00001\.parquet.*ids"):
        list(ds)

    # stale: the teacher was replaced (new fingerprint) after scoring; the trainer names every bad file
    from tmkd.student.train import main

    store.write_teacher(toy.teacher_record("t2", fingerprint="toy:t2-retrained"))
    cfg = toy_config(store.root, encoder, tmp_path / "out", teachers=("t1", "t2"))
    cfg["eval"] = {}
    (tmp_path / "c.toml").write_text(toy.to_toml(cfg))
    return_code = main(["--config", str(tmp_path / "c.toml")])
    assert return_code == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_stale_labels_message_names_the_files(tmp_path, encoder, capsys):
    from tmkd.student.train import main

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(16, 16), unlabeled=(16,), dev=())
    (store.label_path("t1", "train", 1)).unlink()
    cfg = toy_config(store.root, encoder, tmp_path / "out", teachers=("t1",))
    cfg["eval"] = {}
    (tmp_path / "c.toml").write_text(toy.to_toml(cfg))
    assert main(["--config", str(tmp_path / "c.toml")]) == 1
    err = capsys.readouterr().err
    assert "labels/t1/train/part-00001.parquet (" in err and "missing" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path / "c.toml"), "--set", "teachers=[\"nope\"]"]) == 1
    assert "no teacher 'nope'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "c.toml"), "--set", "eval.corpus=train", "--set", "eval.metric=mrr"]) == 1
    assert "corpus 'train' has no groups" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "c.toml"), "--set", "stages.0.corpora=[\"nope\"]"]) == 1
    assert "no corpus 'nope'" in capsys.readouterr().err


# ---- export -----------------------------------------------------------------------------------
def _tiny_mpnet(path, tokenizer_dir):
    """An MPNet classifier (its head is classifier.out_proj, not classifier) with the tiny tokenizer."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=130, pad_token_id=tok.pad_token_id)
    MPNetForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_exported_model_equals_multi_head_mean(arch, tmp_path, encoder, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.student.model import export, load_student

    if arch == "mpnet":
        encoder = _tiny_mpnet(tmp_path / "mpnet", tiny_tokenizer)
    student = load_student(str(encoder), num_labels=2, num_heads=3, num_layers=1, label_names=["neg", "pos"])
    assert student.head_name == {"bert": "classifier", "mpnet": "classifier.out_proj"}[arch]
    assert student.hf.config.num_hidden_layers == 1
    with torch.no_grad():  # make the heads clearly different
        for p in student.hf.get_submodule(student.head_name).parameters():
            p.add_(torch.randn_like(p))
    student.eval()
    tok = AutoTokenizer.from_pretrained(encoder)
    export(student, tok, tmp_path / "exported")

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "exported")
    enc = tok2(["the river city", "a film"], ["good water", "bad king of the north"], padding=True,
               return_tensors="pt")
    with torch.no_grad():
        heads = student(**enc)  # drops token_type_ids for MPNet
        if arch == "mpnet":
            enc.pop("token_type_ids")
        got = model(**enc).logits
    assert heads.shape == (2, 3, 2)
    assert not torch.allclose(heads[:, 0], heads[:, 1])
    torch.testing.assert_close(got, heads.mean(dim=1), rtol=1e-5, atol=1e-5)
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.num_hidden_layers == 1


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_student_layers_keeps_the_chosen_encoder_layers(arch, tmp_path, encoder, tiny_tokenizer):
    """student.layers = [1] of a 2-layer encoder: the student's one layer is the encoder's second, and the
    export is a stock 1-layer model that scores as the student does."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.student.model import export, load_student

    if arch == "mpnet":
        encoder = _tiny_mpnet(tmp_path / "mpnet", tiny_tokenizer)
    full = AutoModel.from_pretrained(encoder)
    student = load_student(str(encoder), num_labels=2, num_heads=2, label_names=["neg", "pos"], layers=[1])
    base = getattr(student.hf, arch)
    assert len(base.encoder.layer) == 1 and student.hf.config.num_hidden_layers == 1
    for (name, got), (_, want) in zip(base.encoder.layer[0].state_dict().items(),
                                      full.encoder.layer[1].state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)
    student.eval()
    export(student, AutoTokenizer.from_pretrained(encoder), tmp_path / "exported")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    enc = AutoTokenizer.from_pretrained(encoder)(["the river city"], ["good water"], return_tensors="pt")
    with torch.no_grad():
        heads = student(**enc)
        if arch == "mpnet":
            enc.pop("token_type_ids")
        torch.testing.assert_close(model(**enc).logits, heads.mean(dim=1), rtol=1e-5, atol=1e-5)
    assert model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="only 2 layers"):
        load_student(str(encoder), num_labels=2, num_heads=1, layers=[0, 2])
    with pytest.raises(ConfigError, match="student.layers"):
        raw = toy.config(tmp_path, encoder, tmp_path / "o")
        raw["student"]["layers"] = [1, 1]
        config_from_dict(raw)


def test_student_cut_from_a_fine_tuned_teacher_keeps_its_layers_and_head(tmp_path, encoder):
    """student.encoder = a teacher's folder (the *-tinit levers in RESULTS.md): the student's layers are the
    teacher's first fine-tuned layers, not the pretrained encoder's, and every head starts from the teacher's
    classifier (exactly for one head; plus the seeded perturbation that keeps several heads apart)."""
    from transformers import AutoModelForSequenceClassification

    from tmkd.student.model import load_student

    torch.manual_seed(3)
    teacher = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    with torch.no_grad():  # stands in for fine-tuning: move every weight away from the encoder's
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    teacher.save_pretrained(tmp_path / "teacher")
    one = load_student(str(tmp_path / "teacher"), num_labels=2, num_heads=1, num_layers=1)
    for (name, got), (_, want) in zip(one.hf.bert.encoder.layer[0].state_dict().items(),
                                      teacher.bert.encoder.layer[0].state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)
    torch.testing.assert_close(one.hf.classifier.weight, teacher.classifier.weight)
    three = load_student(str(tmp_path / "teacher"), num_labels=2, num_heads=3, num_layers=1)
    torch.testing.assert_close(three.hf.classifier.bias, teacher.classifier.bias.repeat(3))
    offset = three.hf.classifier.weight.view(3, 2, -1) - teacher.classifier.weight
    assert offset.abs().max() < 0.15 and offset.std() > 0.01  # the perturbation (std 0.02), not a new head


# ---- every variant trains ---------------------------------------------------------------------
def _stage(name, corpora, gold=True, soft="mse", epochs=4, lr=1e-2, alpha=0.5, temperature=1.0, listwise=0.0):
    return {"name": name, "corpora": corpora, "epochs": epochs, "batch_size": 16, "lr": lr, "schedule": "constant",
            "gold": gold, "loss": {"soft": soft, "alpha": alpha, "temperature": temperature, "listwise": listwise}}


VARIANTS = {
    "no-kd": dict(teachers=[], stages=[_stage("task", ["train"], alpha=0.0)]),
    "tkd-mse": dict(teachers=["t1"], stages=[_stage("task", ["train"])]),
    "tkd-kl": dict(teachers=["t1"], stages=[_stage("task", ["train"], soft="kl", temperature=2.0)]),
    "mkd": dict(teachers=["t1", "t2", "t3"], stages=[_stage("task", ["train"])]),
    "tmkd": dict(teachers=["t1", "t2"], stages=[_stage("stage1", ["unlabeled"], gold=False, epochs=3),
                                               _stage("stage2", ["train"], epochs=3)]),
    "ensemble": dict(teachers=["t1", "t2", "t3"], soft_target="ensemble", stages=[_stage("task", ["train"])]),
    "mkd-listwise": dict(teachers=["t1", "t2", "t3"], stages=[_stage("task", ["ranked"], listwise=1.0)]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_and_lowers_its_loss(variant, tmp_path, store_dir, encoder):
    from tmkd.student.train import run

    spec = dict(VARIANTS[variant])
    raw = toy_config(store_dir, encoder, tmp_path / "out", teachers=spec.pop("teachers"), stages=spec.pop("stages"),
                     **spec)
    cfg = config_from_dict(raw)
    result = run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == sum(s.epochs for s in cfg.stages)
    for stage in cfg.stages:
        losses = [x["train_loss"] for x in lines if x["stage"] == stage.name]
        assert losses[-1] < 0.8 * losses[0], (stage.name, losses)
    for x in lines:  # every row of the stage's corpora once per epoch
        stage = next(s for s in cfg.stages if s.name == x["stage"])
        assert x["examples"] == sum(Store(store_dir).corpus(c).rows for c in stage.corpora)
        assert x["eval_groups_counted"] > 0 and x["eval_groups_counted"] <= x["eval_groups_total"] == 12
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "done" and record["variant"] == cfg.variant
    assert [t["name"] for t in record["teachers"]] == cfg.teachers
    assert all(t["fingerprint"] == f"toy:{t['name']}" for t in record["teachers"])
    assert record["corpora"][cfg.stages[-1].corpora[0]]["parts"][0]["digest"].startswith("sha256:")
    assert result.best["metric"] == "map"
    # the export is a stock model with the task's labels
    cfgjson = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfgjson["id2label"] == {"0": "neg", "1": "pos"}
    # it learnt the task, not just the loss (chance: accuracy 0.52, MAP ~0.8)
    assert max(x["eval_accuracy"] for x in lines) >= 0.9 and result.best["value"] >= 0.9, lines


def test_max_steps_counts_accumulation_windows_which_end_at_each_epoch():
    from tmkd.student.plan import cap_batches

    # 7 batches an epoch in windows of 2: 4 steps (2+2+2+1); 6 steps = epoch 1's 4 + 2 windows (4 batches)
    assert cap_batches([7, 7], 6, 2, "s") == [7, 4]
    assert cap_batches([7, 7], 8, 2, "s") == [7, 7]
    assert cap_batches([7, 7, 7], 9, 2, "s") == [7, 7, 2]


def test_max_steps_stops_the_stage_within_its_last_epoch(tmp_path, store_dir, encoder):
    """max_steps matches another recipe's compute: the stage runs exactly that many optimizer steps, the last
    epoch cut short; a budget met before the last epoch, or beyond the epochs, is refused before training."""
    from tmkd.student.plan import TrainError
    from tmkd.student.train import run

    stage = dict(_stage("task", ["train"], epochs=2), max_steps=11)  # train: 128 rows, 8 batches of 16 per epoch
    result = run(config_from_dict(toy_config(store_dir, encoder, tmp_path / "out", stages=[stage])))
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["examples"]) for x in lines] == [(8, 128), (11, 48)]
    assert result.steps == 11
    for epochs, max_steps, message in ((3, 11, "reached in epoch 2 of 3; set epochs = 2"),
                                       (1, 11, "more than its 1 epoch(s) hold (8 steps)")):
        bad = dict(_stage("task", ["train"], epochs=epochs), max_steps=max_steps)
        with pytest.raises(TrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run(config_from_dict(toy_config(store_dir, encoder, tmp_path / f"bad{epochs}", stages=[bad])))


def test_the_export_is_scored_on_the_test_corpus_and_described_by_its_model_card(tmp_path, store_dir, encoder):
    """eval.test_corpus scores the exported model as a user loads it; on the dev corpus itself that equals
    the trainer's own evaluation of the kept epoch. The model card records it all."""
    from tmkd.student.train import run
    from tmkd.teachers.model_card import read_model_card

    raw = toy_config(store_dir, encoder, tmp_path / "out", teachers=["t1", "t2"],
                     stages=[_stage("task", ["train"], epochs=2)])
    raw["eval"]["test_corpus"] = "dev"
    result = run(config_from_dict(raw))
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    kept = next(x for x in lines if x["epoch"] == result.best["epoch"] and x["stage"] == result.best["stage"])
    for key in ("accuracy", "f1", "map", "mrr"):
        assert record["test"][key] == pytest.approx(kept[f"eval_{key}"], abs=1e-6), key
    meta, body = read_model_card(tmp_path / "out")
    card = meta["tmkd"]
    assert card["kind"] == "student" and card["base_model"] == str(encoder)
    assert [(t["name"], t["fingerprint"]) for t in card["teachers"]] == [("t1", "toy:t1"), ("t2", "toy:t2")]
    assert card["metrics"]["test"] == record["test"] and card["metrics"]["dev"]["map"] == kept["eval_map"]
    st = Store(store_dir)
    assert card["corpora"]["train"]["rows"] == st.corpus("train").rows
    assert [p["digest"] for p in card["corpora"]["train"]["parts"]] == [p.digest for p in st.corpus("train").parts]
    assert "tmkd" in meta["tags"] and "## How to load it" in body


def test_stream_holds_at_most_two_parts_plus_the_buffer(tmp_path, encoder, monkeypatch):
    """Memory stays flat: rows read but not yet emitted never exceed the buffer plus two parts (one of
    them read ahead)."""
    import tmkd.student.data as data

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(30,) * 8, unlabeled=(8,), dev=())
    parts = store.corpus("train").parts
    read = []
    real = data.read_rows
    monkeypatch.setattr(data, "read_rows", lambda *a, **k: read.append(real(*a, **k)) or read[-1])
    ds = DistillStream(str(store.root), parts, [store.teacher("t1")], str(encoder), num_labels=2, batch_size=4,
                       max_length=16, seed=0, shuffle_buffer=40, bucket_batches=2)
    emitted, held = 0, []
    for pool, _ in ds._pools(parts, np.random.default_rng(0)):
        held.append(sum(len(r) for r in read) - emitted)
        emitted += len(pool)
        assert len(pool) <= 8
    assert emitted == 240 and max(held) <= 40 + 2 * 30
    assert len(read) == 8 and held[0] < 240  # pools flow before the last part is read


def test_a_resumed_stream_starts_at_the_current_turn_of_the_dataloader_workers():
    from tmkd.student.data import turn_start

    # workers with 2, 4 and 3 batches yield in turns: w0 w1 w2 | w0 w1 w2 | w1 w2 | w1
    assert turn_start([2, 4, 3], 0) == ([0, 0, 0], 0)
    assert turn_start([2, 4, 3], 2) == ([0, 0, 0], 2)  # w0 and w1 of the first turn are dropped by the caller
    assert turn_start([2, 4, 3], 3) == ([1, 1, 1], 0)
    assert turn_start([2, 4, 3], 7) == ([2, 2, 2], 1)  # the third turn (w1 w2) has given w1
    assert turn_start([2, 4, 3], 9) == ([2, 4, 3], 0)
    assert turn_start([], 0) == ([], 0) and turn_start([5], 3) == ([3], 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_seeks_to_its_batch(tmp_path, encoder, workers):
    """From batch k on, a stream yields exactly the batches an uninterrupted one yields from k on, in
    the same order; it reads only the parts that still hold rows ahead of k, and tokenizes no pool
    that lies wholly before it."""
    import tmkd.student.data as data

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(30, 7, 30, 19, 30, 12, 30, 25, 4),
                            unlabeled=(8,), dev=())
    parts = store.corpus("train").parts

    def stream(skip):
        ds = DistillStream(str(store.root), parts, [store.teacher("t1")], str(encoder), num_labels=2, batch_size=4,
                           max_length=16, seed=3, num_workers=workers, shuffle_buffer=20, bucket_batches=2)
        return [b["ids"].tolist() for b in epoch_batches(ds, 1, skip)]

    full = stream(0)
    assert len(full) == plan_batches(parts, 3, 1, 1, workers, 4)[0]
    for skip in (1, 5, len(full) // 2, len(full) - 1, len(full)):
        assert stream(skip) == full[skip:], skip
    if workers:
        return
    reads, tokenized = [], []
    real_read, real_encode = data.read_rows, data.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "read_rows", lambda store, part, *a: reads.append(part.part) or real_read(store, part, *a))
        mp.setattr(data, "encode", lambda tok, a, *r: tokenized.append(len(a)) or real_encode(tok, a, *r))
        late = len(full) - 3
        assert stream(late) == full[late:]
    assert len(reads) < len(parts) and len(set(reads)) == len(reads)  # the parts still needed, once each
    assert sum(tokenized) <= 2 * 8  # at most the pool the position is in and the one after (2 batches of 4)


@pytest.mark.parametrize("log_every", [1, 3])
def test_the_running_loss_is_read_back_only_every_log_every_steps(log_every, tmp_path, store_dir, encoder,
                                                                   monkeypatch):
    """A read of a device tensor stalls a GPU: the epoch's loss stays on the device between reads."""
    import tmkd.student.loop as loop
    from tmkd.student.train import run

    class Counted(torch.Tensor):
        reads = 0

        def __float__(self):
            Counted.reads += 1
            return super().__float__()

    real = loop.EpochSums.start.__func__
    monkeypatch.setattr(loop.EpochSums, "start", classmethod(
        lambda cls, *a: (lambda sums: setattr(sums, "loss", sums.loss.as_subclass(Counted)) or sums)(real(cls, *a))))
    stages = [{"name": "task", "corpora": ["train"], "epochs": 1, "batch_size": 16, "lr": 1e-3}]
    raw = toy_config(store_dir, encoder, tmp_path / "out", teachers=("t1",), stages=stages)
    raw["train"]["log_every"] = log_every
    raw["eval"]["corpus"] = ""
    result = run(config_from_dict(raw))
    assert result.steps == 8  # 128 rows in batches of 16
    # with 3: steps 3, 6 and the epoch's last; + 2 at its end for the metrics line (after one all-reduce)
    assert Counted.reads == {1: 8, 3: 3}[log_every] + 2


def test_accumulation_weights_micro_batches_by_rows():
    """Accumulating a window's micro-batches gives the gradient of the mean over all its rows, whatever their
    sizes: a short last batch counts for its rows, a padding batch for nothing, full ones for 1/N."""
    from tmkd.student.loop import window_divisors

    assert window_divisors([16, 16]) == [2.0, 2.0]
    assert window_divisors([16, 4]) == [1.25, 5.0]
    assert window_divisors([16, 0]) == [1.0, float("inf")]

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(21, 4), torch.randn(21, 1)
    whole = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), model.weight)[0]
    sizes = [8, 8, 5]  # a window with a short last batch
    acc = torch.zeros_like(model.weight)
    for (xb, yb), d in zip(zip(x.split(sizes), y.split(sizes)), window_divisors(sizes)):
        acc += torch.autograd.grad(torch.nn.functional.mse_loss(model(xb), yb) / d, model.weight)[0]
    torch.testing.assert_close(acc, whole)
    naive = sum(torch.autograd.grad(torch.nn.functional.mse_loss(model(xb), yb) / 3, model.weight)[0]
                for xb, yb in zip(x.split(sizes), y.split(sizes)))
    assert not torch.allclose(naive, whole)  # counting the short batch as a full one is wrong


def test_an_unwritable_output_folder_is_a_one_line_error(tmp_path, encoder, capsys):
    from tmkd.student.train import main

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(16,), unlabeled=(), dev=())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = toy_config(store.root, encoder, blocker / "out", teachers=("t1",))
    cfg["eval"] = {}
    (tmp_path / "c.toml").write_text(toy.to_toml(cfg))
    assert main(["--config", str(tmp_path / "c.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a-file" in err and "Traceback" not in err


def test_student_init_starts_from_another_runs_checkpoint(tmp_path, store_dir, encoder):
    """student.init = a run's checkpoint: the new run starts from exactly those weights (with a learning rate too
    small to move them, its export scores as the first run's); a checkpoint of another shape is refused."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.student.plan import TrainError
    from tmkd.student.train import run

    first = toy_config(store_dir, encoder, tmp_path / "a", stages=[_stage("task", ["train"], epochs=1)])
    run(config_from_dict(first))
    step = next((tmp_path / "a" / "checkpoints").glob("step-*"))
    second = toy_config(store_dir, encoder, tmp_path / "b", stages=[_stage("task", ["train"], epochs=1, lr=1e-12)])
    second["student"]["init"] = str(step)
    run(config_from_dict(second))
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    enc = tok(["the river city", "a film"], ["good water", "bad king"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / x).eval()(**enc).logits for x in "ab")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fresh = toy_config(store_dir, encoder, tmp_path / "c", stages=[_stage("task", ["train"], epochs=1, lr=1e-12)])
    run(config_from_dict(fresh))
    with torch.no_grad():
        c = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c").eval()(**enc).logits
    assert not torch.allclose(a, c, atol=1e-3)  # without init the run starts elsewhere
    other = toy_config(store_dir, encoder, tmp_path / "d", teachers=["t1"],
                       stages=[_stage("task", ["train"], epochs=1)])
    other["student"]["init"] = str(step)  # 2 heads saved, 1 wanted
    with pytest.raises(TrainError, match="does not fit this student.*wrong shape"):
        run(config_from_dict(other))


def test_bench_export_checkpoint_equals_the_trainers_export_of_that_step(tmp_path, store_dir, encoder):
    import subprocess
    import sys

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.student.train import run

    run(config_from_dict(toy_config(store_dir, encoder, tmp_path / "a", stages=[_stage("task", ["train"], epochs=1)])))
    step = next((tmp_path / "a" / "checkpoints").glob("step-*"))
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "bench" / "export_checkpoint.py"), str(tmp_path / "a"), str(step),
                    str(tmp_path / "x")], check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "x")
    enc = tok(["the river city"], ["good water"], return_tensors="pt")
    with torch.no_grad():
        a, x = (AutoModelForSequenceClassification.from_pretrained(tmp_path / f).eval()(**enc).logits for f in "ax")
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)  # one epoch: the trainer exported this very step
    record = json.loads((tmp_path / "x" / "run.json").read_text())
    best = json.loads((tmp_path / "a" / "run.json").read_text())["best"]
    assert record["best"]["value"] == best["value"] and record["best"]["step"] == best["step"]


# ---- hostile input: a clear error before training, never a traceback or a garbage model ------------
def _cli(tmp_path, store, encoder, *sets, stages=None, teachers=("t1",), eval_corpus=""):
    """Run the trainer's command line in process on a one-epoch toy config; (exit code, stdout, stderr) come
    from capsys in the caller."""
    from tmkd.student.train import main

    raw = toy_config(store, encoder, tmp_path / "out", teachers=teachers,
                     stages=stages or [_stage("task", ["train"], epochs=1)])
    if not eval_corpus:
        raw["eval"] = {}
    (tmp_path / "c.toml").write_text(toy.to_toml(raw))
    args = ["--config", str(tmp_path / "c.toml")]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _refused(capsys, *names):
    """The one-message error: names every given field, and no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in names:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("setting,field", [
    ("stages.0.lr=nan", "stages.0.lr"), ("stages.0.lr=inf", "stages.0.lr"),
    ("stages.0.weight_decay=nan", "stages.0.weight_decay"), ("teacher_weights={t1=nan}", "teacher_weights.t1"),
    ("stages.0.loss.temperature=inf", "stages.0.loss.temperature"), ("stages.0.loss.listwise=inf", "stages.0.loss.listwise"),
    ("train.max_grad_norm=nan", "train.max_grad_norm"), ("stages.0.weight_decay=-0.1", "stages.0.weight_decay"),
])
def test_non_finite_hyperparameters_are_refused(setting, field, tmp_path, encoder):
    path = tmp_path / "s.toml"
    path.write_text(toy.to_toml(toy_config(tmp_path, encoder, tmp_path / "o", teachers=("t1",))))
    with pytest.raises(ConfigError, match=rf"--set {re.escape(setting)}[\s\S]*{re.escape(field)}"):
        load_config(path, [setting, "stages.0.loss.soft=kl"])


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_a_non_finite_loss_or_model_stops_the_run_and_exports_nothing(where, tmp_path, store_dir, encoder, capsys,
                                                                        monkeypatch):
    """Finite settings can still diverge: the loss is checked where it is read back anyway (log_every, the
    epoch's end), the weights once an epoch; the run stops with an error, run.json is not done, no model."""
    import tmkd.student.losses as losses
    import tmkd.student.train as train

    if where == "loss":  # one batch's loss turns NaN; log_every is past the epoch: only its end reads the loss
        real, calls = losses.distill_loss, []
        monkeypatch.setattr(losses, "distill_loss", lambda *a, **k: real(*a, **k) * (
            float("nan") if calls.append(1) or len(calls) == 3 else 1.0))
    else:  # the one step of the stage makes the weights inf/NaN; the only loss read (before it) is finite
        real_start = train.start_stage

        def start(optimizer, schedule, stage):
            real_start(optimizer, schedule, stage)
            for g in optimizer.param_groups:
                g["lr"] = float("inf")
        monkeypatch.setattr(train, "start_stage", start)
    stages = [dict(_stage("task", ["train"], epochs=1), batch_size=128 if where == "weights" else 16)]
    assert _cli(tmp_path, store_dir, encoder, "train.log_every=1000", stages=stages, eval_corpus="dev") == 1
    _refused(capsys, "task", "diverged", "not finite" if where == "weights" else "training loss is nan")
    out = tmp_path / "out"
    assert json.loads((out / "run.json").read_text())["status"] != "done"
    assert not (out / "model.safetensors").exists() and not list(out.rglob("*.safetensors"))


@pytest.mark.parametrize("setting", ["student.max_length=512", "student.max_length=100000000000000000000",
                                     "student.max_length=4"])
def test_max_length_beyond_the_encoder_or_the_bounds_is_refused(setting, tmp_path, store_dir, encoder, capsys):
    assert _cli(tmp_path, store_dir, encoder, setting) == 1
    err = _refused(capsys, "student.max_length")
    if setting.endswith("=512"):
        assert "128" in err  # the encoder's positions
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["store", "store/out", "link/out"])
def test_an_output_inside_the_label_store_is_refused_before_writing(inside, tmp_path, encoder, capsys):
    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(16,), unlabeled=(), dev=())
    (tmp_path / "link").symlink_to(store.root)
    before = sorted((p, p.stat().st_size) for p in store.root.rglob("*"))
    assert _cli(tmp_path, store.root, encoder, f"output={tmp_path / inside}") == 1
    _refused(capsys, "output", "label store")
    assert sorted((p, p.stat().st_size) for p in store.root.rglob("*")) == before


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_refused(seed, tmp_path, store_dir, encoder, capsys):
    assert _cli(tmp_path, store_dir, encoder, f"seed={seed}") == 1
    _refused(capsys, f"seed={seed}", "seed must be")


def test_rich_markup_in_a_stage_name_is_shown_as_written(tmp_path, store_dir, encoder, capsys):
    assert _cli(tmp_path, store_dir, encoder, "stages.0.name=[/]oops [bold red]x") == 0
    out = capsys.readouterr().out
    assert "[/]oops [bold red]x epoch 1" in out
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "done"


def test_a_stage_must_have_something_to_learn_from(tmp_path, store_dir, encoder, capsys):
    assert _cli(tmp_path, store_dir, encoder, 'stages.0.corpora=["train","train"]') == 1
    _refused(capsys, "stages.0", "corpora", "twice")
    # no teachers and only unlabeled rows (a corpus that declares label names, but no row has a gold label)
    assert _cli(tmp_path, store_dir, encoder, "teachers=[]", 'stages.0.corpora=["unlabeled"]') == 1
    _refused(capsys, "stages.0", "unlabeled", "no gold labels")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_encoders_vocabulary_is_refused(tmp_path, store_dir, encoder, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder)
    tok.add_tokens([f"word{i}" for i in range(100)])
    tok.save_pretrained(tmp_path / "big-tok")
    assert _cli(tmp_path, store_dir, encoder, f"student.tokenizer={tmp_path / 'big-tok'}") == 1
    _refused(capsys, "student.tokenizer", str(len(tok)), "vocab")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["student.encoder", "student.tokenizer"])
def test_a_missing_encoder_folder_is_named_and_never_fetched(field, tmp_path, store_dir, encoder, capsys,
                                                              monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_network)
    assert _cli(tmp_path, store_dir, encoder, f"{field}=some-org/no-such-model") == 1
    err = _refused(capsys, f"{field}: no folder some-org/no-such-model")
    assert "Repo id" not in err


def test_absurd_epochs_are_refused_at_once(tmp_path, store_dir, encoder, capsys):
    assert _cli(tmp_path, store_dir, encoder, "stages.0.epochs=100000000000000000000") == 1
    _refused(capsys, "stages.0.epochs")

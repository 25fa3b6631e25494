"""teachers/finetune.py: teachers learn, are written loadable, and teachers.toml points at them.

The end-to-end test runs the script as users do (a subprocess: accelerate keeps one global
state per process) on a tiny locally built BERT and a toy corpus a 2-layer model learns in
seconds: in each question of 4 candidates the correct one says "yes", the others "no".
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from tmkd.data.store import Store  # noqa: E402
from tmkd.teachers import finetune as ft  # noqa: E402
from tmkd.teachers import ranking, splits  # noqa: E402
from tmkd.teachers.spec import load_teachers_toml  # noqa: E402

WORDS = ["river", "city", "music", "water", "king", "war", "film", "book", "game", "church", "school", "army"]
LABELS = ["no", "yes"]


def toy_rows(questions: int, seed: int, id_offset: int) -> pa.Table:
    """Questions of 4 candidates, one correct (position shuffled): 25% positives, so chance MAP ~0.52."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("id", "text_a", "text_b", "label", "group", "source_id")}
    for q in range(questions):
        w = WORDS[rng.integers(len(WORDS))]
        correct = rng.integers(4)
        for c in range(4):
            other = WORDS[rng.integers(len(WORDS))]
            yes = c == correct
            rows["id"].append(id_offset + 4 * q + c)
            rows["text_a"].append(f"where is the {w}")
            rows["text_b"].append(f"{'yes' if yes else 'no'} the {other} is in the city")
            rows["label"].append(int(yes))
            rows["group"].append(f"q{seed}-{q}")
            rows["source_id"].append(None)
    return pa.table(rows)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ftstore") / "store"
    store = Store.create(root)
    for corpus, questions, seed in (("toy-train", 80, 1), ("toy-dev", 25, 2)):
        part = store.write_corpus_part(corpus, 0, toy_rows(questions, seed, 100_000 * seed))
        store.commit_corpus_parts(corpus, LABELS, [part], {"file": "toy", "format": "test"})
    return root


def write_config(path: Path, store: Path, encoder: Path, out: Path) -> Path:
    path.write_text(f"""
encoder = "{encoder}"
store = "{store}"
train_corpus = "toy-train"
dev_corpus = "toy-dev"
out = "{out}"
max_length = 32
bf16 = false
threads = 1

[defaults]
epochs = 3
lr = 1e-3
batch_size = 8
warmup_ratio = 0.0

[[teacher]]
name = "tiny-list"
loss = "listwise"
seed = 1

[[teacher]]
name = "tiny-point"
loss = "balanced"
seed = 2
layers = 1
head_lr = 3e-3
""")
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "teachers" / "finetune.py"), *args],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_store, tiny_teachers) -> Path:
    d = tmp_path_factory.mktemp("ft")
    cfg = write_config(d / "train.toml", toy_store, tiny_teachers["t1"], d / "out")
    # the command line overrides the file: 4 epochs for one teacher only
    proc = run_script("--config", str(cfg), "--set", "tiny-list.epochs=4")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return d / "out"


def test_teachers_learn_the_toy_task(trained):
    report = json.loads((trained / "finetune-report.json").read_text())
    by_name = {t["name"]: t for t in report["teachers"]}
    assert set(by_name) == {"tiny-list", "tiny-point"}
    assert len(by_name["tiny-list"]["epochs"]) == 4 and len(by_name["tiny-point"]["epochs"]) == 3
    for t in by_name.values():
        dev = t["dev"]
        assert dev["groups_counted"] == 25
        # chance: MAP ~0.52 (1 correct of 4), accuracy 0.75 (always "no")
        assert dev["map"] > 0.9, t
        assert dev["accuracy"] > 0.9, t
        # the kept epoch has the best dev MAP; among equal MAPs, not a worse accuracy
        assert dev["map"] == max(e["dev"]["map"] for e in t["epochs"])
        assert all(dev["accuracy"] >= e["dev"]["accuracy"] for e in t["epochs"] if e["dev"]["map"] == dev["map"])
        assert t["seconds"] > 0


def test_written_teachers_load_and_reproduce_their_dev_scores(trained, toy_store):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.teachers.metrics import map_mrr

    specs = load_teachers_toml(trained / "teachers.toml")
    assert [s.name for s in specs] == ["tiny-list", "tiny-point"]
    report = {t["name"]: t for t in json.loads((trained / "finetune-report.json").read_text())["teachers"]}
    dev = Store(toy_store).read_corpus_part(Store(toy_store).corpus("toy-dev").parts[0]).to_pydict()
    for spec in specs:
        assert Path(spec.path) == (trained / spec.name).resolve()
        assert spec.labels == LABELS and spec.max_length == 32 and spec.dtype == "float32"
        model = AutoModelForSequenceClassification.from_pretrained(spec.path).eval()
        assert model.config.id2label == {0: "no", 1: "yes"}
        record = json.loads((Path(spec.path) / "tmkd-finetune.json").read_text())
        assert record["train_corpus"] == "toy-train" and record["config"]["seed"] == (1 if spec.name == "tiny-list" else 2)
        # `layers = 1` keeps the encoder's first layer only (the tiny encoder has 2)
        assert model.config.num_hidden_layers == (1 if spec.name == "tiny-point" else 2)
        tok = AutoTokenizer.from_pretrained(spec.path)
        with torch.no_grad():
            batch = tok(dev["text_a"], dev["text_b"], padding=True, truncation=True, max_length=32, return_tensors="pt")
            logits = model(**batch).logits.float()
        scores = torch.log_softmax(logits, -1)[:, 1].numpy()
        got = map_mrr(scores, np.array(dev["label"]) == 1, dev["group"])
        # the saved weights are the kept epoch's (not the last epoch's)
        assert got["map"] == pytest.approx(report[spec.name]["dev"]["map"], abs=1e-3)


def test_every_teacher_folder_has_a_model_card_whose_usage_runs(trained, toy_store, tiny_teachers):
    from tmkd.teachers.model_card import read_model_card

    st = Store(toy_store)
    report = {t["name"]: t for t in json.loads((trained / "finetune-report.json").read_text())["teachers"]}
    for name in ("tiny-list", "tiny-point"):
        meta, body = read_model_card(trained / name)
        card = meta["tmkd"]
        assert meta["library_name"] == "transformers" and card["kind"] == "teacher" and card["name"] == name
        assert card["base_model"] == str(tiny_teachers["t1"]) and card["label_names"] == LABELS
        assert card["metrics"]["dev"] == report[name]["dev"]
        for corpus in ("toy-train", "toy-dev"):
            m = st.corpus(corpus)
            assert card["corpora"][corpus]["rows"] == m.rows
            assert [p["digest"] for p in card["corpora"][corpus]["parts"]] == [p.digest for p in m.parts]
        assert f"`{tiny_teachers['t1']}`" in body and "## Config" in body
    # the card's "how to load it" runs as written, with plain transformers
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    probs = eval(proc.stdout.strip())  # {'no': p, 'yes': 1 - p}
    assert set(probs) == set(LABELS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_listwise_loss_matches_hand_computation():
    scores = torch.tensor([2.0, 0.0, 1.0, 0.5, -0.5, 3.0], requires_grad=True)
    relevant = np.array([True, False, True, False, True, False])
    groups = np.array([0, 0, 0, 1, 1, 2])  # group 2 has no correct candidate: it ranks nothing
    lse0 = math.log(math.exp(2) + math.exp(0) + math.exp(1))
    g0 = -(0.5 * (2 - lse0) + 0.5 * (1 - lse0))
    g1 = -(-0.5 - math.log(math.exp(0.5) + math.exp(-0.5)))
    loss = ranking.listwise_loss(scores, relevant, groups)
    assert loss.item() == pytest.approx((g0 + g1) / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[5] == 0  # the unrankable group gets no gradient

    # pairwise: mean over a group's (correct, wrong) pairs of log(1 + exp(s_wrong - s_correct))
    p0 = (math.log1p(math.exp(0 - 2)) + math.log1p(math.exp(0 - 1))) / 2
    p1 = math.log1p(math.exp(0.5 - -0.5))
    assert ranking.pairwise_loss(scores, relevant, groups).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)


def _loop_listwise(scores, relevant, groups):
    """The ranking losses written as a loop over groups: the reference for the vectorised ones."""
    losses = []
    for g in np.unique(groups[groups >= 0]):
        m = torch.from_numpy(groups == g)
        rel = torch.from_numpy(relevant[groups == g]).to(scores.dtype)
        if 0 < rel.sum() < len(rel):
            losses.append(-(rel / rel.sum() * torch.log_softmax(scores[m], dim=0)).sum())
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


def _loop_pairwise(scores, relevant, groups):
    losses = []
    for g in np.unique(groups[groups >= 0]):
        s, rel = scores[torch.from_numpy(groups == g)], torch.from_numpy(relevant[groups == g])
        if rel.any() and not rel.all():
            losses.append(torch.nn.functional.softplus(-(s[rel][:, None] - s[~rel][None, :])).mean())
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


def test_ranking_losses_match_a_loop_over_groups_on_random_batches():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 60))
        groups = np.sort(rng.integers(-1, 8, size=n))  # -1: rows without a group
        rng.shuffle(groups)
        relevant = rng.random(n) < 0.3
        for vectorised, loop in ((ranking.listwise_loss, _loop_listwise), (ranking.pairwise_loss, _loop_pairwise)):
            a = torch.tensor(rng.normal(size=n) * 3, requires_grad=True)
            b = a.detach().clone().requires_grad_(True)
            got, want = vectorised(a, relevant, groups), loop(b, relevant, groups)
            assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), (trial, vectorised.__name__)
            got.backward()
            want.backward()
            assert torch.allclose(a.grad, b.grad, atol=1e-12), (trial, vectorised.__name__)


def test_ranking_losses_never_read_values_from_the_device():
    """A GPU step must not wait for the host: on the meta device (shapes, no values) any read of a device value
    (``.item()``, ``if tensor``, data-dependent shapes) fails, so the losses must build from host arrays alone."""
    relevant = np.array([True, False, True, False, True, False, False])
    groups = np.array([0, 0, 0, 1, 1, 2, -1])
    logits = torch.empty(7, 2, device="meta")
    spec = ft.TeacherConfig(name="t", loss="listwise")
    weights = np.ones(2, dtype=np.float32)
    for loss in ("listwise", "pairwise", "pointwise", "balanced"):
        spec.loss = loss
        out = ranking.batch_loss(spec, logits, relevant.astype(np.int64), groups, 1, weights)
        assert out.device.type == "meta" and out.shape == ()


def test_relevance_score_is_the_positive_log_odds():
    logits = torch.tensor([[0.3, 1.5], [2.0, -1.0]])
    assert ranking.relevance_scores(logits, 1).tolist() == pytest.approx([1.2, -3.0])
    assert ranking.relevance_scores(logits, 0).tolist() == pytest.approx([-1.2, 3.0])


class _Rank:
    """What predict() asks of an Accelerator, for one rank of ``world``."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def unwrap_model(self, model):
        return model


def test_predict_returns_every_row_in_order_from_any_number_of_processes(tiny_teachers, monkeypatch):
    import accelerate.utils
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.teachers.scoring import READBACK_BATCHES, encode_pairs, length_batches

    folder = tiny_teachers["t1"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    a = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(45)]
    b = [" ".join(rng.choice(WORDS, size=rng.integers(1, 20))) for _ in range(45)]
    enc = encode_pairs(tok, a, b, 32, "longest_first")
    with torch.no_grad():  # one row at a time, unpadded, truncated as encode_pairs does: the reference
        want = np.concatenate([model(**tok(x, y, truncation="longest_first", max_length=32,
                                           return_tensors="pt")).logits.numpy() for x, y in zip(a, b)])

    # 64 tokens per batch: many batches of mixed lengths, more than one read-back of READBACK_BATCHES
    assert len(length_batches(enc.lengths, 64)) > READBACK_BATCHES
    one = ft.predict(_Rank(0, 1), model, enc, 64, tok.pad_token_id)
    assert np.allclose(one, want, atol=1e-5)

    shares = {}
    def gather(objs):  # each rank's (rows, logits); rank 0 gets both
        shares[len(shares)] = objs[0]
        return [shares[k] for k in sorted(shares)]
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    ft.predict(_Rank(1, 2), model, enc, 64, tok.pad_token_id)  # rank 1's share first, then rank 0 gathers both
    two = ft.predict(_Rank(0, 2), model, enc, 64, tok.pad_token_id)
    assert np.allclose(two, want, atol=1e-5)


def test_group_batches_keep_questions_whole():
    rng = np.random.default_rng(0)
    members = [np.arange(i * 5, i * 5 + 5) for i in range(10)] + [np.arange(50, 90)]  # one question of 40
    lengths = rng.integers(5, 50, size=90)
    batches = splits.group_batches(members, lengths, 16, rng)
    seen = np.sort(np.concatenate(batches))
    assert seen.tolist() == list(range(90))  # every row once
    for b in batches:
        assert len(b) <= 16 or len(b) == 40
        for m in members:
            assert np.isin(m, b).all() or not np.isin(m, b).any()


def test_micro_batches_keep_questions_whole_within_the_token_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 60, size=1000)
    for trial in range(50):
        n = int(rng.integers(1, 40))
        groups = rng.integers(-1, 6, size=n)  # -1: rows without a group; a group's rows need not be adjacent
        rows = rng.permutation(1000)[:n]
        budget = int(rng.integers(40, 600))
        parts = splits.micro_batches(rows, groups, lengths, budget)
        assert sorted(np.concatenate(parts).tolist()) == sorted(rows.tolist()), trial  # every row once
        part_of = {r: i for i, p in enumerate(parts) for r in p.tolist()}
        group_of = dict(zip(rows.tolist(), groups.tolist()))
        for g in set(groups.tolist()) - {-1}:
            assert len({part_of[r] for r in rows[groups == g].tolist()}) == 1, (trial, g)  # never split
        for p in parts:
            ids = {group_of[r] for r in p.tolist()}
            # over the budget only as one question (or one lone row)
            assert splits.padded_tokens(p, lengths) <= budget or (len(ids) == 1 and (-1 not in ids or len(p) == 1))
        for p, after in zip(parts, parts[1:]):  # greedy: the next part's first question would not have fitted
            first = after[[group_of[r] == group_of[after[0].item()] for r in after.tolist()]] \
                if group_of[after[0].item()] >= 0 else after[:1]
            assert splits.padded_tokens(np.concatenate([p, first]), lengths) > budget, trial
        whole = splits.padded_tokens(rows, lengths)
        assert len(splits.micro_batches(rows, groups, lengths, whole)) == 1  # a batch at the budget stays whole
    for trial in range(30):
        rows = rng.permutation(1000)[: int(rng.integers(1, 40))]
        budget = int(rng.integers(20, 300))
        chunks = splits.token_chunks(rows, lengths, budget)
        assert sorted(np.concatenate(chunks).tolist()) == sorted(rows.tolist())
        assert all(splits.padded_tokens(c, lengths) <= budget or len(c) == 1 for c in chunks)
        for c, after in zip(chunks, chunks[1:]):  # greedy too
            assert splits.padded_tokens(np.concatenate([c, after[:1]]), lengths) > budget


def test_cross_entropy_terms_are_the_plain_and_class_weighted_means():
    """The losses divide sums by loss_denominators; over one whole batch that must be torch's own means."""
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(40, 2)), dtype=torch.float32)
    labels = (rng.random(40) < 0.2).astype(np.int64)
    groups = rng.integers(-1, 5, size=40)
    weights = ranking.class_weights(labels, 2)
    point = ranking.batch_loss(ft.TeacherConfig(name="t", loss="pointwise"), logits, labels, groups, 1, weights)
    balanced = ranking.batch_loss(ft.TeacherConfig(name="t", loss="balanced"), logits, labels, groups, 1, weights)
    y = torch.from_numpy(labels)
    assert point.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    want = torch.nn.functional.cross_entropy(logits, y, weight=torch.from_numpy(weights)).item()
    assert balanced.item() == pytest.approx(want, rel=1e-6) and want != pytest.approx(point.item(), rel=1e-3)


class _CountingSync:
    """An accelerator stand-in that records, for each backward, whether DDP would all-reduce on it."""

    def __init__(self):
        from accelerate import Accelerator

        self.real, self.inside, self.backwards = Accelerator(cpu=True), 0, []
        self.device = self.real.device

    @contextlib.contextmanager
    def no_sync(self, model):
        self.inside += 1
        yield
        self.inside -= 1

    def autocast(self):
        return self.real.autocast()

    def backward(self, loss, **kwargs):
        self.backwards.append(self.inside == 0)
        loss.backward(**kwargs)


@pytest.mark.parametrize("budget", [100, 40])
def test_gradients_are_all_reduced_once_per_step_on_its_last_backward(budget, tmp_path, toy_store, tiny_teachers):
    """Under DDP every backward outside no_sync all-reduces: it must be one per step, the last, whether the step
    runs in parts (budget 100) or a question in chunks (budget 40)."""
    cfg = ft.load_config(write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out"))
    data = ft.prepare_data(cfg, tiny_teachers["t1"])
    spec = ft.TeacherConfig(name="t", loss="listwise", batch_size=8)
    batches = ft.batch_maker(spec, data, np.random.default_rng(0))()[:3]
    model = ft.load_model(data.encoder, spec, data.train.label_names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    acc, steps = _CountingSync(), []
    acc.clip_grad_norm_ = lambda *a: None
    seen = 0

    def advance(step, loss):
        nonlocal seen
        steps.append(acc.backwards[seen:])
        seen = len(acc.backwards)

    ft.train_epoch(acc, model, optimizer, scheduler, spec, data, batches, advance, budget=budget)
    assert len(steps) == 3 and all(len(s) > 1 for s in steps)  # several backwards per step
    assert all(s == [False] * (len(s) - 1) + [True] for s in steps), steps


def _train_three_steps(data, spec, batches, micro_tokens, dropout: bool):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(0)
    model = ft.load_model(data.encoder, spec, data.train.label_names)
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):  # BERT's attention dropout reads its p too
                m.p = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = ft.train_epoch(Accelerator(cpu=True), model, optimizer, scheduler, spec, data, batches, lambda *a: None,
                          budget=micro_tokens or sys.maxsize)
    return loss, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss", ["listwise", "pairwise", "balanced", "pointwise"])
def test_micro_batched_steps_train_the_same_weights_as_whole_batches(loss, tmp_path, toy_store, tiny_teachers):
    """micro_batch_tokens trades activation memory for nothing else: with dropout off, three steps run in parts
    of whole questions (budget 100), or with every question split into chunks of rows and its loss carried
    back chunk by chunk (budget 40), end at the weights that three whole-batch steps reach."""
    cfg = ft.load_config(write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out"))
    data = ft.prepare_data(cfg, tiny_teachers["t1"])
    spec = ft.TeacherConfig(name="t", loss=loss, batch_size=8, seed=3)
    batches = ft.batch_maker(spec, data, np.random.default_rng(0))()[:3]
    lengths, groups = data.enc_train.lengths, ft.group_index(data.train.groups)[0]
    whole_loss, whole = _train_three_steps(data, spec, batches, None, dropout=False)
    before = ft.load_model(data.encoder, spec, data.train.label_names).state_dict()
    assert max(float((whole[k] - before[k]).abs().max()) for k in whole if "classifier" not in k) > 1e-3  # it moved
    for budget in (100, 40):  # toy batches: 2 questions, 168-176 padded tokens; a question 84-88
        ranked = loss in ranking.GROUP_LOSSES  # whole questions; the pointwise losses split batches anywhere
        parts = [p for b in batches for p in splits.micro_batches(b, groups[b] if ranked else -np.ones_like(b),
                                                                   lengths, budget)]
        assert len(parts) > len(batches)  # the batches were split
        assert any(splits.padded_tokens(p, lengths) > budget for p in parts) == (budget == 40 and ranked)
        parts_loss, trained = _train_three_steps(data, spec, batches, budget, dropout=False)
        assert parts_loss == pytest.approx(whole_loss, rel=1e-5), budget
        for k in whole:
            assert torch.allclose(whole[k], trained[k], atol=1e-5, rtol=1e-4), (budget, k)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_part_run_in_chunks_replays_its_dropout(tmp_path, toy_store, tiny_teachers, device):
    """The chunked path scores without a graph, then runs each chunk again to carry the gradient back: its
    dropout masks must be the first pass's, else the gradient is not the loss's. Compared, with dropout on,
    against the same chunks run once with their graph from the same random state (on a GPU too, where there
    is one: its dropout draws from the GPU's generator)."""
    from accelerate import Accelerator

    cfg = ft.load_config(write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out"))
    data = ft.prepare_data(cfg, tiny_teachers["t1"])
    spec = ft.TeacherConfig(name="t", loss="listwise")
    groups, weights = ft.group_index(data.train.groups)[0], ranking.class_weights(data.train.labels, 2)
    rows = np.flatnonzero(groups == groups[0])  # one question
    chunks = splits.token_chunks(rows, data.enc_train.lengths, 20)
    assert len(chunks) > 1
    denominators = ranking.loss_denominators(spec, data.train.labels[rows], groups[rows], data.positive, weights)
    loss_of = lambda logits, r: ranking.batch_loss(spec, logits, data.train.labels[r], groups[r], data.positive,  # noqa: E731
                                                   weights, denominators)
    grads = []
    for chunked in (True, False):
        torch.manual_seed(0)
        model = ft.load_model(data.encoder, spec, data.train.label_names).to(device).train()
        torch.manual_seed(5)
        if chunked:
            ft.backward_part(Accelerator(cpu=device == "cpu"), model, data, rows, loss_of, 20, sync=True)
        else:
            padded = [ft.pad_batch(data.enc_train, c, data.pad_id) for c in chunks]
            logits = [model(**{k: v.to(device) for k, v in batch.items()}).logits for batch in padded]
            loss_of(torch.cat(logits).float(), np.concatenate(chunks)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_user_errors_are_one_line_messages(tmp_path, toy_store, tiny_teachers):
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    with pytest.raises(ft.FinetuneError, match="loss 'softmax' is not one of"):
        ft.load_config(cfg, sets=["loss=softmax"])
    with pytest.raises(ft.FinetuneError, match="no teacher named 'nope'"):
        ft.load_config(cfg, sets=["nope.lr=1e-4"])
    with pytest.raises(ft.FinetuneError, match="layers 5 but the encoder has 2"):
        ft.check_depth(tiny_teachers["t1"], ft.load_config(cfg, sets=["tiny-point.layers=5"]).teacher)
    with pytest.raises(ft.FinetuneError, match="not a Hugging Face model folder"):
        ft.resolve_encoder(str(tmp_path))
    c = ft.load_config(cfg, {"out": str(tmp_path / "o2")}, ["lr=2e-4", "tiny-point.epochs=5"])
    assert [t.lr for t in c.teacher] == [2e-4, 2e-4] and [t.epochs for t in c.teacher] == [3, 5]
    assert c.out == str(tmp_path / "o2")

    proc = run_script("--config", str(cfg), "--dev-corpus", "missing")
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "no corpus 'missing'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_head_lr_applies_to_the_new_head_and_pooler_only(tiny_teachers):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_teachers["t1"])
    spec = ft.TeacherConfig(name="x", lr=1e-5, head_lr=1e-3, weight_decay=0.01)
    groups = ft.param_groups(model, spec)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter exactly once
    assert lr_of[id(named["classifier.weight"])] == (1e-3, 0.01)
    assert lr_of[id(named["bert.pooler.dense.bias"])] == (1e-3, 0.0)
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == (1e-5, 0.01)
    assert lr_of[id(named["bert.embeddings.LayerNorm.weight"])] == (1e-5, 0.0)


def test_finetune_bounds_the_cpu_caches_before_training(tmp_path, toy_store, tiny_teachers, monkeypatch):
    """Unbounded, oneDNN's per-shape kernel cache and glibc's arenas grew fine-tuning to 7 GB over three teachers
    (BENCHMARKS.md): the job bounds them before its first model is loaded, and gives freed memory back after every
    epoch and teacher."""
    import tmkd.teachers.finetune as ft

    calls = []
    load_model = ft.load_model
    monkeypatch.setattr(ft, "bound_cpu_caches", lambda: calls.append("bound"))
    monkeypatch.setattr(ft, "release_free_memory", lambda: calls.append("release"))
    monkeypatch.setattr(ft, "load_model", lambda *a: calls.append("load") or load_model(*a))
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    ft.run(ft.load_config(cfg, sets=["defaults.epochs=2"]))
    assert calls == ["bound"] + ["load", "release", "release", "release"] * 2  # 2 teachers: 2 epochs, then the end


# ---- bad input: one typed error naming the file or the --set and the field; nothing written ----------------------
def fresh_store(root: Path) -> Path:
    """A toy store of the test's own, for tests that check nothing is written into it."""
    store = Store.create(root)
    for corpus, questions, seed in (("toy-train", 12, 1), ("toy-dev", 6, 2)):
        part = store.write_corpus_part(corpus, 0, toy_rows(questions, seed, 100_000 * seed))
        store.commit_corpus_parts(corpus, LABELS, [part], {"file": "toy", "format": "test"})
    return root


def files_under(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_out_inside_the_store_is_refused_before_anything_is_written(tmp_path, tiny_teachers):
    """Outputs in the store made every later reader fail ("unreadable teacher record"): refused up front, also
    through a symlink, and for a teacher folder that would land on the store."""
    store = fresh_store(tmp_path / "store")
    before = files_under(store)
    cfg = write_config(tmp_path / "c.toml", store, tiny_teachers["t1"], tmp_path / "out")
    (tmp_path / "link").symlink_to(store)
    for out in (store / "teachers", tmp_path / "link" / "teachers"):
        proc = run_script("--config", str(cfg), "--out", str(out), "--set", "defaults.epochs=1")
        assert proc.returncode == 1, proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr
        assert error_lines(proc.stderr) == [f"error: --out {out}: out {out} is inside the store {store}; "
                                            "fine-tuning never writes into a store"], proc.stderr
        assert files_under(store) == before  # no teachers.toml, no report, no folder
    # OUT beside the store, but a teacher named like the store's folder would be written into it
    clash = ft.load_config(cfg, {"out": str(tmp_path)}, ["tiny-list.name=store"])
    with pytest.raises(ft.FinetuneError, match=r"is inside the store"):
        ft.check_out(clash)


BAD_SETS = [  # (--set, the field its message names); each used to train (or crash with a traceback)
    ("lr=inf", "lr must be a finite number"),
    ("weight_decay=nan", "weight_decay must be a finite number"),
    ("max_grad_norm=nan", "max_grad_norm must be a finite number"),
    ("head_lr=inf", "head_lr must be a finite number"),
    ("weight_decay=-1", "weight_decay must be >= 0"),
    ("tiny-list.seed=5000000000", "seed must be in [0, 2**32)"),
    ("seed=-1", "seed must be in [0, 2**32)"),
    ("threads=-1", "threads -1 must be >= 0"),
    ("max_train_rows=0", "max_train_rows 0 must be >= 1"),
    ("max_train_rows=-3", "max_train_rows -3 must be >= 1"),
    ("max_dev_rows=0", "max_dev_rows 0 must be >= 1"),
    ("eval_batch_tokens=0", "eval_batch_tokens 0 must be >= 1"),
    ("eval_batch_tokens=-5", "eval_batch_tokens -5 must be >= 1"),
    ("log_every=0", "log_every 0 must be >= 1"),
    ("epochs=0", "epochs must be >= 1"),
    ("max_length=7", "max_length 7 out of range 8..8192"),
    ("max_length=512", "max_length 512 is more than the 128 tokens the encoder can position (max_position_embeddings = 128"),
]


@pytest.mark.parametrize("item, message", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_a_bad_set_value_is_a_one_line_error_naming_the_set(item, message, tmp_path, toy_store, tiny_teachers,
                                                             capsys):
    """The CLI's main (in process: an uncaught exception fails the test): exit 1, the message starts with the
    --set as given and names the field, nothing is written. max_length=512 is past the tiny encoder's 128
    position embeddings: refused before training, not an index error once a long text comes."""
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    code = ft.main(["--config", str(cfg), "--set", item, "--set", "defaults.epochs=1"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: --set {item}: "), err
    assert message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_bad_set_is_refused_by_the_script_without_a_traceback(tmp_path, toy_store, tiny_teachers):
    """`--set lr=inf` trained a nan model, exited 0 and wrote it into teachers.toml."""
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    proc = run_script("--config", str(cfg), "--set", "lr=inf", "--set", "defaults.epochs=1")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == ["error: --set lr=inf: teacher 'tiny-list': lr must be a finite number, "
                                        "not inf"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_range_errors_name_the_file_or_the_set_that_gave_the_value(tmp_path, toy_store, tiny_teachers):
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")

    def error_of(*sets: str, overrides=None) -> str:
        with pytest.raises(ft.FinetuneError) as e:
            ft.load_config(cfg, overrides, list(sets))
        return str(e.value)

    assert error_of("epochs=0") == "--set epochs=0: teacher 'tiny-list': epochs must be >= 1, not 0"
    assert error_of("tiny-point.epochs=0") == \
        "--set tiny-point.epochs=0: teacher 'tiny-point': epochs must be >= 1, not 0"
    assert error_of("defaults.epochs=0") == "--set defaults.epochs=0: teacher 'tiny-list': epochs must be >= 1, not 0"
    assert error_of("teacher.1={name = 'x', epochs = 0}") == \
        "--set teacher.1={name = 'x', epochs = 0}: teacher 'x': epochs must be >= 1, not 0"
    assert error_of("max_length=7") == "--set max_length=7: max_length 7 out of range 8..8192"
    # a --set of another key leaves the blame on the file
    cfg.write_text(cfg.read_text().replace("epochs = 3", "epochs = 0"))
    assert error_of("lr=1e-4") == f"{cfg}: teacher 'tiny-list': epochs must be >= 1, not 0"
    cfg.write_text(cfg.read_text().replace("max_length = 32", "max_length = 7"))
    assert error_of("defaults.epochs=1") == f"{cfg}: max_length 7 out of range 8..8192"


def test_a_dedicated_option_wins_over_a_set_of_the_same_key_as_in_the_trainer(tmp_path, toy_store, tiny_teachers):
    """`tmkd-train --output B --set output=A` writes to B: fine-tuning's --out (and --store, ...) likewise."""
    from tmkd.student.config import load_config as load_train

    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    got = ft.load_config(cfg, {"out": "B", "dev_corpus": "toy-train"}, ["out=A", "dev_corpus=x"])
    assert (got.out, got.dev_corpus) == ("B", "toy-train")
    assert got.source_of("out") == "--out B"
    student = tmp_path / "s.toml"
    student.write_text('store = "S"\noutput = "O"\n[student]\nencoder = "E"\n[[stages]]\ncorpora = ["c"]\n')
    assert load_train(student, ["output=A"], output="B").output == "B"


@pytest.mark.parametrize("norm, clipped", [(-1.0, False), (0.0, False), (0.5, True)])
def test_max_grad_norm_at_or_below_zero_means_no_clipping(norm, clipped, tmp_path, toy_store, tiny_teachers):
    """A negative norm was passed to clipping (gradient ascent: dev MAP 0.652 against 0.788); <= 0 means no
    clipping, as in the student trainer (student/loop.py)."""
    cfg = ft.load_config(write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out"))
    data = ft.prepare_data(cfg, tiny_teachers["t1"])
    spec = ft.TeacherConfig(name="t", loss="pointwise", batch_size=8, max_grad_norm=norm)
    batches = ft.batch_maker(spec, data, np.random.default_rng(0))()[:2]
    model = ft.load_model(data.encoder, spec, data.train.label_names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    acc, calls = _CountingSync(), []
    acc.clip_grad_norm_ = lambda params, max_norm: calls.append(max_norm)
    ft.train_epoch(acc, model, optimizer, scheduler, spec, data, batches, lambda *a: None, budget=sys.maxsize)
    assert calls == ([norm] * 2 if clipped else [])


def test_a_diverged_teacher_stops_the_run_and_is_not_written(tmp_path, toy_store, tiny_teachers, monkeypatch):
    """A loss that turns nan (here: made so) must not end in a reported, listed teacher: the run stops at the
    epoch's read-back with a clear error, and neither the teacher's folder nor teachers.toml is written."""
    loss = ft.batch_loss
    monkeypatch.setattr(ft, "batch_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    cfg = ft.load_config(write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out"),
                         sets=["defaults.epochs=1"])
    with pytest.raises(ft.FinetuneError, match=r"^teacher 'tiny-list' epoch 1: the training loss \(nan\) or the dev "
                                               r"logits are not finite numbers: training diverged"):
        ft.run(cfg)
    assert not (tmp_path / "out" / "teachers.toml").exists() and not (tmp_path / "out" / "tiny-list").exists()
    assert not (tmp_path / "out" / "finetune-report.json").exists()


def test_a_learning_rate_that_diverges_exits_1_and_lists_no_teacher(tmp_path, toy_store, tiny_teachers):
    """lr=1e10 is a valid number whose training turns nan: the script used to exit 0 and list the nan teacher in
    teachers.toml. Now exit 1, one error line naming the teacher, no traceback, nothing of the teacher written."""
    cfg = write_config(tmp_path / "c.toml", toy_store, tiny_teachers["t1"], tmp_path / "out")
    proc = run_script("--config", str(cfg), "--set", "lr=1e10", "--set", "defaults.epochs=1")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: teacher 'tiny-list' epoch 1: the training loss"), proc.stderr
    assert "not finite" in lines[0]
    assert not (tmp_path / "out" / "teachers.toml").exists() and not (tmp_path / "out" / "tiny-list").exists()

"""`tmkd-label report`: its numbers against an independent numpy computation, its page in a real browser.

The store: the toy corpora (tests/toy.py; train and dev labelled, dev in groups of 4 candidates,
unlabeled without labels) scored by three noisy teachers; then one of t2's train parts damaged
and t3's unlabeled part 1 removed, so coverage has a damaged and a missing part. The numpy side
reads the Parquet files itself and applies the textbook definitions (teachers/metrics.map_mrr
for MAP and MRR, the project's one definition, tested against brute force in test_metrics.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import toy
from test_label import cli
from test_store_trust import flip_logit_bytes, tree_digests
from tmkd.data.store import Store, logits_to_numpy
from tmkd.teachers.metrics import map_mrr

TEACHERS = ("t1", "t2", "t3")
BINS = 20


@pytest.fixture(scope="module")
def report_store(tmp_path_factory, encoder) -> tuple[Path, Path]:
    """The damaged toy store, and one real student run trained on it."""
    from tmkd.student.config import config_from_dict
    from tmkd.student.train import run

    root = tmp_path_factory.mktemp("report")
    store = toy.build_store(root / "store", teachers=TEACHERS, dev=())
    toy.add_corpus(store, "dev", [24, 24], list(TEACHERS), seed=3, id_offset=200_000, group_size=4)
    raw = toy.config(root / "store", encoder, root / "student", teachers=["t1", "t2"])
    raw["eval"]["positive_label"] = "pos"
    raw["stages"][0]["epochs"] = 2
    run(config_from_dict(raw))
    flip_logit_bytes(store.label_path("t2", "train", 1))
    for f in (store.label_path("t3", "unlabeled", 1), store.commit_path(store.label_path("t3", "unlabeled", 1))):
        f.unlink()
    return root / "store", root / "student"


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def expected(store_dir: Path, corpus: str) -> dict:
    """The report's numbers for one corpus, from the files, in numpy."""
    st = Store(store_dir)
    parts = st.corpus(corpus).parts
    tables = [pq.read_table(p.path) for p in parts]
    label = np.concatenate([t.column("label").to_numpy(zero_copy_only=False).astype(float) for t in tables])
    groups = sum((t.column("group").to_pylist() for t in tables), [])
    part_of = np.concatenate([np.full(p.rows, p.part) for p in parts])
    logits, valid = {}, {}
    for name in TEACHERS:
        blocks, ok = [], []
        for p in parts:
            check = st.check_label(st.teacher(name), p)  # the files as they are; damaged ones are NaN here
            good = check.status == "ok"
            blocks.append(logits_to_numpy(pq.read_table(check.path).column("logits")) if good
                          else np.full((p.rows, 2), np.nan, np.float32))
            ok.append(np.full(p.rows, good))
        logits[name], valid[name] = np.concatenate(blocks).astype(np.float64), np.concatenate(ok)
    out = {"valid_parts": {t: len({int(x) for x in part_of[valid[t]]}) for t in TEACHERS},
           "rows_valid": {t: int(valid[t].sum()) for t in TEACHERS}, "agreement": {}, "correlation": {}}
    for i, a in enumerate(TEACHERS):
        for b in TEACHERS[i + 1:]:
            both = valid[a] & valid[b]
            if not both.any():
                continue
            pa_, pb = softmax(logits[a][both]), softmax(logits[b][both])
            out["agreement"][a, b] = float((pa_.argmax(1) == pb.argmax(1)).mean())
            out["correlation"][a, b] = float(np.mean([np.corrcoef(pa_[:, k], pb[:, k])[0, 1] for k in range(2)]))
    every = valid["t1"] & valid["t2"] & valid["t3"]
    ensemble = np.where(every[:, None], (logits["t1"] + logits["t2"] + logits["t3"]) / 3, np.nan)
    members = {**logits, "ensemble": ensemble}
    out["calibration"], out["ranking"] = {}, {}
    for who, x in members.items():
        ok = ~np.isnan(x[:, 0])
        if not ok.any():
            continue
        p = softmax(x[ok])
        conf = p.max(1)
        hist = np.bincount(np.minimum(np.floor(conf * BINS), BINS - 1).astype(int), minlength=BINS)
        cal = {"histogram": hist.tolist()}
        gold = label[ok]
        lab = ~np.isnan(gold)
        if lab.any():
            correct = p[lab].argmax(1) == gold[lab]
            b = np.minimum(np.floor(conf[lab] * BINS), BINS - 1).astype(int)
            ece = sum((b == k).sum() / lab.sum() * abs(correct[b == k].mean() - conf[lab][b == k].mean())
                      for k in range(BINS) if (b == k).any())
            cal.update(accuracy=float(correct.mean()), ece=float(ece))
        out["calibration"][who] = cal
        if any(g is not None for g in groups):
            full = {g for g in set(groups) if all(ok[i] for i in range(len(groups)) if groups[i] == g)}
            keep = np.array([g in full for g in groups])
            z = x[keep] - x[keep].max(1, keepdims=True)
            logp = z[:, 1] - np.log(np.exp(z).sum(1))  # positive class "pos" is index 1
            out["ranking"][who] = map_mrr(logp, label[keep] == 1, [g for g, k in zip(groups, keep) if k])
    return out


def test_the_reports_numbers_equal_numpys_and_the_store_is_untouched(report_store, tmp_path):
    store, student = report_store
    before = tree_digests(store)
    res = cli("report", "--store", store, "--runs", student, "--out", tmp_path / "r.html", "--top", 5)
    assert tree_digests(store) == before  # a report never writes into the store
    assert "1 label parts left out as invalid: t2/train/1" in res.stderr
    assert f"-> {tmp_path / 'r.html'} (+ r.json)" in res.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    rows = sum(Store(store).corpus(c).rows for c in ("train", "unlabeled", "dev"))
    read = sum(c["pairs_scanned"] for c in data["corpora"].values())
    assert 0 < read <= rows and f"report of 3 corpora ({rows:,} rows, {read:,} scored pairs read)" in res.stdout

    cov = data["corpora"]["train"]["coverage"]["t2"]
    assert (cov["parts"], cov["committed"], cov["valid"], cov["damaged"], cov["missing"]) == (3, 3, 2, 1, 0)
    cov = data["corpora"]["unlabeled"]["coverage"]["t3"]
    assert (cov["parts"], cov["committed"], cov["valid"], cov["damaged"], cov["missing"]) == (2, 1, 1, 0, 1)
    for corpus in ("train", "dev", "unlabeled"):
        got, want = data["corpora"][corpus], expected(store, corpus)
        for t in TEACHERS:
            assert got["coverage"][t]["valid"] == want["valid_parts"][t], (corpus, t)
            assert got["coverage"][t]["rows_valid"] == want["rows_valid"][t], (corpus, t)
        for (a, b), v in want["agreement"].items():
            i, j = TEACHERS.index(a), TEACHERS.index(b)
            assert got["agreement"][i][j] == pytest.approx(v, abs=1e-9), (corpus, a, b)
            assert got["correlation"][i][j] == pytest.approx(want["correlation"][a, b], abs=1e-5), (corpus, a, b)
        for who, cal in want["calibration"].items():
            assert got["calibration"][who]["histogram"] == cal["histogram"], (corpus, who)
            if corpus == "unlabeled":
                assert "ece" not in got["calibration"][who]
                continue
            assert got["calibration"][who]["accuracy"] == pytest.approx(cal["accuracy"], abs=1e-9), (corpus, who)
            assert got["calibration"][who]["ece"] == pytest.approx(cal["ece"], abs=1e-5), (corpus, who)
        if corpus == "dev":
            assert set(got["ranking"]) == set(want["ranking"]) == {*TEACHERS, "ensemble"}
            for who, r in want["ranking"].items():
                assert got["ranking"][who]["map"] == pytest.approx(r["map"], abs=1e-9), who
                assert got["ranking"][who]["mrr"] == pytest.approx(r["mrr"], abs=1e-9), who
                assert got["ranking"][who]["groups"] == r["groups_counted"] == 12, who
        else:
            assert "ranking" not in got  # no groups

    # the disagreements: the pairs with the largest spread of one class's probability, with their texts
    train = data["corpora"]["train"]
    assert len(train["disagreements"]) == 5
    st = Store(store)
    for d in train["disagreements"]:
        row = pq.read_table(st.corpus("train").parts[d["part"]].path).slice(d["row"], 1).to_pylist()[0]
        assert (d["id"], d["text_a"], d["text_b"], d["label"]) == (row["id"], row["text_a"], row["text_b"],
                                                                  toy.LABEL_NAMES[row["label"]])
        probs = [d["probs"][t] for t in TEACHERS if t in d["probs"]]
        assert d["spread"] == pytest.approx(max(max(p[k] for p in probs) - min(p[k] for p in probs)
                                                for k in range(2)), abs=1e-6)
    assert [d["spread"] for d in train["disagreements"]] == sorted((d["spread"] for d in train["disagreements"]),
                                                                   reverse=True)

    # the student: curves from its metrics.jsonl, its teachers and whether the store still has them
    (run,) = data["students"]
    lines = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    assert run["curves"] == lines and run["metric"] == "map" and run["eval_corpus"] == "dev"
    assert [(t["name"], t["in_store"]) for t in run["teachers"]] == [("t1", True), ("t2", True)]


def test_report_refuses_bad_arguments_with_one_line(report_store, tmp_path):
    store, _ = report_store
    for args, message in (
        (["--out", store / "r.html"], "a report never writes into a store"),
        (["--out", tmp_path / "no" / "r.html"], "does not exist"),
        (["--out", tmp_path / "r.html", "--corpus", "nope"], "--corpus nope: no such corpus"),
        (["--out", tmp_path / "r.html", "--runs", tmp_path], "not a student run folder"),
        (["--out", tmp_path / "r.json"], "name it .html"),
    ):
        res = cli("report", "--store", store, *args, ok=False)
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r.html").exists() and not (store / "r.html").exists()


def test_report_edge_cases_stale_parts_one_corpus_no_top_and_unlabelled_label_space(report_store, tmp_path):
    source, _ = report_store
    store = tmp_path / "store"
    shutil.copytree(source, store)
    st = Store(store)
    toy.add_corpus(st, "plain", [16, 16], list(TEACHERS), seed=9, id_offset=900_000, label_names=None)
    rec = st.teacher("t1")
    rec.fingerprint = "toy:t1-retrained"  # every t1 part is now stale (listed on stderr), but none is damaged
    st.write_teacher(rec)
    res = cli("report", "--store", store, "--out", tmp_path / "r.html", "--top", 0, "--corpus", "plain")
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["corpora"]) == ["plain"]
    assert "unknown corpus" not in res.stderr and "t2/train" not in res.stderr  # the other corpora are out of scope
    plain = data["corpora"]["plain"]
    assert (plain["coverage"]["t1"]["stale"], plain["coverage"]["t1"]["damaged"], plain["coverage"]["t1"]["valid"]) \
        == (2, 0, 0)
    assert plain["teachers"] == list(TEACHERS) and plain["disagreements"] == []
    # a corpus without label names takes its teachers' width: t2 and t3 are compared on both classes
    want = expected(store, "plain")
    assert plain["correlation"][1][2] == pytest.approx(want["correlation"]["t2", "t3"], abs=1e-5)
    assert plain["agreement"][1][2] == pytest.approx(want["agreement"]["t2", "t3"], abs=1e-9)
    assert plain["agreement"][0][1] is None  # t1 has no valid part here
    assert "ensemble" not in plain["calibration"]  # the ensemble needs every teacher of the corpus on a row


def test_teacher_names_that_sql_cannot_tell_apart_are_refused(tmp_path):
    from tmkd.data.store import StoreError

    st = toy.build_store(tmp_path / "store", teachers=("t1",), dev=())
    for name, message in (("T1", "only in case"), ("label", "reserved"), ("Group", "reserved")):
        with pytest.raises(StoreError, match=message):
            st.write_teacher(toy.teacher_record(name))
    # a store written before the check: the scores view says why it cannot show it
    (st.root / "teachers" / "T1.json").write_text(json.dumps({**json.loads(st.teacher_path("t1").read_text()),
                                                              "name": "T1"}))
    res = cli("query", "--store", st.root, "SELECT count(*) FROM scores", ok=False)
    assert res.exit_code == 1 and "only in case" in res.output and "Traceback" not in res.output


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def test_the_report_renders_in_headless_chromium_with_no_request_and_no_error(report_store, tmp_path):
    """Opened as a user opens a mailed file: every chart drawn at a real size, no console error, nothing fetched."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: apt-get install chromium (.ci/run installs it)"
    store, student = report_store
    page_path = tmp_path / "report.html"
    cli("report", "--store", store, "--runs", student, "--out", page_path)
    url = page_path.as_uri()
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/*", lambda route: (requests.append(route.request.url),
                                              route.continue_() if route.request.url == url else route.abort()))
            page.goto(url, wait_until="load")
            charts = page.eval_on_selector_all("figure.chart svg", "els => els.map(e => { const r = "
                                                                   "e.getBoundingClientRect(); return [r.width, r.height] })")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            sections = page.eval_on_selector_all("section h2", "els => els.map(e => e.textContent)")
            page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
        finally:
            browser.close()
    assert requests == [url]  # the page itself, and nothing else: no font, script, image or beacon
    assert errors == []
    assert sections == ["Coverage", "Teacher agreement", "Confidence", "Calibration and ranking", "Disagreements",
                        "Students"]
    # agreement: 3 corpora; confidence: 3; reliability: the 2 labelled corpora; the student's curves: 1
    assert len(charts) == 9 and all(w > 100 and h > 100 for w, h in charts), charts
    assert all(complete and width > 0 for complete, width in images)
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert shot.shape[1] == 1280 and shot.shape[0] > 2000 and shot.std() > 10  # a long page, not a blank one


def test_a_store_with_no_teachers_reports_its_rows_not_zero_pairs(tmp_path):
    """Before any teacher has scored, the summary still counts the corpus's rows (it once said "0 pairs")."""
    store = Store.create(tmp_path / "store")
    toy.add_corpus(store, "train", [16, 8], [], seed=4)
    res = cli("report", "--store", tmp_path / "store", "--out", tmp_path / "r.html")
    assert "report of 1 corpora (24 rows, 0 scored pairs read), 0 teachers" in res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["corpora"]["train"]["rows"] == 24

"""The label stage end to end, through the real `tmkd-label` CLI: ingest → run → status → query → verify."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tmkd.pipeline.cli import app
from tmkd.data.store import Store, logits_to_numpy

runner = CliRunner()
BIN = Path(sys.executable).parent


def cli(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok and result.exit_code != 0:
        raise AssertionError(f"tmkd-label {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}")
    return result


def write_teachers(path: Path, teachers: dict[str, Path], max_length: int = 64, **extra) -> Path:
    lines = []
    for name, folder in teachers.items():
        lines += ["[[teacher]]", f'name = "{name}"', f'path = "{folder}"', f"max_length = {max_length}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def store_logits(store: Path, teacher: str, corpus: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) of a teacher over a whole corpus, in corpus order."""
    st = Store(store)
    ids, logits = [], []
    for part in st.corpus(corpus).parts:
        t = pq.read_table(st.label_path(teacher, corpus, part.part))
        ids.append(t.column("id").to_numpy())
        logits.append(logits_to_numpy(t.column("logits")))
    return np.concatenate(ids), np.concatenate(logits)


def direct_logits(folder: Path, text_a: list[str], text_b: list[str], max_length: int) -> np.ndarray:
    """The reference: the same teacher, one pair at a time, no padding, no sorting."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for a, b in zip(text_a, text_b):
            enc = tok(a, b, truncation="longest_first", max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0].numpy())
    return np.stack(out)


@pytest.fixture
def rte_sample(tmp_path, shared_data) -> Path:
    path = tmp_path / "rte-train.tsv"
    path.write_text("".join((shared_data / "rte" / "train.tsv").read_text().splitlines(keepends=True)[:41]))
    return path


@pytest.mark.parametrize("fmt", ["wikiqa", "glue"])
def test_ingest_run_status_query_verify_matches_direct_forward(tmp_path, fmt, wikiqa_sample, rte_sample, tiny_teachers):
    source = wikiqa_sample if fmt == "wikiqa" else rte_sample
    store = tmp_path / "store"
    cli("ingest", source, "--format", fmt, "--store", store, "--corpus", "c", "--part-rows", 16)
    teachers = write_teachers(tmp_path / "teachers.toml", tiny_teachers)
    cli("run", "--store", store, "--teachers", teachers)

    status = cli("status", "--store", store).output
    for name in tiny_teachers:
        assert name in status
    parts = len(Store(store).corpus("c").parts)
    assert parts > 1 and status.count(f"{parts}/{parts}") == len(tiny_teachers)

    res = cli("query", "--store", store, "--format", "json",
              "SELECT teacher, count(*) AS n FROM labels GROUP BY teacher ORDER BY teacher")
    rows = Store(store).corpus("c").rows
    assert json.loads(res.stdout) == [{"teacher": t, "n": rows} for t in sorted(tiny_teachers)]
    assert "OK" in cli("verify", "--store", store).output

    # Logits in the store equal a one-by-one forward of the same teacher on the same pairs.
    corpus = pq.read_table([p.path for p in Store(store).corpus("c").parts])
    a, b = corpus.column("text_a").to_pylist(), corpus.column("text_b").to_pylist()
    for name, folder in tiny_teachers.items():
        ids, logits = store_logits(store, name, "c")
        assert np.array_equal(ids, corpus.column("id").to_numpy())
        np.testing.assert_allclose(logits, direct_logits(folder, a, b, 64), rtol=1e-4, atol=1e-5)
    # Different teachers really do give different scores (so the check above can tell them apart).
    assert not np.allclose(store_logits(store, "t1", "c")[1], store_logits(store, "t2", "c")[1], atol=1e-3)


def test_second_run_does_no_forward_pass_and_new_teacher_scores_only_itself(
    tmp_path, wikiqa_sample, tiny_teachers, monkeypatch
):
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 40)
    two = {k: tiny_teachers[k] for k in ("t1", "t2")}
    cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "two.toml", two))
    first = {p: p.read_bytes() for p in Store(store).label_files()}
    assert len(first) == 2 * len(Store(store).corpus("wq").parts)

    # A second run must not even load a model.
    import transformers

    def no_model(*a, **k):
        raise AssertionError("a model was loaded on a fully scored store")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_model)
        out = cli("run", "--store", store, "--teachers", tmp_path / "two.toml").output
    assert "nothing to score" in out
    log = Store(store).run_logs()[-1]
    assert log["units_scored"] == 0 and log["forward_passes"] == 0 and log["units_skipped"] == len(first)

    # Adding a teacher scores only that teacher; the others' files stay byte-identical.
    cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "three.toml", tiny_teachers))
    log = Store(store).run_logs()[-1]
    assert {u[0] for u in log["scored"]} == {"t3"}
    assert log["units_skipped"] == len(first) and log["forward_passes"] > 0
    assert all(p.read_bytes() == data for p, data in first.items())
    assert "OK" in cli("verify", "--store", store).output


def test_compiled_teacher_gives_the_same_labels_and_keeps_them_current(tmp_path, wikiqa_sample, tiny_teachers,
                                                                      monkeypatch):
    from torch._inductor import cpp_builder

    from tmkd.teachers.scoring import check_compiler
    from tmkd.teachers.spec import TeacherError, TeacherSpec

    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 40)
    one = {"t1": tiny_teachers["t1"]}
    try:
        check_compiler(TeacherSpec(name="probe", path="."))
        have_compiler = True
    except TeacherError:
        have_compiler = False
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or real_compile(model, **kw))
    res = cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "c.toml", one, compile=True),
              ok=have_compiler)
    if not have_compiler:  # this machine has no C++ compiler: the clear error, and nothing scored
        assert res.exit_code != 0 and "needs a C++ compiler" in res.output and not Store(store).label_files()
        pytest.skip("no C++ compiler here: the refusal was checked, compiled labels were not")
    assert compiled == [{"dynamic": True}]  # the forward really ran through torch.compile
    corpus = pq.read_table([p.path for p in Store(store).corpus("wq").parts])
    a, b = corpus.column("text_a").to_pylist(), corpus.column("text_b").to_pylist()
    np.testing.assert_allclose(store_logits(store, "t1", "wq")[1], direct_logits(tiny_teachers["t1"], a, b, 64),
                               rtol=1e-4, atol=1e-5)
    # compiling is how the forward runs, not what the teacher is: without it, the labels are still current
    cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "e.toml", one))
    assert Store(store).run_logs()[-1]["units_scored"] == 0
    bad = cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "b.toml", one, compile="yes"), ok=False)
    assert bad.exit_code == 1 and "compile: expected true or false" in bad.output
    # without a C++ compiler, a clear user error (exit code, message) before any scoring
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda *a, **k: "no-such-compiler-here")
    t2 = {"t2": tiny_teachers["t2"]}
    res = cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "n.toml", t2, compile=True), ok=False)
    assert res.exit_code != 0 and "needs a C++ compiler" in res.output and isinstance(res.exception, SystemExit)
    assert not any(f.parent.parent.name == "t2" for f in Store(store).label_files())


def test_changed_checkpoint_is_refused_and_replace_rescores(tmp_path, wikiqa_sample, tiny_tokenizer):
    from tiny import build_bert

    store = tmp_path / "store"
    folder = build_bert(tmp_path / "teacher", tiny_tokenizer, seed=5)
    teachers = write_teachers(tmp_path / "t.toml", {"tq": folder})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    cli("run", "--store", store, "--teachers", teachers)
    _, before = store_logits(store, "tq", "wq")

    build_bert(folder, tiny_tokenizer, seed=6)  # new weights, same name
    res = cli("run", "--store", store, "--teachers", teachers, ok=False)
    assert res.exit_code == 1 and "'tq' changed" in res.output and "--replace" in res.output
    assert "Traceback" not in res.output
    np.testing.assert_array_equal(store_logits(store, "tq", "wq")[1], before)  # nothing was touched

    cli("run", "--store", store, "--teachers", teachers, "--replace")
    _, after = store_logits(store, "tq", "wq")
    assert not np.allclose(before, after)
    assert "OK" in cli("verify", "--store", store).output

    # A changed max length also changes the fingerprint.
    res = cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "t2.toml", {"tq": folder}, 32), ok=False)
    assert res.exit_code == 1 and "changed" in res.output


def test_teacher_with_wrong_label_space_is_refused(tmp_path, wikiqa_sample, tiny_tokenizer):
    from tiny import build_bert

    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    three = build_bert(tmp_path / "nli", tiny_tokenizer, num_labels=3, label_names=["entailment", "neutral", "contradiction"])
    res = cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "t.toml", {"nli": three}), ok=False)
    assert res.exit_code == 1 and "3 labels" in res.output and "'wq'" in res.output
    assert Store(store).label_files() == []


def test_query_joins_teachers_and_reports_sql_errors(tmp_path, wikiqa_sample, tiny_teachers):
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "t.toml", tiny_teachers))
    agree = cli("query", "--store", store, "--format", "csv", """
        SELECT count(*) FILTER (WHERE (a.logits[2] > a.logits[1]) = (b.logits[2] > b.logits[1])) AS agree, count(*) AS n
        FROM labels a JOIN labels b USING (corpus, id) WHERE a.teacher = 't1' AND b.teacher = 't2'""")
    agree_n, n = map(int, agree.stdout.splitlines()[1].split(","))
    st = Store(store)
    pred = {t: np.concatenate([logits_to_numpy(pq.read_table(st.label_path(t, "wq", p.part)).column("logits"))
                               for p in st.corpus("wq").parts]).argmax(1) for t in ("t1", "t2")}
    assert n == 120 and agree_n == int((pred["t1"] == pred["t2"]).sum())  # the join pairs each row with itself

    # the wide view: one row per pair, a logits column per teacher, equal to the label files read here;
    # predicted() and probs() equal numpy's argmax and softmax
    wide = json.loads(cli("query", "--store", store, "--format", "json", """
        SELECT part, "row", id, label, t1, t2, t3, predicted(t2) AS p2, probs(t3) AS q3 FROM scores
        ORDER BY part, "row" """).stdout)
    st = Store(store)
    corpus = pa.concat_tables(st.read_corpus_part(p) for p in st.corpus("wq").parts)
    assert [r["id"] for r in wide] == corpus.column("id").to_pylist()
    assert [r["label"] for r in wide] == corpus.column("label").to_pylist()
    for t in ("t1", "t2", "t3"):
        direct = np.concatenate([logits_to_numpy(pq.read_table(st.label_path(t, "wq", p.part)).column("logits"))
                                 for p in st.corpus("wq").parts])
        np.testing.assert_array_equal(np.array([r[t] for r in wide], np.float32), direct)
        if t == "t2":
            np.testing.assert_array_equal([r["p2"] for r in wide], direct.argmax(1))
        if t == "t3":
            soft = np.exp(direct - direct.max(1, keepdims=True))
            np.testing.assert_allclose([r["q3"] for r in wide], soft / soft.sum(1, keepdims=True), rtol=1e-5)

    # hostile statements: tests/test_store_trust.py
    res = cli("query", "--store", store, "SELECT nonsense FROM labels", ok=False)
    assert res.exit_code == 1 and "nonsense" in res.output and "Traceback" not in res.output
    teachers = json.loads(cli("query", "--store", store, "--format", "json", "SELECT * FROM teachers").stdout)
    assert sorted(t["name"] for t in teachers) == ["t1", "t2", "t3"]


def _labels_of(store: Path) -> dict:
    st = Store(store)
    return {(f.parent.parent.name, f.parent.name, f.name): pq.read_table(f) for f in st.label_files()}


def assert_same_labels(store_a: Path, store_b: Path) -> None:
    """Both stores hold the same label parts: same ids in the same order, same logits."""
    a, b = _labels_of(store_a), _labels_of(store_b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].column("id").equals(b[key].column("id"))
        np.testing.assert_allclose(logits_to_numpy(a[key].column("logits")), logits_to_numpy(b[key].column("logits")),
                                   rtol=1e-5, atol=1e-6)


def _bigger_teachers(tmp_path: Path, tiny_tokenizer: Path) -> dict[str, Path]:
    from tiny import build_bert

    return {f"b{s}": build_bert(tmp_path / f"b{s}", tiny_tokenizer, seed=s, layers=4, hidden=128) for s in (1, 2)}


def committed_parts(store) -> int:
    """Label parts with a commit record: what a re-run counts as done. A data file whose record the
    kill cut off before it was written is not done, and is scored again."""
    base = Store(store).root / "labels"
    return len(list(base.glob("*/*/part-*.commit.json"))) if base.exists() else 0


def kill_once_scoring(proc, store) -> int:
    """SIGKILL ``proc`` (a `tmkd-label run`) soon after its first label part is committed; returns the
    label parts committed by then."""
    deadline = time.time() + 120
    while not committed_parts(store) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return committed_parts(store)


def test_kill_9_then_rerun_completes_the_store_exactly(tmp_path, shared_data, tiny_tokenizer):
    from tiny import read_lines

    source = tmp_path / "wikiqa.tsv"
    source.write_text("".join(read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 2001)), newline="")
    teachers = write_teachers(tmp_path / "t.toml", _bigger_teachers(tmp_path, tiny_tokenizer), max_length=128)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for store in (killed, clean):
        cli("ingest", source, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 100)
    total = 2 * len(Store(killed).corpus("wq").parts)

    proc = subprocess.Popen([BIN / "tmkd-label", "run", "--store", killed, "--teachers", teachers],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = kill_once_scoring(proc, killed)
    assert 0 < done < total, f"the kill should land mid-run ({done}/{total} parts done)"
    assert cli("verify", "--store", killed, ok=False).exit_code == 1  # incomplete, and says so

    cli("run", "--store", killed, "--teachers", teachers)
    assert Store(killed).run_logs()[-1]["units_scored"] == total - done  # only the missing parts
    assert "OK" in cli("verify", "--store", killed).output
    assert not list(killed.glob("labels/**/.*.tmp"))

    cli("run", "--store", clean, "--teachers", teachers)
    assert_same_labels(killed, clean)


def test_two_processes_give_the_same_store_as_one(tmp_path, wikiqa_sample, tiny_teachers):
    teachers = write_teachers(tmp_path / "t.toml", tiny_teachers)
    one, two = tmp_path / "one", tmp_path / "two"
    for store in (one, two):
        cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 20)
    cli("run", "--store", one, "--teachers", teachers)

    # What really starts two CPU processes here (shared/ENVIRONMENT.md); `--cpu --num_processes 2` starts one.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", BIN / "tmkd-label",
           "run", "--store", two, "--teachers", teachers]
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    logs = Store(two).run_logs()
    assert sorted((l["rank"], l["world"]) for l in logs) == [(0, 2), (1, 2)], "two ranks must really have run"
    assert len({l["pid"] for l in logs}) == 2
    assert all(l["units_scored"] > 0 for l in logs)
    scored = [tuple(u) for l in logs for u in l["scored"]]
    assert len(scored) == len(set(scored)) == 3 * len(Store(two).corpus("wq").parts)  # each unit once

    assert_same_labels(one, two)
    assert "OK" in cli("verify", "--store", two).output


def test_shard_option_splits_parts_across_nodes(tmp_path, wikiqa_sample, tiny_teachers):
    store = tmp_path / "store"
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 20)
    cli("run", "--store", store, "--teachers", teachers, "--shard", "0/2")
    parts = len(Store(store).corpus("wq").parts)
    assert len(Store(store).label_files()) == (parts + 1) // 2
    cli("run", "--store", store, "--teachers", teachers, "--shard", "1/2")
    assert len(Store(store).label_files()) == parts
    assert "OK" in cli("verify", "--store", store).output
    assert cli("run", "--store", store, "--teachers", teachers, "--shard", "2/2", ok=False).exit_code == 1


def test_nli_store_with_two_and_three_class_teachers(tmp_path, shared_data, rte_sample, tiny_tokenizer):
    """RTE (2 classes) and MNLI/SNLI samples (3 classes) in one store, each scored by teachers of its own task."""
    from tiny import build_bert

    store = tmp_path / "store"
    cli("ingest", rte_sample, "--format", "glue", "--store", store, "--corpus", "rte")
    for task in ("mnli", "snli"):
        sample = json.loads((shared_data / task / "heldout-sample.json").read_text())
        small = tmp_path / f"{task}.json"
        small.write_text(json.dumps(dict(list(sample.items())[:30])))
        cli("ingest", small, "--format", "json-samples", "--store", store, "--corpus", task)
    nli3 = ["entailment", "neutral", "contradiction"]
    assert Store(store).corpus("mnli").label_names == nli3

    rte = build_bert(tmp_path / "rte-t", tiny_tokenizer, num_labels=2, seed=1, label_names=["entailment", "not_entailment"])
    nli = build_bert(tmp_path / "nli-t", tiny_tokenizer, num_labels=3, seed=2, label_names=nli3)
    toml = tmp_path / "t.toml"
    toml.write_text(f'[[teacher]]\nname = "rte-t"\npath = "{rte}"\ncorpora = ["rte"]\n\n'
                    f'[[teacher]]\nname = "nli-t"\npath = "{nli}"\ncorpora = ["mnli", "snli"]\n')
    cli("run", "--store", store, "--teachers", toml)
    widths = json.loads(cli("query", "--store", store, "--format", "json",
                            "SELECT teacher, corpus, len(logits) AS k, count(*) AS n FROM labels GROUP BY ALL ORDER BY ALL").stdout)
    assert widths == [{"teacher": "nli-t", "corpus": "mnli", "k": 3, "n": 30},
                      {"teacher": "nli-t", "corpus": "snli", "k": 3, "n": 30},
                      {"teacher": "rte-t", "corpus": "rte", "k": 2, "n": 40}]
    assert "OK" in cli("verify", "--store", store).output

    # The 3-class teacher pointed at the 2-class corpus is refused, naming both.
    toml.write_text(f'[[teacher]]\nname = "nli-t"\npath = "{nli}"\ncorpora = ["rte"]\n')
    res = cli("run", "--store", store, "--teachers", toml, ok=False)
    assert res.exit_code == 1 and "'nli-t' has 3 labels" in res.output and "'rte'" in res.output


def test_scoring_reads_logits_back_in_groups_of_batches_not_per_batch(tiny_teachers, monkeypatch):
    """No host sync per batch: the logits of READBACK_BATCHES batches come back together, and the result equals
    scoring each batch on its own (put back in the rows' order)."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    import tmkd.teachers.scoring as scoring
    from tmkd.teachers.spec import TeacherSpec

    folder = next(iter(tiny_teachers.values()))
    tok = scoring.load_tokenizer(folder)
    spec = TeacherSpec(name="t", path=str(folder), max_length=32, dtype="float32", batch_tokens=64)
    teacher = scoring.LoadedTeacher(spec, None, folder, torch.device("cpu"), tok)
    rng = np.random.default_rng(0)
    words = "the city river water year state school music film team world people".split()
    a = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(150)]
    b = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(150)]
    enc = scoring.encode_pairs(tok, a, b, 32, "longest_first")
    sizes, done = [], []
    real = scoring.read_back
    monkeypatch.setattr(scoring, "read_back", lambda pending, *r: sizes.append(len(pending)) or real(pending, *r))
    got = teacher.score(enc, on_batch=done.append)
    n = teacher.forward_passes
    assert n > 2 * scoring.READBACK_BATCHES and sum(done) == len(a)
    assert sizes == [scoring.READBACK_BATCHES] * (n // scoring.READBACK_BATCHES) + [n % scoring.READBACK_BATCHES]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        for rows in scoring.length_batches(enc.lengths, 64):
            want = model(**scoring.pad_batch(enc, rows, tok.pad_token_id)).logits.numpy()
            np.testing.assert_allclose(got[rows], want, rtol=1e-5, atol=1e-5)


def test_float16_logits_are_stored_as_float16_and_read_like_float32(tmp_path, wikiqa_sample, tiny_teachers):
    """--logits-dtype float16 halves the logits column; verify, query and the readers take it as they take float32."""
    teachers = write_teachers(tmp_path / "teachers.toml", {"t1": tiny_teachers["t1"]})
    stores = {}
    for dtype in ("float32", "float16"):
        stores[dtype] = tmp_path / dtype
        cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", stores[dtype], "--corpus", "wq")
        cli("run", "--store", stores[dtype], "--teachers", teachers, "--logits-dtype", dtype)
    st = Store(stores["float16"])
    for part in st.corpus("wq").parts:
        assert pq.read_schema(st.label_path("t1", "wq", part.part)).field("logits").type.value_type == pa.float16()
    assert "OK" in cli("verify", "--store", stores["float16"]).output
    ids16, half = store_logits(stores["float16"], "t1", "wq")
    ids32, full = store_logits(stores["float32"], "t1", "wq")
    assert np.array_equal(ids16, ids32) and half.dtype == np.float32
    np.testing.assert_allclose(half, full.astype(np.float16).astype(np.float32), rtol=0, atol=0)  # rounded once
    got = json.loads(cli("query", "--store", stores["float16"], "--format", "json",
                         "SELECT id, predicted(t1) AS p FROM scores ORDER BY part, \"row\"").stdout)
    assert [r["id"] for r in got] == ids16.tolist() and [r["p"] for r in got] == half.argmax(1).tolist()


def test_run_bounds_the_cpu_caches_first_and_frees_memory_after_each_part(tmp_path, wikiqa_sample, tiny_teachers,
                                                                         monkeypatch):
    """What keeps the labeler's memory flat as the corpus grows (BENCHMARKS.md): oneDNN's kernel cache and glibc's
    arenas bounded before the first teacher is loaded, and freed memory handed back after every part."""
    import tmkd.pipeline.run as run_mod
    import tmkd.teachers.scoring as scoring

    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 50)
    calls = []
    loaded = scoring.LoadedTeacher
    monkeypatch.setattr(run_mod, "bound_cpu_caches", lambda: calls.append("bound"))
    monkeypatch.setattr(run_mod, "release_free_memory", lambda: calls.append("release"))
    monkeypatch.setattr(scoring, "LoadedTeacher", lambda *a: calls.append("load") or loaded(*a))
    cli("run", "--store", store, "--teachers", write_teachers(tmp_path / "t.toml", tiny_teachers))
    parts = len(Store(store).corpus("wq").parts)
    assert parts == 3 and calls == ["bound"] + ["load"] * len(tiny_teachers) + ["release"] * parts

"""`tmkd-label ingest` on real data: readers, ids, parts, bad rows, strict mode, appends."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmkd.data.ingest import IngestError, IngestOptions, ingest, normalise, text_pair_id
from tmkd.data.store import Store, file_digest

from test_label import cli  # noqa: E402  (the one helper that runs tmkd-label in-process)


def rows(store: Path, corpus: str) -> list[dict]:
    st = Store(store)
    return [r for p in st.corpus(corpus).parts for r in st.read_corpus_part(p).to_pylist()]


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file of the store, by relative path, with its bytes."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def head(src: Path, dst: Path, n: int, skip: int = 0) -> Path:
    """The header and data lines skip+1 .. skip+n of a text file, as bytes (line ends kept)."""
    lines = src.read_bytes().splitlines(keepends=True)
    dst.write_bytes(b"".join([lines[0], *lines[1 + skip : 1 + skip + n]]))
    return dst


def tsv_rows(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [line.rstrip("\r\n").split("\t") for line in f][1:]


def blake_id(text: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "big", signed=True)


@pytest.fixture
def rte(tmp_path, shared_data) -> Path:
    return head(shared_data / "rte" / "train.tsv", tmp_path / "rte.tsv", 40)


# ---- the readers on real data -------------------------------------------------------------------


def test_wikiqa_sample_parts_groups_labels_ids_and_manifest(tmp_path, wikiqa_sample):
    store = tmp_path / "store"
    result = cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 50)
    assert "120" in result.output

    source = tsv_rows(wikiqa_sample)
    got = rows(store, "wq")
    assert len(got) == len(source) == 120
    assert [r["group"] for r in got] == [s[0] for s in source]
    assert [r["label"] for r in got] == [int(s[6]) for s in source]
    assert {r["label"] for r in got} == {0, 1}
    assert [r["text_a"] for r in got] == [s[1] for s in source]
    assert [r["text_b"] for r in got] == [s[5] for s in source]
    assert [r["source_id"] for r in got] == [f"{s[0]}/{s[4]}" for s in source]
    # The id is a documented, machine-independent hash of the source id: pin it.
    assert got[0]["id"] == blake_id("Q1/D1-0", b"tmkd/source-id")
    assert len({r["id"] for r in got}) == 120

    m = Store(store).corpus("wq")
    assert m.label_names == ["0", "1"]
    assert [(p.part, p.rows) for p in m.parts] == [(0, 50), (1, 50), (2, 20)]
    for p in m.parts:
        assert p.digest == file_digest(p.path)
        assert pq.read_metadata(p.path).num_rows == p.rows
    assert m.sources[0]["rows_written"] == 120 and m.sources[0]["format"] == "wikiqa"


def test_ids_and_parts_are_the_same_in_two_stores_and_for_gzip(tmp_path, wikiqa_sample):
    gz = tmp_path / "sample.tsv.gz"
    gz.write_bytes(gzip.compress(wikiqa_sample.read_bytes()))
    a, b = Store.create(tmp_path / "a"), Store.create(tmp_path / "b")
    ingest(a, [wikiqa_sample], IngestOptions("wikiqa", "wq", part_rows=64))
    ingest(b, [gz], IngestOptions("wikiqa", "wq", part_rows=64))
    assert rows(a.root, "wq") == rows(b.root, "wq")
    assert [p.digest for p in a.corpus("wq").parts] == [p.digest for p in b.corpus("wq").parts]


def test_glue_rte_numeric_labels(tmp_path, rte):
    store = tmp_path / "store"
    cli("ingest", rte, "--format", "glue", "--store", store, "--corpus", "rte")
    source = tsv_rows(rte)
    got = rows(store, "rte")
    assert [r["id"] for r in got] == [int(s[3]) for s in source]
    assert [r["label"] for r in got] == [int(s[2]) for s in source]
    assert [(r["text_a"], r["text_b"]) for r in got] == [(s[0], s[1]) for s in source]
    assert Store(store).corpus("rte").label_names == ["entailment", "not_entailment"]


def test_glue_qnli_named_labels(tmp_path, shared_data):
    qnli = head(shared_data / "qnli" / "dev.tsv", tmp_path / "qnli.tsv", 30)
    store = tmp_path / "store"
    cli("ingest", qnli, "--format", "glue", "--store", store, "--corpus", "qnli")
    source = tsv_rows(qnli)
    got = rows(store, "qnli")
    names = ["entailment", "not_entailment"]
    assert [r["label"] for r in got] == [names.index(s[3]) for s in source]
    assert {r["label"] for r in got} == {0, 1}
    assert [r["id"] for r in got] == [int(s[0]) for s in source]
    assert [r["text_a"] for r in got] == [s[1] for s in source]


def test_glue_rte_test_minus_one_is_unlabeled(tmp_path, shared_data):
    test = head(shared_data / "rte" / "test.tsv", tmp_path / "test.tsv", 25)
    s = ingest(Store.create(tmp_path / "store"), [test], IngestOptions("glue", "rte-test"))
    assert s.rows_written == 25 and s.rows_labelled == 0 and s.bad == {}
    got = rows(tmp_path / "store", "rte-test")
    assert [r["label"] for r in got] == [None] * 25
    assert Store(tmp_path / "store").corpus("rte-test").label_names == ["entailment", "not_entailment"]


def sub_sample(src: Path, dst: Path, n: int) -> dict:
    data = json.loads(src.read_text())
    sub = dict(list(data.items())[:n])
    dst.write_text(json.dumps(sub))
    return sub


@pytest.mark.parametrize(
    "task, names", [("qnli", ["entailment", "not_entailment"]), ("mnli", ["entailment", "neutral", "contradiction"])]
)
def test_json_samples(tmp_path, shared_data, task, names):
    sub = sub_sample(shared_data / task / "train-sample.json", tmp_path / "s.json", 60)
    store = tmp_path / "store"
    cli("ingest", tmp_path / "s.json", "--format", "json-samples", "--store", store, "--corpus", task)
    got = rows(store, task)
    assert Store(store).corpus(task).label_names == names
    assert [r["id"] for r in got] == [int(k) for k in sub]
    assert [r["label"] for r in got] == [names.index(v["label"]) for v in sub.values()]
    assert {r["label"] for r in got} == set(range(len(names)))
    assert [r["text_b"] for r in got] == [v["text_b"] for v in sub.values()]


def test_json_samples_with_unknown_label_names_need_label_names(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"1": {"text_a": "a", "text_b": "b", "label": "good"}}))
    result = cli("ingest", path, "--format", "json-samples", "--store", tmp_path / "st", "--corpus", "c", ok=False)
    assert result.exit_code == 1 and "--label-names" in result.output
    cli("ingest", path, "--format", "json-samples", "--store", tmp_path / "st", "--corpus", "c", "--label-names", "bad,good")
    assert rows(tmp_path / "st", "c")[0]["label"] == 1


# ---- generic formats ------------------------------------------------------------------------------


@pytest.fixture
def qa_records(shared_data) -> list[dict]:
    """QNLI dev pairs renamed to other column names, with yes/no answers and string ids."""
    out = []
    for s in tsv_rows(shared_data / "qnli" / "dev.tsv")[:24]:
        out.append({"qid": f"q-{s[0]}", "q": s[1], "s": s[2], "ans": "yes" if s[3] == "entailment" else "no",
                    "topic": f"t{int(s[0]) % 3}"})
    return out


def write_generic(fmt: str, records: list[dict], path: Path) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                w = csv.DictWriter(f, fieldnames=list(records[0]))
                w.writeheader()
                w.writerows(records)
            else:
                f.write("\t".join(records[0]) + "\n")
                f.writelines("\t".join(r.values()) + "\n" for r in records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_generic_formats_with_columns_and_label_map(tmp_path, qa_records, fmt):
    path = write_generic(fmt, qa_records, tmp_path / f"qa.{fmt}")
    store = tmp_path / "store"
    cli("ingest", path, "--format", fmt, "--store", store, "--corpus", "qa",
        "--columns", "text_a=q,text_b=s,label=ans,group=topic,id=qid",
        "--label-names", "entailment,not_entailment", "--label-map", "yes=entailment,no=not_entailment")
    got = rows(store, "qa")
    assert [r["text_a"] for r in got] == [r["q"] for r in qa_records]
    assert [r["text_b"] for r in got] == [r["s"] for r in qa_records]
    assert [r["label"] for r in got] == [0 if r["ans"] == "yes" else 1 for r in qa_records]
    assert [r["group"] for r in got] == [r["topic"] for r in qa_records]
    assert [r["source_id"] for r in got] == [r["qid"] for r in qa_records]
    assert [r["id"] for r in got] == [blake_id(r["qid"], b"tmkd/source-id") for r in qa_records]


def test_unlabeled_corpus_and_text_hash_ids(tmp_path, qa_records):
    records = [{"text_a": r["q"], "text_b": r["s"], "label": r["ans"]} for r in qa_records]
    path = write_generic("jsonl", records, tmp_path / "u.jsonl")
    store = tmp_path / "store"
    cli("ingest", path, "--format", "jsonl", "--store", store, "--corpus", "u", "--unlabeled")
    got = rows(store, "u")
    assert [r["label"] for r in got] == [None] * len(records)
    assert Store(store).corpus("u").label_names is None
    # No source id: a hash of the normalised pair, the same for other whitespace and NFC forms.
    assert [r["id"] for r in got] == [text_pair_id(r["text_a"], r["text_b"]) for r in records]
    assert got[0]["id"] == blake_id(normalise(records[0]["text_a"]) + "\t" + normalise(records[0]["text_b"]), b"tmkd/text-pair")
    assert text_pair_id("  Caf\u0065\u0301  au\tlait ", "x") == text_pair_id("Caf\u00e9 au lait", "x")
    assert [r["source_id"] for r in got] == [None] * len(records)

    # --unlabeled may still declare the label space.
    cli("ingest", path, "--format", "jsonl", "--store", store, "--corpus", "u2", "--unlabeled",
        "--label-names", "entailment,not_entailment")
    assert Store(store).corpus("u2").label_names == ["entailment", "not_entailment"]
    assert {r["label"] for r in rows(store, "u2")} == {None}


# ---- bad rows ---------------------------------------------------------------------------------------

# RTE-style TSV lines (sentence1, sentence2, label, idx); line 1 is the header.
GOOD = [b"A man walks.\tA person walks.\t0\t1", b"It rains.\tIt is dry.\t1\t2", b"Cats purr.\tAnimals purr.\t0\t3"]
BAD = {  # kind -> (bad line, field, reason)
    "missing field": (b"A premise.\tA hypothesis.", "label", "missing field"),
    "short row": (b"Just text", "text_b", "missing field"),
    "empty text": (b"   \tA hypothesis.\t0\t10", "text_a", "empty text"),
    "unknown label": (b"A premise.\tA hypothesis.\tmaybe\t11", "label", "unknown label"),
    "label out of range": (b"A premise.\tA hypothesis.\t2\t12", "label", "unknown label"),
    "undecodable bytes": (b"A premise.\tCaf\xe9 \xff hypothesis.\t0\t13", "text_b", "undecodable bytes"),
    "duplicate id": (b"Another premise.\tAnother hypothesis.\t1\t2", "id", "duplicate id"),
}


def bad_file(path: Path, bad_line: bytes, crlf: bool = False) -> Path:
    """Header, the good rows, the bad row (line 5), and one more good row (line 6)."""
    lines = [b"sentence1\tsentence2\tlabel\tidx", *GOOD, bad_line, b"Dogs bark.\tDogs make noise.\t0\t4"]
    path.write_bytes(b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines))
    return path


def test_every_kind_of_bad_row_is_quarantined_with_its_place(tmp_path):
    path = tmp_path / "mixed.tsv"
    lines = [b"sentence1\tsentence2\tlabel\tidx", *GOOD, *(bad for bad, _, _ in BAD.values()), b"Last.\tRow.\t1\t99"]
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    store = tmp_path / "store"
    result = cli("ingest", path, "--format", "glue", "--store", store, "--corpus", "c")
    assert "bad: duplicate id" in result.output

    got = rows(store, "c")
    assert [r["id"] for r in got] == [1, 2, 3, 99]  # good rows kept, in order
    m = Store(store).corpus("c")
    assert m.sources[0]["bad"] == {"missing field": 2, "empty text": 1, "unknown label": 2,
                                   "undecodable bytes": 1, "duplicate id": 1}
    qfile = store / m.sources[0]["quarantine"]
    entries = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [
        (5 + i, fld, reason) for i, (_, fld, reason) in enumerate(BAD.values())
    ]
    assert all(e["file"] == str(path) for e in entries)
    assert entries[0]["raw"] == "A premise.\tA hypothesis."
    assert entries[5]["raw"] == "A premise.\tCaf\\xe9 \\xff hypothesis.\t0\t13"  # the bytes, shown as escapes
    assert "already in an earlier row" in entries[6]["detail"]


@pytest.mark.parametrize("kind", list(BAD))
def test_strict_refuses_each_kind_of_bad_row_and_leaves_the_store_unchanged(tmp_path, rte, kind, monkeypatch):
    store = tmp_path / "store"
    cli("ingest", rte, "--format", "glue", "--store", store, "--corpus", "rte")
    before = snapshot(store)
    bad_line, fld, reason = BAD[kind]
    path = bad_file(tmp_path / "bad.tsv", bad_line, crlf=True)
    # Rows checked two at a time, parts of two rows: lines 2-3 are written as a part before
    # line 5 fails, and that part must not survive.
    monkeypatch.setattr("tmkd.data.ingest.CHUNK_ROWS", 2)
    written = []
    write_part = Store.write_corpus_part
    monkeypatch.setattr(Store, "write_corpus_part",
                        lambda self, corpus, part, table: written.append(part) or write_part(self, corpus, part, table))
    result = cli("ingest", path, "--format", "glue", "--store", store, "--corpus", "c", "--part-rows", 2, "--strict", ok=False)
    assert result.exit_code == 1
    assert written, "no part was written before the bad row, so the test would not see one survive"
    assert "Traceback" not in result.output
    assert f"{path}, line 5, field '{fld}': {reason}" in result.output
    assert snapshot(store) == before


def test_duplicate_against_an_earlier_ingest(tmp_path, rte, shared_data):
    store = tmp_path / "store"
    cli("ingest", rte, "--format", "glue", "--store", store, "--corpus", "c")
    overlap = head(shared_data / "rte" / "train.tsv", tmp_path / "overlap.tsv", 20, skip=30)  # idx 30..49
    before = snapshot(store)
    result = cli("ingest", overlap, "--format", "glue", "--store", store, "--corpus", "c", "--strict", ok=False)
    assert result.exit_code == 1 and f"{overlap}, line 2, field 'id': duplicate id" in result.output
    assert "already in corpus 'c'" in result.output
    assert snapshot(store) == before

    s = ingest(Store(store), [overlap], IngestOptions("glue", "c"))
    assert s.bad == {"duplicate id": 10} and s.rows_written == 10
    assert sorted(r["id"] for r in rows(store, "c")) == list(range(50))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [e["line"] for e in entries] == list(range(2, 12))
    assert all("already in corpus 'c'" in e["detail"] for e in entries)


def test_bad_rows_in_json_and_parquet_name_the_key_and_row(tmp_path):
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps({"7": {"text_a": "a", "text_b": "b", "label": "entailment"},
                                   "8": {"text_a": "a2", "text_b": "", "label": "entailment"},
                                   "9": {"text_a": "a3", "label": "not_entailment"}}))
    store = Store.create(tmp_path / "store")
    s = ingest(store, [samples], IngestOptions("json-samples", "s"))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [("8", "text_b", "empty text"),
                                                                        ("9", "text_b", "missing field")]
    with pytest.raises(IngestError, match=r"key '8', field 'text_b': empty text"):
        ingest(store, [samples], IngestOptions("json-samples", "s2", strict=True))

    table = pa.table({"text_a": ["x", None, "z"], "text_b": ["p", "q", "r"], "label": [0, 1, 5]})
    pq.write_table(table, tmp_path / "t.parquet")
    s = ingest(store, [tmp_path / "t.parquet"], IngestOptions("parquet", "p", label_names=["n", "y"]))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [(1, "text_a", "missing field"),
                                                                        (2, "label", "unknown label")]
    assert entries[0]["raw"] == {"text_a": None, "text_b": "q", "label": 1}

    binary = pa.table({"text_a": pa.array([b"ok", b"caf\xe9"], pa.binary()), "text_b": ["p", "q"]})
    pq.write_table(binary, tmp_path / "b.parquet")
    s = ingest(store, [tmp_path / "b.parquet"], IngestOptions("parquet", "b"))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [(1, "text_a", "undecodable bytes")]
    assert s.rows_written == 1 and s.label_names is None  # no label column: an unlabeled source

    jsonl = tmp_path / "u.jsonl"
    jsonl.write_bytes(b'{"text_a": "ok", "text_b": "fine", "label": 1}\n\n{"text_a": "bad \xff", "text_b": "x", "label": 0}\n{not json\n')
    s = ingest(store, [jsonl], IngestOptions("jsonl", "j", label_names=["n", "y"]))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [(3, "text_a", "undecodable bytes"),
                                                                        (4, "record", "bad record")]
    assert s.rows_written == 1


def test_csv_line_numbers_count_physical_lines(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('text_a,text_b,label\n"two\nlines",b,0\n"",b,1\nc,d,1\n', newline="")
    s = ingest(Store.create(tmp_path / "st"), [path], IngestOptions("csv", "c", label_names=["0", "1"]))
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [(e["line"], e["field"], e["reason"]) for e in entries] == [(4, "text_a", "empty text")]
    assert [r["text_a"] for r in rows(tmp_path / "st", "c")] == ["two\nlines", "c"]


# ---- appending ----------------------------------------------------------------------------------------


def test_append_adds_parts_and_leaves_earlier_parts_byte_identical(tmp_path, shared_data, rte):
    store = tmp_path / "store"
    cli("ingest", rte, "--format", "glue", "--store", store, "--corpus", "c", "--part-rows", 16)
    first = {p.name: p.read_bytes() for p in (store / "corpus" / "c").glob("part-*.parquet")}
    assert sorted(first) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    more = head(shared_data / "rte" / "train.tsv", tmp_path / "more.tsv", 20, skip=40)
    cli("ingest", more, "--format", "glue", "--store", store, "--corpus", "c", "--part-rows", 16)
    m = Store(store).corpus("c")
    assert [(p.part, p.rows) for p in m.parts] == [(0, 16), (1, 16), (2, 8), (3, 16), (4, 4)]
    assert {n: (store / "corpus" / "c" / n).read_bytes() for n in first} == first
    assert [r["id"] for r in rows(store, "c")] == list(range(60))
    assert len(m.sources) == 2

    # Another label space for the same corpus is refused, and nothing changes.
    before = snapshot(store)
    result = cli("ingest", more, "--format", "glue", "--store", store, "--corpus", "c",
                 "--label-names", "yes,no", "--ids", "text", ok=False)
    assert result.exit_code == 1 and "label names" in result.output
    assert snapshot(store) == before


def test_user_errors_are_clean_messages(tmp_path, rte):
    store = tmp_path / "store"
    for args, message in [
        (["--format", "xml"], "unknown format"),
        (["--format", "glue", "--columns", "txt=sentence1"], "unknown field"),
        (["--format", "tsv"], "no column"),
        (["--format", "glue", "--label-names", "a", "--label-map", "1=b"], "not one of the label names"),
    ]:
        result = cli("ingest", rte, *args, "--store", store, "--corpus", "c", ok=False)
        assert result.exit_code == 1, args
        assert message in result.output and "Traceback" not in result.output


def test_one_ingest_at_a_time_per_store(tmp_path, rte):
    import fcntl
    import os

    store = Store.create(tmp_path / "store")
    fd = os.open(store.root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(IngestError, match="another ingest"):
            ingest(store, [rte], IngestOptions("glue", "c"))
    finally:
        os.close(fd)
    assert ingest(store, [rte], IngestOptions("glue", "c")).rows_written == 40


# ---- a UTF-8 byte-order mark (Windows exports) ----------------------------------------------------

BOM = b"\xef\xbb\xbf"
CSV_BODY = [("1", "What is a cat?", "A cat is a small animal.", "q1"), ("0", "Where is Paris?", "Paris, France", "q2"),
            ("1", "Who wrote Hamlet?", "Shakespeare wrote \"Hamlet\".", "q3")]


def write_csv(path: Path, header: list[str], order: list[int], bom: bool) -> Path:
    """CSV_BODY (label, text_a, text_b, id) with its columns in ``order``, CRLF as Excel writes it."""
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow([header[i] for i in order])
        w.writerows([[r[i] for i in order] for r in CSV_BODY])
    assert path.read_bytes().startswith(BOM) == bom
    return path


@pytest.mark.parametrize("first", ["label", "id"])
def test_a_bom_csv_ingests_exactly_as_without_it(tmp_path, first):
    order = [0, 1, 2, 3] if first == "label" else [3, 1, 2, 0]
    got = {}
    for bom in (False, True):
        path = write_csv(tmp_path / f"{first}-{bom}.csv", ["label", "text_a", "text_b", "id"], order, bom)
        store = tmp_path / f"store-{bom}"
        cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c", "--label-names", "0,1")
        got[bom] = rows(store, "c")
    assert got[True] == got[False]
    assert [r["label"] for r in got[True]] == [1, 0, 1]  # the first column is not lost
    assert [r["source_id"] for r in got[True]] == ["q1", "q2", "q3"]  # nor replaced by text hashes
    assert [r["text_b"] for r in got[True]] == [r[2] for r in CSV_BODY]


def test_a_bom_csv_maps_its_first_column_with_columns(tmp_path):
    path = write_csv(tmp_path / "x.csv", ["answer", "q", "s", "qid"], [0, 1, 2, 3], bom=True)
    store = tmp_path / "store"
    cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c",
        "--columns", "label=answer,text_a=q,text_b=s,id=qid", "--label-names", "0,1")
    assert [(r["label"], r["source_id"]) for r in rows(store, "c")] == [(1, "q1"), (0, "q2"), (1, "q3")]


def bom_sources(tmp_path: Path, shared_data: Path, wikiqa_sample: Path) -> dict[str, tuple[str, bytes, dict]]:
    """name -> (format, the file's bytes without a BOM, IngestOptions keywords)."""
    jsonl = "".join(json.dumps({"id": r[3], "text_a": r[1], "text_b": r[2], "label": int(r[0])}) + "\n" for r in CSV_BODY)
    samples = {r[3]: {"text_a": r[1], "text_b": r[2], "label": "entailment"} for r in CSV_BODY}
    tsv = "label\ttext_a\ttext_b\tid\n" + "".join("\t".join(r) + "\n" for r in CSV_BODY)
    return {
        "tsv": ("tsv", tsv.encode(), {"label_names": ["0", "1"]}),
        "jsonl": ("jsonl", jsonl.encode(), {"label_names": ["0", "1"]}),
        "json-samples": ("json-samples", json.dumps(samples).encode(), {"label_names": ["entailment", "other"]}),
        "glue": ("glue", head(shared_data / "rte" / "train.tsv", tmp_path / "rte.tsv", 10).read_bytes(), {}),
        "wikiqa": ("wikiqa", wikiqa_sample.read_bytes(), {}),
    }


@pytest.mark.parametrize("name", ["tsv", "jsonl", "json-samples", "glue", "wikiqa"])
@pytest.mark.parametrize("gz", [False, True])
def test_a_bom_changes_nothing_in_any_text_format(tmp_path, shared_data, wikiqa_sample, name, gz):
    fmt, data, kw = bom_sources(tmp_path, shared_data, wikiqa_sample)[name]
    got = {}
    for bom in (False, True):
        raw = BOM + data if bom else data
        path = tmp_path / f"{name}-{bom}"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        store = Store.create(tmp_path / f"store-{bom}")
        s = ingest(store, [path], IngestOptions(fmt, "c", **kw))
        assert s.bad == {} and s.rows_written == s.rows_read > 0
        got[bom] = rows(store.root, "c")
    assert got[True] == got[False]


# ---- --label-map defines the label names; --positive-label ----------------------------------------


def yes_no_csv(path: Path, answers=("yes", "no", "yes")) -> Path:
    """A CSV of one pair per answer (texts unique to the file: the ids are text hashes)."""
    path.write_text("text_a,text_b,answer\n" + "".join(f"{path.stem} q{i},s{i},{a}\n" for i, a in enumerate(answers)))
    return path


@pytest.mark.parametrize("label_map, names, labels", [
    ("yes=relevant,no=irrelevant", ["relevant", "irrelevant"], [0, 1, 0]),  # the map's order
    ("no=0,yes=1", ["0", "1"], [1, 0, 1]),  # integer targets: numeric order, so 1 stays index 1
    ("yes=1,no=0", ["0", "1"], [1, 0, 1]),
    ("no=not_entailment,yes=entailment", ["entailment", "not_entailment"], [0, 1, 0]),  # the standard NLI order
])
def test_label_map_defines_the_label_names(tmp_path, label_map, names, labels):
    path = yes_no_csv(tmp_path / "a.csv")
    store = tmp_path / "store"
    cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c", "--columns", "label=answer",
        "--label-map", label_map)
    assert Store(store).corpus("c").label_names == names
    assert [r["label"] for r in rows(store, "c")] == labels
    # Appending with the same map fits the corpus.
    cli("ingest", yes_no_csv(tmp_path / "b.csv", ("no",)), "--format", "csv", "--store", store, "--corpus", "c",
        "--columns", "label=answer", "--label-map", label_map)
    assert [r["label"] for r in rows(store, "c")][-1] == labels[1]


def test_label_map_keeps_a_formats_own_label_names(tmp_path, wikiqa_sample):
    """WikiQA's names are [0, 1]: a map into them keeps that order (and the format's positive label)."""
    store = Store.create(tmp_path / "store")
    s = ingest(store, [wikiqa_sample], IngestOptions("wikiqa", "wq", label_map={"1": "1", "0": "0"}))
    assert s.label_names == ["0", "1"] and s.positive_label == store.corpus("wq").positive_label == "1"


def test_positive_label_defaults_by_format_and_is_stored(tmp_path, wikiqa_sample, rte, shared_data):
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    cli("ingest", rte, "--format", "glue", "--store", store, "--corpus", "rte")
    qnli = head(shared_data / "qnli" / "dev.tsv", tmp_path / "qnli.tsv", 10)
    cli("ingest", qnli, "--format", "glue", "--store", store, "--corpus", "qnli")
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("sentence1\tsentence2\tgold_label\nA.\tB.\tneutral\n")
    cli("ingest", mnli, "--format", "glue", "--store", store, "--corpus", "mnli")
    csv_path = yes_no_csv(tmp_path / "a.csv")
    cli("ingest", csv_path, "--format", "csv", "--store", store, "--corpus", "plain", "--columns", "label=answer",
        "--label-names", "no,yes")
    cli("ingest", csv_path, "--format", "csv", "--store", store, "--corpus", "declared", "--columns", "label=answer",
        "--label-names", "no,yes", "--positive-label", "yes")
    st = Store(store)
    assert {c: st.corpus(c).positive_label for c in st.corpora()} == {
        "wq": "1", "rte": "entailment", "qnli": "entailment", "mnli": None, "plain": None, "declared": "yes"}
    # --positive-label overrides a format's default; a later append keeps what the corpus declares.
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq0", "--positive-label", "0")
    cli("ingest", yes_no_csv(tmp_path / "b.csv", ("no",)), "--format", "csv", "--store", store, "--corpus", "declared",
        "--columns", "label=answer")
    assert Store(store).corpus("wq0").positive_label == "0" and Store(store).corpus("declared").positive_label == "yes"


@pytest.mark.parametrize("corpus, args, message", [
    ("d", ["--label-names", "no,yes", "--positive-label", "maybe"], "--positive-label maybe: not one of the label names ['no', 'yes']"),
    ("d", ["--label-map", "yes=1,no=0", "--positive-label", "yes"], "--positive-label yes: not one of the label names ['0', '1']"),
    ("d", ["--unlabeled", "--positive-label", "yes"], "--positive-label yes: the corpus has no label names"),
    ("c", ["--positive-label", "no"], "corpus 'c' in the store declares positive label 'yes'"),
])
def test_a_bad_positive_label_is_refused_and_nothing_is_committed(tmp_path, corpus, args, message):
    path = yes_no_csv(tmp_path / "a.csv")
    store = tmp_path / "store"
    cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c", "--columns", "label=answer",
        "--label-names", "no,yes", "--positive-label", "yes")
    before = snapshot(store)
    other = yes_no_csv(tmp_path / "b.csv", ("no", "yes"))
    result = cli("ingest", other, "--format", "csv", "--store", store, "--corpus", corpus, "--columns", "label=answer",
                 *args, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in " ".join(result.output.split())
    assert snapshot(store) == before


# ---- the column-by-column path for JSONL gives what the row-by-row one gives ----------------------
def _jsonl_lines(n: int, seed: int, ids: bool) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["what", "is", "the", "capital", "of", "France", "café", "naïve", "Paris", "river", "\u3000x"]
    out = []
    for i in range(n):
        row = {"text_a": " ".join(rng.choice(words, 5)), "text_b": " ".join(rng.choice(words, 9)),
               "label": ["yes", "no"][int(rng.integers(0, 2))], "group": f"q{i // 4}"}
        if ids:
            row["id"] = int(i * 7 + 3)
        out.append(json.dumps(row, ensure_ascii=bool(i % 2)))
    return out


DIRTY = [  # chunks holding these go down the row-by-row path: it names each bad line, and takes the odd ones
    "",  # a blank line is skipped
    "{not json",
    json.dumps({"text_a": "a", "text_b": "   ", "label": "yes"}),  # empty text
    json.dumps({"text_a": "a", "label": "yes"}),  # missing text_b
    json.dumps({"text_a": "a", "text_b": "b", "label": "maybe"}),  # unknown label
    json.dumps({"text_a": "a", "text_b": "b", "label": "yes", "id": 3}),  # duplicate id (row 0 has id 3)
    json.dumps({"text_a": {"x": 1}, "text_b": "b", "label": "yes"}),  # not text
    json.dumps({"text_a": "a", "text_b": "b", "label": "yes", "id": 1.5}),  # a float id: taken, "1.5" hashed
    json.dumps({"text_a": "a", "text_b": "b", "label": "yes", "id": 99999999999999999999}),  # taken, hashed
    "[1, 2]",
]


@pytest.mark.parametrize("case", ["clean, source ids", "clean, text ids", "dirty"])
def test_jsonl_read_by_arrow_gives_the_same_corpus_as_row_by_row(tmp_path, monkeypatch, case):
    from tmkd.data import readers

    lines = _jsonl_lines(20_000, seed=1, ids=case != "clean, text ids")
    if case == "dirty":
        for i, bad in enumerate(DIRTY):
            lines.insert(1000 + 997 * i, bad)
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = IngestOptions("jsonl", "c", label_map={"yes": "pos", "no": "neg"}, label_names=["neg", "pos"])

    fast = ingest(Store.create(tmp_path / "fast"), [src], opts)
    real = readers.JsonlReader.chunks
    monkeypatch.setattr(readers.JsonlReader, "chunks", lambda self, n, arrow=True: real(self, n, arrow=False))
    slow = ingest(Store.create(tmp_path / "slow"), [src], opts)

    def parts(root):
        return [p.path.read_bytes() for p in Store(root).corpus("c").parts]

    assert parts(tmp_path / "fast") == parts(tmp_path / "slow") and len(parts(tmp_path / "fast")) == 1
    assert (fast.rows_read, fast.rows_written, fast.rows_labelled, fast.bad) == \
           (slow.rows_read, slow.rows_written, slow.rows_labelled, slow.bad)
    if case == "dirty":
        assert sum(fast.bad.values()) == 7  # all but the blank line and the two odd ids
        assert fast.quarantine.read_text() == slow.quarantine.read_text()


@pytest.mark.parametrize("dirty", [False, True])
def test_parquet_read_by_arrow_gives_the_same_corpus_as_row_by_row(tmp_path, monkeypatch, dirty):
    from tmkd.data import readers

    rows = [json.loads(x) for x in _jsonl_lines(20_000, seed=2, ids=True)]
    if dirty:  # an empty text, a missing label, an unknown label, a duplicate id, spread over chunks
        rows[100]["text_a"], rows[9000]["label"], rows[15000]["label"], rows[17000]["id"] = " ", None, "maybe", 3
    table = pa.Table.from_pylist(rows).cast(pa.schema([("text_a", pa.string()), ("text_b", pa.string()),
                                                       ("label", pa.dictionary(pa.int8(), pa.string())),
                                                       ("group", pa.string()), ("id", pa.int32())]))
    src = tmp_path / "src.parquet"
    pq.write_table(table, src)
    opts = IngestOptions("parquet", "c", label_map={"yes": "pos", "no": "neg"}, label_names=["neg", "pos"])

    fast = ingest(Store.create(tmp_path / "fast"), [src], opts)
    real = readers.ParquetReader.chunks
    monkeypatch.setattr(readers.ParquetReader, "chunks", lambda self, n, arrow=True: real(self, n, arrow=False))
    slow = ingest(Store.create(tmp_path / "slow"), [src], opts)
    assert [p.path.read_bytes() for p in Store(tmp_path / "fast").corpus("c").parts] == \
           [p.path.read_bytes() for p in Store(tmp_path / "slow").corpus("c").parts]
    assert (fast.rows_written, fast.rows_labelled, fast.bad) == (slow.rows_written, slow.rows_labelled, slow.bad)
    assert sum(fast.bad.values()) == (3 if dirty else 0)  # the missing label is an unlabeled row, not a bad one


def test_the_id_set_answers_like_a_python_set_with_its_ids_on_disk(monkeypatch):
    """Flat memory for the duplicate check: Bloom filters in memory, the ids in sorted runs on disk. Small
    runs here (1,000 ids) so that lookups go through many runs and several filters; answers must be exact."""
    from tmkd.data.ingest import IdSet

    monkeypatch.setattr(IdSet, "RUN_IDS", 1000)
    rng = np.random.default_rng(0)
    ids, reference = IdSet(), set()
    for step in range(40):
        batch = np.concatenate([rng.integers(-2**63, 2**63 - 1, 300, dtype=np.int64),  # random (text hashes)
                                np.arange(step * 200, step * 200 + 200, dtype=np.int64),  # sequential source ids
                                rng.choice(np.fromiter(reference, np.int64), 50) if reference else np.zeros(0, np.int64)])
        expect = np.array([int(x) in reference for x in batch])
        np.testing.assert_array_equal(ids.contains(batch), expect)
        new = np.unique(batch[~expect])
        ids.add(new)
        reference.update(int(x) for x in new)
    # it did spill, and merged its runs like a binary counter: few runs, sizes decreasing, a filter per run
    sizes = [n for _, n in ids.runs]
    assert ids._files >= 20 and 1 <= len(sizes) <= 1 + np.log2(len(reference) / 1000)
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) + ids.pending.count == len(reference)
    assert len(ids.filters) - len(ids.runs) in (0, 1)
    probe = rng.integers(-2**63, 2**63 - 1, 20000, dtype=np.int64)
    np.testing.assert_array_equal(ids.contains(probe), [int(x) in reference for x in probe])
    folder = ids.folder
    assert folder.is_dir() and not folder.is_relative_to(Path.cwd())
    ids.close()
    assert not folder.exists()  # nothing left behind


def test_duplicates_are_found_across_runs_on_disk_and_the_runs_are_removed(tmp_path, monkeypatch):
    """The same ingest as always, with the id set writing a run every 64 ids: a row repeating one from
    hundreds of rows earlier (in a run on disk, not in memory) is still quarantined, and no run is left."""
    import tempfile as tf

    from tmkd.data.ingest import IdSet

    monkeypatch.setattr(IdSet, "RUN_IDS", 64)
    monkeypatch.setattr(tf, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = tmp_path / "pairs.jsonl"
    rows_ = [{"id": i, "text_a": f"q {i}", "text_b": f"a {i}", "label": i % 2} for i in range(1000)]
    rows_ += [rows_[3], rows_[500], {"id": 1000, "text_a": "new", "text_b": "pair", "label": 0}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    store = tmp_path / "store"
    s = ingest(Store.create(store), [src], IngestOptions("jsonl", "c", label_names=["0", "1"], part_rows=300))
    assert s.bad == {"duplicate id": 2} and s.rows_written == 1001
    entries = [json.loads(line) for line in s.quarantine.read_text().splitlines()]
    assert [e["line"] for e in entries] == [1001, 1002]
    # appending checks the corpus already in the store the same way (its ids in runs too)
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps(rows_[700]) + "\n" + json.dumps({"id": 5000, "text_a": "x", "text_b": "y",
                                                                  "label": 1}) + "\n")
    s = ingest(Store(store), [again], IngestOptions("jsonl", "c"))
    assert s.bad == {"duplicate id": 1} and s.rows_written == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_ids_text_takes_two_files_whose_own_ids_overlap_into_one_corpus(tmp_path, shared_data):
    """RTE train and dev both number their rows from 0: by the source's ids the second file is all duplicates
    (quarantined and counted); with --ids text every pair goes in, keyed by its text, its own id kept."""
    from tmkd.data.ingest import text_pair_id

    train = head(shared_data / "rte" / "train.tsv", tmp_path / "train.tsv", 12)
    dev = head(shared_data / "rte" / "dev.tsv", tmp_path / "dev.tsv", 12)
    by_source = tmp_path / "by-source"
    cli("ingest", train, "--format", "glue", "--store", by_source, "--corpus", "c")
    out = " ".join(cli("ingest", dev, "--format", "glue", "--store", by_source, "--corpus", "c").output.split())
    assert Store(by_source).corpus("c").rows == 12 and "rows written │ 0 (0 labelled)" in out
    assert "bad: duplicate id │ 12" in out

    by_text = tmp_path / "by-text"
    for path in (train, dev):
        cli("ingest", path, "--format", "glue", "--store", by_text, "--corpus", "c", "--ids", "text")
    got = rows(by_text, "c")
    assert len(got) == 24 and len({r["id"] for r in got}) == 24
    assert [r["id"] for r in got] == [text_pair_id(r["text_a"], r["text_b"]) for r in got]
    assert [r["source_id"] for r in got] == [str(i) for i in range(12)] * 2

"""The store is sacred: no command can damage it, damage never passes, and every tool agrees on what is valid.

Each case below damages a scored store the way a disk, a hand edit or a bug would, then checks
what a user sees: `verify` names the file and the reason and exits 1; `query` leaves the part
out and says so; the trainer refuses it; the next `run` repairs what it can (label parts are
re-scored, and the summary says so) and refuses, writing nothing, what it cannot (a corpus
part that no longer matches its manifest). The README's reliability table lists the same cases.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmkd.data.store import CorruptPartError, Store, logits_to_numpy
from test_label import cli, write_teachers


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, wikiqa_sample, tiny_teachers) -> tuple[Path, Path]:
    """A store with one corpus of 3 parts scored by two teachers; and its teachers.toml."""
    base = tmp_path_factory.mktemp("scored")
    store = base / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 50)
    teachers = write_teachers(base / "t.toml", {k: tiny_teachers[k] for k in ("t1", "t2")})
    cli("run", "--store", store, "--teachers", teachers)
    return store, teachers


# ---- ways to damage a store -----------------------------------------------------------------
def _rewrite(path: Path, change) -> None:
    """Rewrite a Parquet file through ``change(table) -> table``, keeping its metadata: valid Parquet."""
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)


def _logits(table: pa.Table, fn) -> pa.Table:
    values = fn(logits_to_numpy(table.column("logits")).copy())
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return table.set_column(table.schema.get_field_index("logits"), "logits", arr)


def flip_logit_bytes(path: Path) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("logits"))
    data = bytearray(path.read_bytes())
    at = col.data_page_offset + col.total_compressed_size // 2
    for i in range(at, at + 3):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def swap_rows(table):
    return _logits(table, lambda x: x[[1, 0, *range(2, len(x))]])


def swap_ids(table):
    ids = table.column("id").to_numpy().copy()
    ids[[0, 1]] = ids[[1, 0]]
    return table.set_column(0, "id", pa.array(ids))


def nan_row(table):
    def put(x):
        x[3, 0] = np.nan
        return x
    return _logits(table, put)


def null_row(table):
    """Row 3's logits made null: the values of the other rows alone still reshape into a valid-looking array."""
    values = table.column("logits").combine_chunks()
    mask = np.zeros(len(values), bool)
    mask[3] = True
    arr = pa.FixedSizeListArray.from_arrays(values.values, values.type.list_size, mask=pa.array(mask))
    return table.set_column(table.schema.get_field_index("logits"), "logits", arr)


def recommit(store: Store, path: Path) -> None:
    """What a buggy writer would do: make the commit record match a bad file."""
    commit = store.commit_path(path)
    record = json.loads(commit.read_text())
    record["digest"] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    commit.write_text(json.dumps(record))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_corpus(path: Path) -> None:
    table = pq.read_table(path)
    text = table.column("text_a").to_pylist()
    text[0] = text[0] + " (edited)"
    pq.write_table(table.set_column(1, "text_a", pa.array(text)), path)


LABEL = ("labels", "t1", "wq", 1)  # the damaged unit in the label cases
CASES = {
    # name: (what is damaged, damage(store, path), verify's reason)
    "flipped bytes": ("label", lambda st, p: flip_logit_bytes(p), "does not match its recorded digest"),
    "swapped rows": ("label", lambda st, p: _rewrite(p, swap_rows), "does not match its recorded digest"),
    "scaled logits": ("label", lambda st, p: _rewrite(p, lambda t: _logits(t, lambda x: 3 * x)),
                      "does not match its recorded digest"),
    "NaN": ("label", lambda st, p: _rewrite(p, nan_row), "does not match its recorded digest"),
    "NaN, recommitted": ("label", lambda st, p: (_rewrite(p, nan_row), recommit(st, p)), "rows with NaN/inf logits"),
    "null row, recommitted": ("label", lambda st, p: (_rewrite(p, null_row), recommit(st, p)),
                              "1 null 'logits' values (first at row 3)"),
    "swapped ids": ("label", lambda st, p: _rewrite(p, swap_ids), "does not match its recorded digest"),
    "swapped ids, recommitted": ("label", lambda st, p: (_rewrite(p, swap_ids), recommit(st, p)),
                                 "ids not aligned with the corpus part (first mismatch at row 0)"),
    "truncated label part": ("label", lambda st, p: truncate(p), "does not match its recorded digest"),
    "missing label part": ("label", lambda st, p: p.unlink(), "label part is missing"),
    "truncated corpus part": ("corpus", lambda st, p: truncate(p), "does not match its recorded digest"),
    "edited corpus part": ("corpus", lambda st, p: edit_corpus(p), "does not match its recorded digest"),
    "missing corpus part": ("corpus", lambda st, p: p.unlink(), "corpus part wq/1 is missing"),
}


def _set_corpus_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def recommit_corpus(store: Store, path: Path) -> None:
    """A buggy writer again: the manifest, and the label parts' commit records, made to match a bad corpus part."""
    manifest = store.corpus_dir("wq") / "manifest.json"
    raw = json.loads(manifest.read_text())
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    entry = next(p for p in raw["parts"] if p["file"] == path.name)
    for commit in store.root.glob(f"labels/*/wq/{path.stem}.commit.json"):
        record = json.loads(commit.read_text())
        assert record["corpus_part_digest"] == entry["digest"]
        record["corpus_part_digest"] = digest
        commit.write_text(json.dumps(record))
    entry["digest"] = digest
    manifest.write_text(json.dumps(raw))


CORPUS_CONTENT = {  # damage whose digest was recorded anyway: caught by what the part holds
    "label outside the label names": (lambda t: _set_corpus_column(t, "label", [5] * t.num_rows),
                                      "50 labels outside 0..1 (first at row 0: 5)"),
    "null text": (lambda t: _set_corpus_column(t, "text_a", [None] * t.num_rows), "50 null 'text_a' values"),
    "null id": (lambda t: _set_corpus_column(t, "id", [None, *t.column("id").to_pylist()[1:]]),
                "1 null 'id' values (first at row 0)"),
    "column dropped": (lambda t: t.drop(["text_b"]), "has no column 'text_b'"),
    "column retyped": (lambda t: _set_corpus_column(t.cast(t.schema.set(1, pa.field("text_a", pa.large_string()))),
                                                    "text_a", t.column("text_a").to_pylist()),
                       "column 'text_a' has type large_string, expected string"),
}


@pytest.mark.parametrize("case", list(CORPUS_CONTENT))
def test_a_corpus_part_with_a_matching_digest_is_still_checked_for_what_it_holds(case, scored, tmp_path):
    st = Store(shutil.copytree(scored[0], tmp_path / "store"))
    store, part = st.root, st.corpus("wq").parts[1]
    assert part.rows == 50
    change, reason = CORPUS_CONTENT[case]
    pq.write_table(change(pq.read_table(part.path)), part.path)
    recommit_corpus(st, part.path)

    res = cli("verify", "--store", store, ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    problem = next(line for line in res.output.splitlines() if str(part.path) in line)
    assert reason in problem, res.output
    q = cli("query", "--store", store, "--format", "csv", "SELECT count(*) FROM corpus")
    assert int(q.stdout.splitlines()[1]) == 120 - 50 and "1 corpus parts left out as invalid: wq/1" in q.stderr, q.stderr
    with pytest.raises(CorruptPartError, match=re.escape(reason)):  # what the trainer and teachers read through
        Store(store).read_corpus_part(Store(store).corpus("wq").parts[1], ["id", "text_a", "text_b", "label"])


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_named_left_out_refused_and_repaired(case, scored, tmp_path):
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    st = Store(store)
    kind, damage, reason = CASES[case]
    path = st.label_path("t1", "wq", 1) if kind == "label" else st.corpus("wq").parts[1].path
    before = logits_to_numpy(pq.read_table(st.label_path("t1", "wq", 1)).column("logits"))
    size = path.stat().st_size
    damage(st, path)

    # status --full applies the whole rule; plain status, from commit records and sizes, sees a label part
    # that is gone or changed size (verify is the byte-level check, and plain status says so)
    def t1_done(*flags):
        out = cli("status", "--store", store, *flags).output
        return next(line for line in out.splitlines() if "t1" in line and "wq" in line).split("│")[3].strip()

    assert t1_done("--full") == "2/3"
    resized = kind == "label" and (not path.exists() or path.stat().st_size != size)
    assert t1_done() == ("2/3" if resized else "3/3")

    res = cli("verify", "--store", store, ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    problem = next(line for line in res.output.splitlines() if str(path) in line)
    assert reason in problem, res.output

    # query: the damaged part is left out, and stderr says which and why
    q = cli("query", "--store", store, "--format", "csv",
            "SELECT count(*) FROM labels WHERE teacher = 't1'" if kind == "label" else "SELECT count(*) FROM corpus")
    rows = int(q.stdout.splitlines()[1])
    assert rows == 120 - st.corpus("wq").parts[1].rows
    assert ("1 label parts left out as invalid: t1/wq/1" if kind == "label" else
            "1 corpus parts left out as invalid: wq/1") in q.stderr, q.stderr
    # the wide view, checked as it is read: the same part left out (its t1 column NULL), the same message
    q = cli("query", "--store", store, "--format", "csv", "SELECT count(*), count(t1), count(t2) FROM scores")
    pairs, t1, t2 = map(int, q.stdout.splitlines()[1].split(","))
    rows = st.corpus("wq").parts[1].rows
    assert (pairs, t1, t2) == ((120, 120 - rows, 120) if kind == "label" else (120 - rows,) * 3)
    assert ("1 label parts left out as invalid: t1/wq/1" if kind == "label" else
            "1 corpus parts left out as invalid: wq/1") in q.stderr, q.stderr

    # the next run: re-scores a damaged label part (and says so); refuses a damaged corpus part, writing nothing
    snapshot = tree_digests(store)
    res = cli("run", "--store", store, "--teachers", teachers, ok=False)
    if kind == "label":
        assert res.exit_code == 0, res.output
        if case != "missing label part":
            assert "re-scored 1 invalid label part(s): t1/wq/1" in res.output
        assert Store(store).run_logs()[-1]["units_scored"] == 1
        assert "OK" in cli("verify", "--store", store).output
        after = logits_to_numpy(pq.read_table(st.label_path("t1", "wq", 1)).column("logits"))
        np.testing.assert_array_equal(after, before)  # repaired to exactly what it was
    else:
        assert res.exit_code == 1 and str(path) in res.output and "nothing was scored" in res.output
        assert "Traceback" not in res.output
        assert tree_digests(store) == snapshot  # nothing written, not even a run log


def test_stray_files_are_named_by_verify_and_ignored_by_everything_else(scored, tmp_path):
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    stray = [store / "labels" / "t1" / "wq" / "notes.txt", store / "corpus" / "wq" / "part-00099.parquet"]
    for f in stray:
        f.write_text("not tmkd's")
    res = cli("verify", "--store", store, ok=False)
    assert res.exit_code == 1
    for f in stray:
        assert f"{f}: stray file, not part of the store" in res.output
    out = cli("run", "--store", store, "--teachers", teachers).output
    assert "nothing to score" in out and all(f.read_text() == "not tmkd's" for f in stray)  # never deletes them
    assert cli("query", "--store", store, "--format", "csv", "SELECT count(*) FROM labels").stdout.split()[1] == "240"


def test_trainer_refuses_damaged_parts(tmp_path, tiny_teachers):
    """The trainer reads through the same checks: a damaged label or corpus part stops it, named."""
    from tmkd.data.store import CorruptPartError, StaleLabelsError
    import toy

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(16, 16), unlabeled=(), dev=())
    part = store.corpus("train").parts[1]
    label = store.label_path("t1", "train", 1)
    flip_logit_bytes(label)
    with pytest.raises(StaleLabelsError, match="part-00001.parquet.*does not match its recorded digest"):
        store.read_aligned(part, [store.teacher("t1")])
    edit_corpus(part.path)
    with pytest.raises(CorruptPartError, match="corpus/train/part-00001.parquet.*does not match"):
        store.read_aligned(part, [store.teacher("t1")])


# ---- query cannot touch a file --------------------------------------------------------------
HOSTILE = [
    "COPY (SELECT 1 AS x) TO '{part}'",
    "EXPLAIN COPY (SELECT 1 AS x) TO '{part}'",
    "EXPLAIN ANALYZE COPY (SELECT * FROM labels) TO '{part}' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{store}/teachers/evil.json'",
    "COPY (SELECT 1 AS x) TO 'evil.csv'",
    "EXPORT DATABASE '{store}/export'",
    "ATTACH '{store}/evil.duckdb' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['{store}']",
    "RESET enable_external_access",
    "SET temp_directory = '{store}'",
    "SELECT * FROM read_text('{part}')",
    "SELECT * FROM read_blob('{store}/store.json')",
    "SELECT * FROM read_csv('{outside}')",
    "SELECT * FROM read_text('{outside}')",
    "SELECT * FROM read_parquet('{part}')",
    "SELECT * FROM '{part}'",
    "SELECT * FROM glob('{store}/**')",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')",
    "CREATE PERSISTENT SECRET s2 (TYPE s3, KEY_ID 'k', SECRET 's')",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{store}/profile.json'",
    "CALL pragma_version()",
    "SELECT 1; COPY (SELECT 1 AS x) TO '{part}'",
    "SELECT 1; EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{store}/teachers/evil.json'",
    "CREATE TABLE t AS SELECT * FROM labels; SELECT count(*) FROM t",
    "ATTACH ':memory:' AS m; CREATE TABLE m.t AS SELECT 1",
    "SELECT * FROM duckdb_settings() WHERE name = 'enable_external_access'",
    # DuckDB always allows <cwd>/:memory: and its .wal files, even with external access off
    "COPY (SELECT 'x' AS x) TO ':memory:'",
    "COPY (SELECT 'x' AS x) TO ':memory:.wal'",
    "SELECT * FROM read_text(':memory:.wal')",
    "COPY (SELECT 1 AS x) TO (current_setting('temp_directory') || '/x.csv')",
]
# The statements that touch no file and no setting, and so may succeed; every other one must fail.
HARMLESS = {
    "CALL pragma_version()",
    "CREATE TABLE t AS SELECT * FROM labels; SELECT count(*) FROM t",
    "ATTACH ':memory:' AS m; CREATE TABLE m.t AS SELECT 1",
    "SELECT * FROM duckdb_settings() WHERE name = 'enable_external_access'",
}


def test_hostile_queries_change_nothing_and_create_nothing(scored, tmp_path, monkeypatch):
    source, _ = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    outside = tmp_path / "outside.csv"
    outside.write_text("a,b\n1,2\n")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    temp = tmp_path / "tmp"  # the temp folder, private to this test so other processes cannot touch it
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    part = Store(store).label_path("t1", "wq", 0)
    before = tree_digests(store)
    home_duckdb = Path.home() / ".duckdb"
    home_before = tree_digests(home_duckdb) if home_duckdb.exists() else {}

    for template in HOSTILE:
        sql = template.format(part=part, store=store, outside=outside)
        res = cli("query", "--store", store, "--format", "csv", sql, ok=False)
        assert res.exit_code == (0 if template in HARMLESS else 1), (sql, res.output)
        assert "Traceback" not in res.output and not isinstance(res.exception, (AssertionError, TypeError)), sql
        if res.exit_code == 1:
            assert res.output.startswith("error: "), (sql, res.output)
        if template.startswith(("SET", "RESET", "PRAGMA")):  # the settings cannot be changed at all
            assert "the configuration has been locked" in res.output, (sql, res.output)
        # reading or writing any file is refused, by DuckDB, whatever the statement's type
        if any(w in template for w in ("COPY", "read_", "glob", "EXPORT", "'{part}'", ".duckdb")) \
                and "temp_directory" not in template:
            assert res.exit_code == 1 and ("disabled by configuration" in res.output
                                           or "Permission" in res.output), (sql, res.output)
        assert tree_digests(store) == before, f"{sql} changed the store"
        assert list(work.iterdir()) == [], f"{sql} created {list(work.iterdir())}"
    assert list(temp.iterdir()) == []  # the query's scratch folder is gone too
    assert (tree_digests(home_duckdb) if home_duckdb.exists() else {}) == home_before
    # and analysis statements the old allow-list refused now work
    for sql in ("PIVOT (SELECT teacher, part FROM labels) ON teacher USING count(*)", "SUMMARIZE labels"):
        assert cli("query", "--store", store, sql).exit_code == 0
    # run from inside the store, the paths DuckDB allows would be the store's: still nothing written
    monkeypatch.chdir(store)
    for sql in ("COPY (SELECT 'x' AS x) TO ':memory:'", "COPY (SELECT 'x' AS x) TO ':memory:.wal'"):
        assert cli("query", "--store", ".", sql, ok=False).exit_code == 1
    assert tree_digests(store) == before


def test_a_part_rewritten_while_a_query_runs_discards_the_result(scored, tmp_path, monkeypatch):
    """The views are checked before the query; a part replaced after that is never read as if checked."""
    import tmkd.pipeline.query as query

    source, _ = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    path = Store(store).label_path("t1", "wq", 0)
    real = query._locked_connection

    def swap_then_connect():
        scaled = tmp_path / "scaled.parquet"
        shutil.copy(path, scaled)
        _rewrite(scaled, lambda t: _logits(t, lambda x: 3 * x))
        os.replace(scaled, path)  # after the checks, before DuckDB reads the files
        return real()

    monkeypatch.setattr(query, "_locked_connection", swap_then_connect)
    res = cli("query", "--store", store, "SELECT sum(logits[1]) FROM labels", ok=False)
    assert res.exit_code == 1 and "the store changed while the query ran" in res.output and str(path) in res.output


def test_a_query_checks_and_sees_only_the_views_it_names(scored, tmp_path, monkeypatch):
    """A view the SQL does not name is neither checked (no cost) nor registered (it cannot be read unchecked)."""
    import tmkd.pipeline.query as query

    source, _ = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    truncate(Store(store).corpus("wq").parts[1].path)
    res = cli("query", "--store", store, "--format", "csv", "SELECT count(*) FROM teachers")
    assert res.stdout.split()[1] == "2" and "left out" not in res.stderr  # the corpus was not read
    res = cli("query", "--store", store, "--format", "csv", "SELECT count(*) FROM corpus")
    assert "1 corpus parts left out as invalid: wq/1" in res.stderr

    built = []
    real = query.build_views
    monkeypatch.setattr(query, "build_views", lambda st, wanted=None: built.append(wanted) or real(st, wanted))
    cli("query", "--store", store, "SELECT count(*) FROM scores s, Teachers")
    assert built[-1] == {"scores", "teachers"}
    res = cli("query", "--store", store, "SELECT count(*) FROM query_table('lab' || 'els')", ok=False)
    assert res.exit_code == 1 and "labels does not exist" in res.output  # an error, never an unchecked read


def test_query_table_prints_values_as_text(scored, tmp_path):
    store, _ = scored
    res = cli("query", "--store", store, "SELECT '[estimated]' AS note, '[/z]' AS odd, '[bold]x[/bold]' AS b")
    assert "[estimated]" in res.stdout and "[/z]" in res.stdout and "[bold]x[/bold]" in res.stdout
    res = cli("query", "--store", store, "SELECT * FROM no_such_view_[/z]", ok=False)
    assert res.exit_code == 1 and "[/z]" in res.output and "Traceback" not in res.output
    # terminal escapes in a value (an untrusted corpus) are shown, not sent: no colour change, no window title
    res = cli("query", "--store", store, "SELECT 'esc ' || chr(27) || '[31mRED' || chr(27) || ']0;pwned' || chr(7) AS t")
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "esc \\x1b[31mRED\\x1b]0;pwned\\x07" in res.stdout
    res = cli("query", "--store", store, "SELECT * FROM x" + chr(27) + "[2J", ok=False)  # echoed in the error
    assert "\x1b" not in res.output and "\\x1b[2J" in res.output


def test_a_version_1_store_opens_and_its_label_parts_are_scored_again(scored, tmp_path):
    """Stores written before commit records: corpora are kept, label parts count as stale and are redone."""
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    (store / "store.json").write_text(json.dumps({"schema_version": 1, "tool_version": "0.1.0"}))
    for commit in store.glob("labels/*/*/*.commit.json"):
        commit.unlink()
    res = cli("verify", "--store", store, ok=False)
    assert res.exit_code == 1 and "no commit record" in res.output
    res = cli("run", "--store", store, "--teachers", teachers)
    assert "re-scored 6 invalid label part(s)" in res.output
    assert json.loads((store / "store.json").read_text())["schema_version"] == 2
    assert "OK" in cli("verify", "--store", store).output


# ---- concurrent workers share a store through claims ----------------------------------------
def _workers_store(tmp_path: Path, shared_data: Path, name: str, rows: int, part_rows: int) -> Path:
    from tiny import read_lines

    source = tmp_path / "wikiqa.tsv"
    if not source.exists():
        source.write_text("".join(read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", rows + 1)), newline="")
    store = tmp_path / name
    cli("ingest", source, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", part_rows)
    return store


def _start(store: Path, teachers: Path, lease: float):
    import subprocess
    import sys

    cmd = [Path(sys.executable).parent / "tmkd-label", "run", "--store", store, "--teachers", teachers,
           "--lease", str(lease)]
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_workers(store, teachers: Path, n: int, lease: float) -> list[dict]:
    """``n`` `tmkd-label run` at once on one store; they must all succeed, as distinct processes. Their run logs."""
    procs = [_start(store, teachers, lease) for _ in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    logs = Store(store).run_logs()
    assert len({log["pid"] for log in logs}) == n
    return logs


def _label_bytes(store: Path) -> dict:
    return {str(p.relative_to(store)): p.read_bytes() for p in Store(store).label_files()}


def test_three_workers_at_once_score_every_unit_exactly_once(tmp_path, shared_data, tiny_teachers):
    teachers = write_teachers(tmp_path / "t.toml", {k: tiny_teachers[k] for k in ("t1", "t2")})
    one = _workers_store(tmp_path, shared_data, "one", 600, 50)
    three = _workers_store(tmp_path, shared_data, "three", 600, 50)
    cli("run", "--store", one, "--teachers", teachers)

    logs = run_workers(three, teachers, 3, lease=30)
    assert sorted(log["log_path"] for log in logs) == sorted(str(p) for p in (three / "runs").glob("*.json"))
    scored = [tuple(u) for log in logs for u in log["scored"]]
    units = 2 * len(Store(three).corpus("wq").parts)
    assert len(scored) == len(set(scored)) == units  # every unit once, by exactly one worker
    assert sum(log["units_lost"] for log in logs) == 0
    assert _label_bytes(three) == _label_bytes(one)  # bit for bit
    assert "OK" in cli("verify", "--store", three).output
    assert not list(three.glob("claims/**/*.claim")) and not list(three.glob("labels/**/.*.tmp"))


def test_a_killed_workers_unit_is_taken_over_by_the_survivors(tmp_path, shared_data, tiny_tokenizer):
    import signal
    import time

    from tiny import build_bert

    big = {f"b{s}": build_bert(tmp_path / f"b{s}", tiny_tokenizer, seed=s, layers=4, hidden=128) for s in (1, 2)}
    teachers = write_teachers(tmp_path / "t.toml", big, max_length=128)
    one = _workers_store(tmp_path, shared_data, "one", 600, 100)
    three = _workers_store(tmp_path, shared_data, "three", 600, 100)
    cli("run", "--store", one, "--teachers", teachers)

    lease = 4.0
    victim = _start(three, teachers, lease)  # the first of the three: it claims units before the others start
    deadline = time.time() + 120

    def victims_claims():
        claims = []
        for c in three.glob("claims/*/*/*.claim"):
            try:
                if json.loads(c.read_text())["pid"] == victim.pid:
                    claims.append(c)
            except (FileNotFoundError, ValueError):
                pass
        return claims

    held = []
    while not held and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        if victims_claims():
            victim.send_signal(signal.SIGSTOP)  # freeze it mid-part, then make sure it still holds a claim
            held = victims_claims()
            if not held:
                victim.send_signal(signal.SIGCONT)
    assert held, "the victim should be frozen while it holds a claim (mid-part)"
    procs = [victim] + [_start(three, teachers, lease) for _ in range(2)]
    time.sleep(1.0)  # the two others start and plan while the victim still holds its units
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    outs = [p.communicate(timeout=300)[0] for p in procs[1:]]
    assert all(p.returncode == 0 for p in procs[1:]), outs
    units = {(c.parent.parent.name, c.parent.name, int(c.stem.split("-")[1])) for c in held}
    survivors = [tuple(u) for log in Store(three).run_logs() for u in log["scored"]]
    assert units <= set(survivors)  # the survivors finished the victim's units
    assert len(survivors) == len(set(survivors))
    assert _label_bytes(three) == _label_bytes(one)  # bit for bit, as a single uninterrupted run
    assert "OK" in cli("verify", "--store", three).output
    assert not list(three.glob("labels/**/.*.tmp"))  # the victim's temporaries went with its claim


def test_a_claim_from_another_node_is_taken_over_only_when_its_lease_expires(tmp_path):
    """Across nodes a dead worker cannot be seen, only its lease running out."""
    import time

    from tmkd.data.claims import Claims

    store = Store.create(tmp_path / "store")
    theirs, ours = Claims(store, lease_s=2.0), Claims(store, lease_s=2.0)
    theirs.owner["host"] = "another-node"
    assert theirs.try_claim("t1", "wq", 0)
    path = theirs.path("t1", "wq", 0)
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "another-node", "pid": 1}))
    assert not ours.try_claim("t1", "wq", 0)  # live: refused
    theirs.renew()
    time.sleep(1.2)
    theirs.renew()  # a live worker keeps renewing: still refused after more than half the lease
    time.sleep(1.2)
    assert not ours.try_claim("t1", "wq", 0)
    time.sleep(2.2)  # no renewal for longer than the lease: the claim is dead
    assert ours.try_claim("t1", "wq", 0) and ours.holds("t1", "wq", 0)
    assert not theirs.holds("t1", "wq", 0)
    theirs.renew()  # the old owner notices it lost the claim, and would drop its result
    assert path not in theirs.held


def test_one_label_space_rule_and_message_for_verify_query_and_run(scored, tmp_path):
    """A teacher record whose label names no longer match the corpus's: every tool says the same thing."""
    from tmkd.data.store import label_space_mismatch

    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    record = store / "teachers" / "t1.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "label_names": ["no", "yes"]}))
    message = label_space_mismatch("t1", ["no", "yes"], "corpus 'wq'", ["0", "1"])
    assert message and "do not match corpus 'wq' labels ['0', '1']" in message
    res = cli("verify", "--store", store, ok=False)
    assert res.exit_code == 1 and message in res.output
    q = cli("query", "--store", store, "--format", "csv", "SELECT count(*) FROM labels WHERE teacher = 't1'")
    assert q.stdout.split()[1] == "0" and message in q.stderr
    # run takes the labels from the teacher's checkpoint again and records them: repaired, nothing re-scored
    cli("run", "--store", store, "--teachers", teachers)
    assert json.loads(record.read_text())["label_names"] == ["LABEL_0", "LABEL_1"]
    assert Store(store).run_logs()[-1]["units_scored"] == 0
    assert "OK" in cli("verify", "--store", store).output


def test_the_owners_lease_decides_when_a_claim_expires(tmp_path):
    """A worker started with a short --lease must not take over a long-lease worker's units early."""
    import time

    from tmkd.data.claims import Claims

    store = Store.create(tmp_path / "store")
    patient, hasty = Claims(store, lease_s=30.0), Claims(store, lease_s=0.2)
    patient.owner["host"] = "another-node"  # so only the lease can free it
    assert patient.try_claim("t1", "wq", 0)
    time.sleep(0.5)
    assert not hasty.try_claim("t1", "wq", 0) and hasty.is_live("t1", "wq", 0)


def test_two_runs_with_different_checkpoints_under_one_name_cannot_both_record_it(tmp_path):
    from tmkd.data.store import StoreError, TeacherRecord

    store = Store.create(tmp_path / "store")
    a = TeacherRecord("t1", "sha256:aaa", "/a", ["0", "1"], "float32", 64)
    b = TeacherRecord("t1", "sha256:bbb", "/b", ["0", "1"], "float32", 64)
    store.record_teacher(a)
    store.record_teacher(a)  # the same teacher again: fine
    with pytest.raises(StoreError, match="teacher 't1' changed"):
        store.record_teacher(b)
    assert store.teacher("t1") == a
    store.record_teacher(b, replace=True)
    assert store.teacher("t1") == b


def test_two_runs_repair_damaged_parts_once_each(scored, tmp_path):
    """Re-scored parts are bit-identical to the damaged ones' records; commit ids still tell them apart."""
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    st = Store(store)
    parts = st.corpus("wq").parts
    for p in parts:
        flip_logit_bytes(st.label_path("t1", "wq", p.part))
    procs = [_start(store, teachers, lease=30) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(log["units_scored"] for log in Store(store).run_logs()[-2:]) == len(parts)
    assert "OK" in cli("verify", "--store", store).output


def _damage_records(st: Store, case: str) -> Path:
    label = st.label_path("t1", "wq", 1)
    if case == "commit record not an object":
        st.commit_path(label).write_text("[]")
        return st.commit_path(label)
    if case == "manifest without parts":
        path = st.corpus_dir("wq") / "manifest.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "parts"}))
        return path
    if case == "teacher label names null":
        path = st.teacher_path("t1")
        path.write_text(json.dumps({**json.loads(path.read_text()), "label_names": None}))
        return path
    if case == "store.json not an object":
        (st.root / "store.json").write_text("[]")
        return st.root / "store.json"
    if case == "a folder where a label part goes":
        label.unlink()
        label.mkdir()
        return label
    if case == "a FIFO where a label part goes":
        label.unlink()
        os.mkfifo(label)
        return label
    records = {"a FIFO where the manifest goes": st.corpus_dir("wq") / "manifest.json",
               "a FIFO where a commit record goes": st.commit_path(label),
               "a FIFO where a teacher record goes": st.teacher_path("t1"),
               "a FIFO where store.json goes": st.root / "store.json"}
    if case in records:  # opening a FIFO for reading blocks until a writer comes: no reader may wait on one
        records[case].unlink()
        os.mkfifo(records[case])
        return records[case]
    raise ValueError(case)


def _hung(signum, frame):
    raise TimeoutError("a command hung on a damaged store")


@pytest.mark.parametrize("case", ["commit record not an object", "manifest without parts", "teacher label names null",
                                  "store.json not an object", "a folder where a label part goes",
                                  "a FIFO where a label part goes", "a FIFO where the manifest goes",
                                  "a FIFO where a commit record goes", "a FIFO where a teacher record goes",
                                  "a FIFO where store.json goes"])
def test_damaged_records_give_one_line_errors_never_tracebacks_or_hangs(case, scored, tmp_path):
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    path = _damage_records(Store(store), case)
    old = signal.signal(signal.SIGALRM, _hung)
    try:
        for args in (["verify"], ["status"], ["query", "SELECT count(*) FROM labels"], ["run", "--teachers", teachers]):
            signal.alarm(60)
            res = cli(args[0], "--store", store, *args[1:], ok=False)
            signal.alarm(0)
            assert res.exception is None or isinstance(res.exception, SystemExit), (case, args, res.exception)
            if args[0] == "verify" or case in ("manifest without parts", "teacher label names null",
                                               "store.json not an object", "a FIFO where the manifest goes",
                                               "a FIFO where a teacher record goes", "a FIFO where store.json goes"):
                assert res.exit_code == 1 and str(path) in res.output, (case, args, res.output)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if case == "commit record not an object":  # run repaired it
        assert "OK" in cli("verify", "--store", store).output


def test_leftover_temporaries_of_dead_writers_are_removed_by_run(scored, tmp_path):
    source, teachers = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    folder = store / "labels" / "t1" / "wq"
    dead = [folder / ".part-00001.commit.json.0123abcd.tmp", folder / ".part-00002.parquet.4567ef.tmp"]
    for f in dead:
        f.write_text("half")
    assert "temporary file" in cli("verify", "--store", store).output
    cli("run", "--store", store, "--teachers", teachers)
    assert not any(f.exists() for f in dead)
    assert "temporary" not in cli("verify", "--store", store).output


def test_odd_input_is_refused_or_written_as_valid_output(scored, tmp_path):
    store, teachers = scored
    (tmp_path / "x.tsv").write_text("text_a\ttext_b\na\tb\n")
    res = cli("ingest", tmp_path / "x.tsv", "--format", "tsv", "--store", tmp_path / "s", "--corpus", "wq\n", ok=False)
    assert res.exit_code == 1 and "invalid corpus name" in res.output
    for lease in ("nan", "inf", "0"):
        res = cli("run", "--store", store, "--teachers", teachers, "--lease", lease, ok=False)
        assert res.exit_code == 1 and "--lease" in res.output, lease
    out = cli("query", "--store", store, "--format", "json",
              "SELECT 'nan'::DOUBLE AS x, [1.0, 'inf'::DOUBLE] AS y, {'a': 'nan'::DOUBLE} AS z")
    assert json.loads(out.stdout) == [{"x": None, "y": [1.0, None], "z": {"a": None}}]
    res = cli("query", "--store", store, "--format", "json", "SELECT 1 AS a, 2 AS a", ok=False)
    assert res.exit_code == 1 and "distinct column names" in res.output
    assert cli("query", "--store", store, "--max-rows", "-1", "SELECT 1", ok=False).exit_code == 2


def test_bad_run_options_are_refused_before_anything_is_written(tmp_path, wikiqa_sample, tiny_teachers):
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    before = tree_digests(store)
    for option, value, message in (("--lease", "0", "--lease"), ("--device", "gpu", "not a torch device"),
                                   ("--device", "cuda:7", "CUDA")):
        res = cli("run", "--store", store, "--teachers", teachers, option, value, ok=False)
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, (option, value)
        assert tree_digests(store) == before  # no teacher record, no run log, no claim


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_query_output_streams_the_result_into_a_file(scored, tmp_path, fmt):
    """--output writes the last statement's result (pyarrow writes it: DuckDB still has no file access),
    whole or not at all, and never into the store."""
    import csv

    source, _ = scored
    store = tmp_path / "store"
    shutil.copytree(source, store)
    before = tree_digests(store)
    sql = ("SELECT teacher, corpus, part, \"row\", id, logits[1] AS l0, logits[2] / 0.0 AS inf FROM labels "
           "ORDER BY teacher, part, \"row\"")
    want = json.loads(cli("query", "--store", store, "--format", "json", sql).stdout)
    out = tmp_path / f"result.{fmt}"
    res = cli("query", "--store", store, "--output", out, sql)
    assert f"240 rows -> {out} ({fmt})" in res.stderr.replace("\n", "")
    if fmt == "parquet":
        got = pq.read_table(out).to_pylist()
    elif fmt == "csv":
        got = list(csv.DictReader(out.open()))
    else:
        got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(want) == 240
    for g, w in zip(got, want):
        assert str(g["id"]) == str(w["id"]) and abs(float(g["l0"]) - w["l0"]) < 1e-6
    assert tree_digests(store) == before and not list(tmp_path.glob(".result.*"))

    inside = cli("query", "--store", store, "--output", store / "x.parquet", "SELECT 1", ok=False)
    assert inside.exit_code == 1 and "a query never writes into a store" in inside.output
    failed = cli("query", "--store", store, "--output", tmp_path / "bad.csv", "SELECT nope FROM labels", ok=False)
    assert failed.exit_code == 1 and not (tmp_path / "bad.csv").exists() and not list(tmp_path.glob(".bad.*"))
    assert tree_digests(store) == before


def test_outputs_write_through_a_symlink_and_never_replace_a_pipe(scored, tmp_path):
    """--output and report --out write a file and rename it into place: through a symlink to the file it names
    (the link stays a link), and a pipe or a device in their place is refused, not replaced by a file."""
    store, _ = scored
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    cli("query", "--store", store, "--output", link, "SELECT 42 AS answer")
    assert link.is_symlink() and real.read_text().split() == ['"answer"', "42"]
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for args in (["query", "--store", store, "--output", fifo, "SELECT 1"],
                 ["report", "--store", store, "--out", tmp_path / "pipe.html"]):
        if args[0] == "report":
            os.mkfifo(tmp_path / "pipe.html")
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and "not a regular file" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "pipe.csv").is_file() and not (tmp_path / "pipe.html").is_file()
    assert (tmp_path / "pipe.csv").is_fifo() and (tmp_path / "pipe.html").is_fifo()
    assert not (tmp_path / "pipe.json").exists()  # refused before anything is written, the page's numbers too

    # the report's numbers go beside the page: a symlink there into the store is refused like the page itself
    before = tree_digests(store)
    (tmp_path / "r.json").symlink_to(store / "store.json")
    res = cli("report", "--store", store, "--out", tmp_path / "r.html", ok=False)
    assert res.exit_code == 1 and "a report never writes into a store" in res.output
    assert tree_digests(store) == before and not (tmp_path / "r.html").exists()
    # and one to a file elsewhere is written through, the link kept
    (tmp_path / "r.json").unlink()
    (tmp_path / "numbers.json").write_text("{}")
    (tmp_path / "r.json").symlink_to(tmp_path / "numbers.json")
    cli("report", "--store", store, "--out", tmp_path / "r.html")
    assert (tmp_path / "r.json").is_symlink() and "corpora" in json.loads((tmp_path / "numbers.json").read_text())


FULL_DISK = {  # which file's temporary is opened on /dev/full (the third of its kind): the file the error names
    "label part": lambda path: path.suffix == ".parquet" and "labels" in path.parts,
    "commit record": lambda path: path.name.endswith(".commit.json"),
    "claim": lambda path: path.suffix == ".claim",
}


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full to fill a disk")
@pytest.mark.parametrize("kind", list(FULL_DISK))
def test_a_full_disk_stops_run_with_the_file_named_and_loses_nothing(kind, scored, tmp_path, monkeypatch):
    """A real ENOSPC, from Arrow's or Python's own writer: the third label part's, commit record's or claim's
    temporary is opened on /dev/full. The run stops naming that file, leaves no temporary, and every committed part
    stays valid; the next run finishes with the labels of an undisturbed one."""
    from test_label import assert_same_labels
    from tmkd.data import store as store_mod

    source, teachers = scored
    store = shutil.copytree(source, tmp_path / "store")
    for folder in ("labels", "teachers", "runs", "claims"):
        shutil.rmtree(store / folder, ignore_errors=True)
    real_tmp, made = store_mod._tmp_path, []

    def on_a_full_disk(path, token=None):
        tmp = real_tmp(path, token)
        if FULL_DISK[kind](path):
            made.append(path)
            if len(made) == 3:
                os.symlink("/dev/full", tmp)
        return tmp

    monkeypatch.setattr(store_mod, "_tmp_path", on_a_full_disk)
    res = cli("run", "--store", store, "--teachers", teachers, ok=False)
    monkeypatch.undo()
    assert res.exit_code == 1 and "Traceback" not in res.output
    out = " ".join(res.output.split())
    assert f"error: {made[2]}: " in out and "No space left on device" in out, out
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]
    # what was committed before it is valid; how many parts that is depends on how far the writer thread had got
    problems = [line for line in cli("verify", "--store", store, ok=False).output.splitlines()
                if line.startswith("problem:")]
    # (a label part whose commit record could not be written is not committed: the next run scores it again)
    uncommitted = str(made[2]).replace(".commit.json", ".parquet")
    assert 1 <= len(problems) <= 6 and all("missing (not scored yet" in p or (
        kind == "commit record" and f"{uncommitted}: stale: no commit record" in p) for p in problems), problems
    cli("run", "--store", store, "--teachers", teachers)
    assert "OK" in cli("verify", "--store", store).output
    assert_same_labels(store, source)


@pytest.fixture
def read_only_mount(tmp_path):
    """A tmpfs of the test's own, remounted read-only by the caller (root only: skipped, visibly, elsewhere)."""
    import subprocess

    where = tmp_path / "mnt"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only file system needs root and mount(8)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_read_only_store_stops_run_with_the_file_named_and_changes_nothing(scored, read_only_mount):
    import subprocess

    source, teachers = scored
    store = shutil.copytree(source, read_only_mount / "store")
    for folder in ("labels", "teachers", "runs", "claims"):
        shutil.rmtree(store / folder, ignore_errors=True)
    before = tree_digests(store)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    res = cli("run", "--store", store, "--teachers", teachers, ok=False)
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "Traceback" not in out and "Read-only file system" in out, out
    assert re.search(rf"error: {re.escape(str(store))}/\S+: ", out) and ".tmp" not in out, out
    assert tree_digests(store) == before


def test_arrows_own_open_error_on_a_read_only_mount_names_the_part_not_its_temporary(read_only_mount):
    import subprocess

    from tmkd.data.store import atomic_write_parquet

    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    target = read_only_mount / "part-00000.parquet"
    with pytest.raises(OSError) as e:
        atomic_write_parquet(target, pa.table({"a": [1]}))
    assert e.value.filename == str(target) and "Read-only file system" in str(e.value)
    assert ".tmp" not in str(e.value), str(e.value)

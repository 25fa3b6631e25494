"""The store on an object store: the same commands and guarantees against a real S3 API.

moto's S3 server runs on 127.0.0.1 (tests/conftest.py); tmkd finds it through AWS_ENDPOINT_URL,
as it would find MinIO or S3 itself. The tests marked with ``bucket_store`` run on gs:// too, against
fake-gcs-server (tests/gcs_front.py: its conditional writes are modelled by a small front). What runs here runs locally too (tests/test_label.py,
test_store_trust.py); these tests check that the object store gives the same bytes and the same
answers, with commits made by conditional PUTs instead of renames.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tmkd.data.fs import ObjectPath, store_location
from tmkd.data.store import Store
from test_label import cli, kill_once_scoring, write_teachers
from test_store_trust import run_workers
from test_finetune import toy_store  # noqa: F401  (a fixture)

BIN = Path(sys.executable).parent


def _label_bytes(store) -> dict:
    """The committed bytes of each unit (teacher, corpus, part); on an object store each commit's data has a
    key of its own (part-NNNNN.<commit>.parquet), on a disk the part's name."""
    st = Store(store)
    out = {}
    for t in st.teachers().values():
        for c in st.corpora():
            for p in st.corpus(c).parts:
                check = st.check_commit(t, p)
                if check.status == "ok":
                    out[(t.name, c, p.part)] = check.path.read_bytes()
    return out


def _close(a, b) -> bool:
    """Equal, floats to 1e-9 (DuckDB sums in parallel: the last digits depend on the order)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b


def _corpus_bytes(store) -> dict:
    st = Store(store)
    return {f"{c}/{p.part}": p.path.read_bytes() for c in st.corpora() for p in st.corpus(c).parts}


@pytest.mark.parametrize("command", [["status"], ["verify"], ["query", "SELECT 1"],
                                     ["run", "--teachers", "t.toml"], ["ingest", "x.tsv", "--format", "wikiqa",
                                                                       "--corpus", "c"]])
def test_an_unsupported_uri_is_refused_and_nothing_is_written(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.tsv").write_text("QuestionID\tQuestion\n")
    (tmp_path / "t.toml").write_text("")
    before = sorted(tmp_path.iterdir())
    args = command[:1] + ["--store", "ftp://bucket/store"] + command[1:]
    if command[0] == "query":
        args = ["query", "--store", "ftp://bucket/store", "SELECT 1"]
    result = cli(*args, ok=False)
    assert result.exit_code == 1, result.output
    assert "ftp://bucket/store: unsupported URI scheme 'ftp'" in result.output
    assert sorted(tmp_path.iterdir()) == before  # no folder named ftp: or anything else


def test_ingest_run_verify_query_on_a_bucket_equal_the_local_store_bit_for_bit(tmp_path, bucket_store,
                                                                              wikiqa_sample, tiny_teachers):
    s3_store = bucket_store  # s3:// (moto) and gs:// (fake-gcs-server)
    local = tmp_path / "local"
    teachers = write_teachers(tmp_path / "t.toml", {k: tiny_teachers[k] for k in ("t1", "t2")})
    for store in (local, s3_store):
        cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 40)
        cli("run", "--store", store, "--teachers", teachers)
    assert isinstance(Store(s3_store).root, ObjectPath)
    assert _corpus_bytes(s3_store) == _corpus_bytes(local) and len(_corpus_bytes(local)) == 3
    assert _label_bytes(s3_store) == _label_bytes(local) and len(_label_bytes(local)) == 6

    again = cli("run", "--store", s3_store, "--teachers", teachers).output
    assert "nothing to score: 6 units already scored" in again
    assert "OK" in cli("verify", "--store", s3_store).output
    assert "wq" in cli("status", "--store", s3_store).output
    sql = ("SELECT teacher, count(*) AS n, round(sum(list_sum(logits)), 4) AS s FROM labels "
           "GROUP BY teacher ORDER BY teacher")
    on_s3 = cli("query", "--store", s3_store, "--format", "json", sql).output
    assert json.loads(on_s3) == json.loads(cli("query", "--store", local, "--format", "json", sql).output)
    assert [r["n"] for r in json.loads(on_s3)] == [120, 120]
    # the report: the same numbers from the bucket as from the disk
    reports = []
    for store in (local, s3_store):
        cli("report", "--store", store, "--out", tmp_path / "r.html", "--top", 3)
        data = json.loads((tmp_path / "r.json").read_text())
        reports.append({k: v for k, v in data.items() if k not in ("store", "seconds")})
    assert _close(reports[0], reports[1]) and reports[0]["corpora"]["wq"]["ranking"]["t1"]["groups"] > 0
    # a query cannot write to the bucket either
    bad = cli("query", "--store", s3_store, f"COPY labels TO '{s3_store}/x.parquet'", ok=False)
    assert bad.exit_code == 1 and not ObjectPath(*s3_store.split("/store")[0:1], "store/x.parquet").is_file()


def test_conditional_writes_refuse_a_changed_object_and_let_one_of_many_win(bucket_store):
    """What claims and commit records rest on: create only if absent; overwrite only the version read."""
    from concurrent.futures import ThreadPoolExecutor

    obj = store_location(bucket_store) / "claims" / "x.claim"
    assert obj.create(b"one") and not obj.create(b"two") and obj.read_bytes() == b"one"
    _, tag = obj.read_tagged()
    obj.put(b"one, again")  # another writer's version (S3's ETag is the content's MD5: tmkd's writes all differ)
    assert not obj.put_if(b"three", tag) and obj.read_bytes() == b"one, again"
    _, tag = obj.read_tagged()
    with ThreadPoolExecutor(8) as pool:  # eight workers overwrite the version they all read: one wins
        wins = list(pool.map(lambda i: obj.put_if(f"w{i}".encode(), tag), range(8)))
    assert sum(wins) == 1 and obj.read_bytes() == f"w{wins.index(True)}".encode()
    obj.unlink()
    assert not obj.put_if(b"gone", tag) and not obj.is_file()
    racers = store_location(bucket_store) / "claims" / "race.claim"
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(lambda i: racers.create(f"{i}".encode()), range(8))) == 1


def test_a_corrupted_object_is_caught_and_rescored(tmp_path, bucket_store, wikiqa_sample, tiny_teachers):
    s3_store = bucket_store
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", s3_store, "--corpus", "wq", "--part-rows", 40)
    cli("run", "--store", s3_store, "--teachers", teachers)
    st = Store(s3_store)
    good = _label_bytes(s3_store)
    victim = st.check_commit(st.teacher("t1"), st.corpus("wq").parts[1]).path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.put(bytes(data))  # one flipped byte, written over the object
    result = cli("verify", "--store", s3_store, ok=False)
    assert result.exit_code == 1 and "does not match its recorded digest" in result.output
    assert str(victim) in result.output.replace("\n", "")
    left = cli("query", "--store", s3_store, "SELECT count(*) FROM labels")
    assert "t1/wq/1" in left.output  # left out, and named
    out = cli("run", "--store", s3_store, "--teachers", teachers).output
    assert "re-scored 1 invalid label part(s): t1/wq/1" in out.replace("\n", " ")
    assert _label_bytes(s3_store) == good
    assert "OK" in cli("verify", "--store", s3_store).output


def _start(store: str, teachers: Path, lease: float) -> subprocess.Popen:
    cmd = [str(BIN / "tmkd-label"), "run", "--store", store, "--teachers", str(teachers), "--lease", str(lease)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_three_workers_on_a_bucket_score_every_unit_once(tmp_path, bucket_store, shared_data, tiny_teachers):
    from tiny import read_lines

    s3_store = bucket_store
    source = tmp_path / "wikiqa.tsv"
    source.write_text("".join(read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 401)), newline="")
    teachers = write_teachers(tmp_path / "t.toml", {k: tiny_teachers[k] for k in ("t1", "t2")})
    local = tmp_path / "local"
    for store in (local, s3_store):
        cli("ingest", source, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 40)
    cli("run", "--store", local, "--teachers", teachers)

    logs = run_workers(s3_store, teachers, 3, lease=30)
    scored = [tuple(u) for log in logs for u in log["scored"]]
    assert len(scored) == len(set(scored)) == 20  # 10 parts x 2 teachers, each by exactly one worker
    assert sum(log["units_lost"] for log in logs) == 0
    assert _label_bytes(s3_store) == _label_bytes(local)
    assert not Store(s3_store).root.glob("claims/*/*/*.claim")  # every claim released


def test_kill_9_during_a_run_on_s3_then_rerun_completes_it(tmp_path, s3_store, shared_data, tiny_tokenizer):
    from tiny import build_bert, read_lines

    source = tmp_path / "wikiqa.tsv"
    source.write_text("".join(read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 1201)), newline="")
    big = {f"b{s}": build_bert(tmp_path / f"b{s}", tiny_tokenizer, seed=s, layers=4, hidden=128) for s in (1, 2)}
    teachers = write_teachers(tmp_path / "t.toml", big, max_length=128)
    local = tmp_path / "local"
    for store in (local, s3_store):
        cli("ingest", source, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 100)
    total = 2 * len(Store(s3_store).corpus("wq").parts)

    done = kill_once_scoring(_start(s3_store, teachers, lease=60), s3_store)
    assert 0 < done < total, f"the kill should land mid-run ({done}/{total} parts done)"
    assert cli("verify", "--store", s3_store, ok=False).exit_code == 1  # incomplete, and says so

    # the dead worker's claims are on this host: taken over at once, not after the 60 s lease
    started = time.time()
    cli("run", "--store", s3_store, "--teachers", teachers, "--lease", "60")
    assert time.time() - started < 60
    assert "OK" in cli("verify", "--store", s3_store).output
    cli("run", "--store", local, "--teachers", teachers)
    assert _label_bytes(s3_store) == _label_bytes(local)


def test_the_student_trains_from_s3_to_the_same_weights_as_from_disk(tmp_path, s3_store, encoder):
    """The trainer streams corpus and label parts from the bucket: same rows, same order, same weights."""
    import toy
    from safetensors.numpy import load_file

    from tmkd.student.config import config_from_dict
    from tmkd.student.train import run

    stages = [{"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 16, "lr": 5e-3, "gold": False},
              {"name": "stage2", "corpora": ["train"], "epochs": 1, "batch_size": 16, "lr": 5e-3}]
    weights = {}
    for name, store in (("local", tmp_path / "store"), ("s3", s3_store)):
        toy.build_store(store, teachers=("t1", "t2"))
        raw = toy.config(store, encoder, tmp_path / f"out-{name}", stages=stages)
        raw["eval"]["positive_label"] = "pos"
        raw["train"]["checkpoint_every"] = 4
        run(config_from_dict(raw))
        weights[name] = load_file(tmp_path / f"out-{name}" / "model.safetensors")
        record = json.loads((tmp_path / f"out-{name}" / "run.json").read_text())
        assert record["status"] == "done" and record["config"]["store"] == str(store)
    assert weights["s3"].keys() == weights["local"].keys()
    assert all((weights["s3"][k] == weights["local"][k]).all() for k in weights["local"])


@pytest.mark.parametrize("where, says", [
    ("s3:/typo", "looks like a URI with a slash missing"), ("file://otherhost/x", "not host 'otherhost'"),
    ("s3://Bad_Bucket/x", "is not a bucket name"), ("s3://tmkd-ok/../x", "'..' are not allowed")])
def test_uri_typos_are_refused_and_nothing_is_written(tmp_path, monkeypatch, where, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.tsv").write_text("QuestionID\tQuestion\n")
    result = cli("ingest", "x.tsv", "--format", "wikiqa", "--corpus", "c", "--store", where, ok=False)
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tsv"]


@pytest.mark.parametrize("uri, shown", [
    ("s3://AKIAEXAMPLE:hunter2secret@tmkd-bucket/store", "s3://***@tmkd-bucket/store"),
    # AWS's own example secret holds '/': the authority does not end at the first '/'
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYhunter2secret@tmkd-bucket/store", "s3://***@tmkd-bucket/store"),
    ("s3://AKIAEXAMPLE:hunter2s@cret@tmkd-bucket/store", "s3://***@tmkd-bucket/store"),  # and '@'
    ("gs://AKIAEXAMPLE:hunter2secret/store", "gs://***:"),  # no @ at all: nothing after the scheme is shown
    ("s3://AKIAEXAMPLE@tmkd-bucket/store", "s3://***@tmkd-bucket/store"),
])
def test_credentials_in_a_store_uri_are_refused_and_never_echoed(tmp_path, uri, shown):
    for command in (["status"], ["verify"], ["query", "select 1"]):
        result = cli(*command, "--store", uri, ok=False)
        out = " ".join(result.output.split())
        assert result.exit_code == 1 and "credentials in a store URI are refused" in out, out
        assert "hunter2" not in out and "AKIAEXAMPLE" not in out and "wJalr" not in out, out
        assert shown in out, out


@pytest.mark.parametrize("uri", [
    "az://acct:se/hunter2sEcReT@container/p",         # a scheme tmkd does not take: "unsupported", the URI redacted
    "s3:/AKIAEXAMPLE:hunter2sEcReT@tmkd-bucket/p",     # a slash missing: the typo message, redacted
    "file://user:pa/hunter2sEcReT@host/p",             # file:// naming a host
    "s3://AK/IA:hunter2sEcReT@tmkd-bucket/p",          # a key id holding '/': taken for bucket 'ak'... and refused
])
def test_no_message_shows_a_secret_whatever_error_the_uri_meets(uri):
    result = cli("status", "--store", uri, ok=False)
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in out, out
    assert "hunter2" not in out and "AKIAEXAMPLE" not in out and "***@" in out, out


def test_a_host_and_port_in_a_store_uri_points_to_the_endpoint_setting():
    out = " ".join(cli("status", "--store", "s3://localhost:9000/bucket/x", ok=False).output.split())
    assert "AWS_ENDPOINT_URL" in out and "not a bucket name" in out, out


def test_the_trainer_never_prints_a_secret_given_by_set(tmp_path, capsys):
    """A --set is echoed in config errors: its credentials are not, whatever the error."""
    from tmkd.student.train import main

    config = tmp_path / "s.toml"
    config.write_text('output = "/tmp/o"\n')
    secret = "s3://AKIAEXAMPLE:wJal/hunter2sEcReT@tmkd-bucket/p"
    for sets in (["--set", f"store={secret}"], ["--set", f"stor={secret}"]):  # invalid config; a mistyped key
        assert main(["--config", str(config), *sets]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "hunter2" not in err and "AKIAEXAMPLE" not in err, err
        assert "s3://***@tmkd-bucket/p" in err, err


def test_object_store_failures_are_one_line_errors(s3_endpoint, tmp_path):
    result = cli("status", "--store", "s3://tmkd-no-such-bucket/store", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()  # the request that failed, named: one line
    assert len(lines) == 1 and lines[0].startswith("error: s3://tmkd-no-such-bucket/store/store.json: LIST failed: ")


def test_odd_keys_in_the_bucket_are_named_by_verify_and_break_nothing(tmp_path, s3_store, wikiqa_sample,
                                                                      tiny_teachers):
    import boto3

    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", s3_store, "--corpus", "wq", "--part-rows", 60)
    cli("run", "--store", s3_store, "--teachers", teachers)
    bucket = s3_store.split("/")[2]
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="store/", Body=b"")  # a console's folder marker
    s3.put_object(Bucket=bucket, Key="store/labels/t1//stray", Body=b"x")  # an empty path segment
    result = cli("verify", "--store", s3_store, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "store/labels/t1//stray: stray file" in result.output.replace("\n", "")
    assert "nothing to score" in cli("run", "--store", s3_store, "--teachers", teachers).output
    assert "120" in cli("query", "--store", s3_store, "SELECT count(*) FROM labels").output
    # a prefix that starts with a dot is a prefix like any other (its records stay inside it)
    dotted = s3_store.replace("/store", "/.store")
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", dotted, "--corpus", "wq", "--part-rows", 60)
    cli("run", "--store", dotted, "--teachers", teachers)
    assert "OK" in cli("verify", "--store", dotted).output
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="store/labels/")["Contents"]]
    assert len([k for k in keys if k.endswith(".commit.json")]) == 2  # its own two, none of .store's


def test_a_lease_shorter_than_the_object_clock_is_refused(tmp_path, s3_store, wikiqa_sample, tiny_teachers):
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", s3_store, "--corpus", "wq", "--part-rows", 60)
    result = cli("run", "--store", s3_store, "--teachers", teachers, "--lease", "0.5", ok=False)
    assert result.exit_code == 1 and "must be at least 5 s" in result.output
    assert not Store(s3_store).teachers()  # refused before anything was written


def test_teachers_fine_tune_from_s3_to_the_same_weights_as_from_disk(tmp_path, s3_store, toy_store, tiny_teachers):
    """tmkd-finetune reads its corpora from the bucket: the same teachers as from the local store."""
    from test_finetune import LABELS, run_script, toy_rows, write_config

    s3 = Store.create(s3_store)
    for corpus, questions, seed in (("toy-train", 80, 1), ("toy-dev", 25, 2)):
        part = s3.write_corpus_part(corpus, 0, toy_rows(questions, seed, 100_000 * seed))
        s3.commit_corpus_parts(corpus, LABELS, [part], {"file": "toy", "format": "test"})
    for name, store in (("local", toy_store), ("s3", s3_store)):
        cfg = write_config(tmp_path / f"{name}.toml", store, tiny_teachers["t1"], tmp_path / name)
        proc = run_script("--config", str(cfg), "--set", "epochs=1")
        assert proc.returncode == 0, proc.stderr
    for teacher in ("tiny-list", "tiny-point"):
        local, s3_made = (tmp_path / k / teacher / "model.safetensors" for k in ("local", "s3"))
        assert local.read_bytes() == s3_made.read_bytes()


def test_a_late_second_commit_never_touches_the_committed_bytes(tmp_path, bucket_store, wikiqa_sample, tiny_teachers,
                                                                monkeypatch):
    """Each commit's data has a key of its own, and the record is a conditional create: a writer that looked
    before another committed (a stalled worker past its lease) is refused, and its data removed."""
    import numpy as np

    from tmkd.data.store import CommitRaceError

    s3_store = bucket_store
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", s3_store, "--corpus", "wq", "--part-rows", 60)
    cli("run", "--store", s3_store, "--teachers", teachers)
    st = Store(s3_store)
    rec, part = st.teacher("t1"), st.corpus("wq").parts[1]
    good = _label_bytes(s3_store)
    with monkeypatch.context() as m:  # it read the commit record before the other worker created it
        m.setattr(ObjectPath, "read_tagged", lambda self: (_ for _ in ()).throw(FileNotFoundError(str(self))))
        with pytest.raises(CommitRaceError):
            st.write_label_part(rec, part, np.arange(part.rows), np.zeros((part.rows, 2), np.float32))
    assert _label_bytes(s3_store) == good
    assert len([f for f in st.label_files() if f.name.startswith("part-00001")]) == 1  # its data was removed
    assert "OK" in cli("verify", "--store", s3_store).output

    # what a writer killed between its data and its record leaves: named by verify, removed by the next run
    extra = st.label_path("t1", "wq", 1).with_name("part-00001.00000000deadbeef.parquet")
    extra.put(b"left by a killed writer")
    out = cli("verify", "--store", s3_store).output
    assert "OK" in out and "part-00001.00000000deadbeef.parquet: a data object no commit record names" in \
        out.replace("\n", "")
    cli("run", "--store", s3_store, "--teachers", teachers)
    assert not extra.is_file() and _label_bytes(s3_store) == good

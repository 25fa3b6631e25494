"""One config system for every job: the same --set syntax, the same type-error message, TOML written by tomli-w.

The three jobs read their files through tmkd.teachers.config: teachers.toml
(tmkd.teachers.spec.load_teachers_toml), training (tmkd.student.config.load_config) and
fine-tuning (tmkd.teachers.finetune.load_config).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import toy
from tmkd.student.config import ConfigError, TrainConfig, load_config as load_train
from tmkd.teachers import config as c
from tmkd.teachers.finetune import FinetuneError, load_config as load_finetune, write_teachers_toml
from tmkd.teachers.spec import TeacherError, load_teachers_toml

TEACHERS = '[[teacher]]\nname = "a"\npath = "x"\n\n[[teacher]]\nname = "b"\npath = "y"\n'
TRAIN = '''store = "S"
output = "O"
teachers = ["t1"]
[student]
encoder = "E"
[[stages]]
corpora = ["unlabeled"]
[[stages]]
corpora = ["train"]
'''
FINETUNE = '''encoder = "E"
store = "S"
train_corpus = "train"
dev_corpus = "dev"
out = "O"
[[teacher]]
name = "a"
[[teacher]]
name = "b"
'''


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("teachers", TEACHERS), ("train", TRAIN), ("finetune", FINETUNE)):
        paths[name] = tmp_path / f"{name}.toml"
        paths[name].write_text(text)
    return paths


def error_of(load, *args) -> str:
    with pytest.raises((TeacherError, ConfigError, FinetuneError)) as e:
        load(*args)
    return str(e.value)


# ---- the same --set syntax ---------------------------------------------------------------------
def test_the_same_set_syntax_reaches_a_list_item_in_every_job(files):
    teachers = load_teachers_toml(files["teachers"], ["teacher.1.max_length=64", "teacher.0.dtype=bfloat16"])
    assert [t.max_length for t in teachers] == [128, 64] and teachers[0].dtype == "bfloat16"

    train = load_train(files["train"], ["stages.1.lr=3e-5", "stages.1.loss.soft=kl", "eval.batch_size=8"])
    assert train.stages[1].lr == 3e-5 and train.stages[1].loss.soft == "kl" and train.eval.batch_size == 8

    finetune = load_finetune(files["finetune"], sets=["teacher.1.lr=3e-5", "max_length=64", "defaults.epochs=2"])
    assert [t.lr for t in finetune.teacher] == [3e-5, 3e-5] and finetune.teacher[1].lr == 3e-5
    assert finetune.max_length == 64 and [t.epochs for t in finetune.teacher] == [2, 2]


def test_set_values_are_toml_else_text_and_a_string_field_takes_the_text(files):
    # TOML values: lists, inline tables, booleans; bare words are strings
    teachers = load_teachers_toml(files["teachers"], ['teacher.0.labels=["n", "p"]', "teacher.0.compile=true",
                                                      "teacher.0.corpora=train"])
    assert teachers[0].labels == ["n", "p"] and teachers[0].compile is True and teachers[0].corpora == ["train"]
    train = load_train(files["train"], ['stages.0.loss={soft = "kl", temperature = 2}', "eval.positive_label=1"])
    assert train.stages[0].loss.soft == "kl" and train.stages[0].loss.temperature == 2.0
    assert train.eval.positive_label == "1"  # a string field: the text, not the integer 1
    finetune = load_finetune(files["finetune"], sets=["positive_label=1", "a.seed=7", "lr=1"])
    assert finetune.positive_label == "1" and finetune.teacher[0].seed == 7
    assert [t.lr for t in finetune.teacher] == [1.0, 1.0] and isinstance(finetune.teacher[0].lr, float)


def test_a_bad_set_is_refused_alike(files):
    for load, error in ((lambda s: load_teachers_toml(files["teachers"], [s]), TeacherError),
                        (lambda s: load_train(files["train"], [s]), ConfigError),
                        (lambda s: load_finetune(files["finetune"], sets=[s]), FinetuneError)):
        with pytest.raises(error, match=r"^--set nokey: expected KEY=VALUE"):
            load("nokey")
    assert error_of(load_teachers_toml, files["teachers"], ["teacher.5.max_length=64"]) == \
        "--set teacher.5.max_length=64: teacher has no item '5' (it has 2, counted from 0)"
    assert error_of(load_train, files["train"], ["stages.5.lr=1"]) == \
        "--set stages.5.lr=1: stages has no item '5' (it has 2, counted from 0)"
    assert error_of(load_finetune, files["finetune"], None, ["teacher.5.lr=1"]) == \
        "--set teacher.5.lr=1: teacher has no item '5' (it has 2, counted from 0)"


# ---- the same type-error message ---------------------------------------------------------------
def test_type_errors_name_the_file_or_set_the_dotted_field_and_the_type_in_every_job(files):
    t, tr, ft = files["teachers"], files["train"], files["finetune"]
    # from the file
    t.write_text(TEACHERS + 'max_length = "128"\n')
    assert error_of(load_teachers_toml, t) == f'{t}: teacher.1.max_length: expected an integer, got "128" (a string)'
    tr.write_text(TRAIN + 'epochs = "2"\n')
    assert error_of(load_train, tr) == f'{tr}: stages.1.epochs: expected an integer, got "2" (a string)'
    ft.write_text(FINETUNE + 'epochs = "2"\n')
    assert error_of(load_finetune, ft) == f'{ft}: teacher.1.epochs: expected an integer, got "2" (a string)'
    for p, text in ((t, TEACHERS), (tr, TRAIN), (ft, FINETUNE)):
        p.write_text(text)
    # from a --set: the --set is named, the field is the same dotted path
    assert error_of(load_teachers_toml, t, ["teacher.1.max_length=1.5"]) == \
        "--set teacher.1.max_length=1.5: teacher.1.max_length: expected an integer, got 1.5 (a float)"
    assert error_of(load_train, tr, ["stages.1.epochs=1.5"]) == \
        "--set stages.1.epochs=1.5: stages.1.epochs: expected an integer, got 1.5 (a float)"
    assert error_of(load_finetune, ft, None, ["teacher.1.epochs=1.5"]) == \
        "--set teacher.1.epochs=1.5: teacher.1.epochs: expected an integer, got 1.5 (a float)"
    # the shorthands of fine-tuning go through the same parser and name the same field
    assert error_of(load_finetune, ft, None, ["b.epochs=1.5"]) == \
        "--set b.epochs=1.5: teacher.1.epochs: expected an integer, got 1.5 (a float)"
    # booleans, lists, tables: the same words everywhere
    assert error_of(load_teachers_toml, t, ["teacher.0.compile=1"]) == \
        "--set teacher.0.compile=1: teacher.0.compile: expected true or false, got 1 (an integer)"
    assert error_of(load_train, tr, ["stages.0.gold=1"]) == \
        "--set stages.0.gold=1: stages.0.gold: expected true or false, got 1 (an integer)"
    assert error_of(load_finetune, ft, None, ["bf16=1"]) == \
        "--set bf16=1: bf16: expected true or false, got 1 (an integer)"
    assert error_of(load_teachers_toml, t, ["teacher.0.labels=[1]"]) == \
        "--set teacher.0.labels=[1]: teacher.0.labels.0: expected a string, got 1 (an integer)"
    assert error_of(load_train, tr, ["stages.0.corpora=[1]"]) == \
        "--set stages.0.corpora=[1]: stages.0.corpora.0: expected a string, got 1 (an integer)"
    assert error_of(load_train, tr, ["stages.0.loss=3"]) == \
        "--set stages.0.loss=3: stages.0.loss: expected a table, got 3 (an integer)"
    # an integer too large for a float is a typed error too, not an OverflowError
    huge = "1" + "0" * 400
    assert error_of(load_train, tr, [f"stages.0.lr={huge}"]) == \
        f"--set stages.0.lr={huge}: stages.0.lr = {huge} is too large for a floating-point number"
    assert error_of(load_finetune, ft, None, [f"teacher.0.lr={huge}"]) == \
        f"--set teacher.0.lr={huge}: teacher.0.lr = {huge} is too large for a floating-point number"


def test_unknown_keys_are_named_alike(files):
    t, tr, ft = files["teachers"], files["train"], files["finetune"]
    assert error_of(load_teachers_toml, t, ["teacher.0.max_len=64"]).startswith(
        "--set teacher.0.max_len=64: unknown key(s) teacher.0.max_len; teacher.0 takes: name, path, max_length,")
    assert error_of(load_train, tr, ["stages.0.lrr=1"]).startswith(
        "--set stages.0.lrr=1: unknown key(s) stages.0.lrr; stages.0 takes: corpora, name, epochs,")
    assert error_of(load_finetune, ft, None, ["teacher.0.lrr=1"]).startswith(
        "--set teacher.0.lrr=1: unknown key(s) teacher.0.lrr; teacher.0 takes: name, seed, lr,")
    t.write_text(TEACHERS + "colour = 1\n")
    assert error_of(load_teachers_toml, t).startswith(f"{t}: unknown key(s) teacher.1.colour; teacher.1 takes:")
    t.write_text("version = 2\n" + TEACHERS)
    assert error_of(load_teachers_toml, t) == f"{t}: unknown key(s) version; the top level takes: teacher"
    ft.write_text("bogus = 1\n" + FINETUNE)
    assert error_of(load_finetune, ft).startswith(f"{ft}: unknown key(s) bogus; the top level takes: encoder,")


def test_bad_toml_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[teacher]\nname = ")
    for load in (load_teachers_toml, load_train, load_finetune):
        assert error_of(load, bad).startswith(f"{bad}: not valid TOML: ")
    missing = tmp_path / "missing.toml"
    assert error_of(load_train, missing) == f"{missing}: config file not found"
    assert error_of(load_finetune, missing) == f"{missing}: config file not found"
    assert error_of(load_teachers_toml, missing) == f"{missing}: teachers file not found"


# ---- the shared module on its own --------------------------------------------------------------
@dataclass
class Inner:
    x: float = 0.0
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    n: int | None = None
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


def test_from_dict_builds_nested_dataclasses_and_names_problems():
    raw = {"name": "a", "inner": {"x": 1, "tags": "t"}, "items": [{"x": 2.5}], "weights": {"k": 3}}
    out = c.from_dict(Outer, raw, source="f.toml")
    assert out == Outer("a", None, Inner(1.0, ["t"]), [Inner(2.5)], {"k": 3.0})
    assert isinstance(out.inner.x, float)
    with pytest.raises(ValueError, match=r"^f.toml: missing key\(s\) name$"):
        c.from_dict(Outer, {}, source="f.toml")
    with pytest.raises(ValueError, match=r'^f.toml: weights.k: expected a number, got "heavy" \(a string\)$'):
        c.from_dict(Outer, {"name": "a", "weights": {"k": "heavy"}}, source="f.toml")
    with pytest.raises(ValueError, match=r"^f.toml: n: expected an integer, got true \(a boolean\)$"):
        c.from_dict(Outer, {"name": "a", "n": True}, source="f.toml")
    raw = {"name": "a", "items": [{"x": 1}]}
    c.apply_sets(raw, ["items.0.x=oops"], ValueError)
    with pytest.raises(ValueError, match=r'^--set items.0.x=oops: items.0.x: expected a number, got "oops"'):
        c.from_dict(Outer, raw, source="f.toml")
    raw = {"name": "a"}
    c.apply_sets(raw, ["inner.tags=[1]"], ValueError)  # creates the missing table
    with pytest.raises(ValueError, match=r"^--set inner.tags=\[1\]: inner.tags.0: expected a string"):
        c.from_dict(Outer, raw, source="f.toml")
    raw = {"name": 1}
    with pytest.raises(ValueError, match=r"^--set name.x=1: name is 1 \(an integer\), not a table$"):
        c.apply_sets(raw, ["name.x=1"], ValueError)


def test_parse_set_and_parse_value():
    assert c.parse_value("5e-5") == 5e-5 and c.parse_value("true") is True and c.parse_value("[1, 2]") == [1, 2]
    assert c.parse_value("hello world") == "hello world" and c.parse_value('"quoted"') == "quoted"
    key, given = c.parse_set(" stages.0.lr = 3e-5 ", ValueError)
    assert key == "stages.0.lr" and given.value == 3e-5 and given.text == "3e-5"
    assert c.parse_set("a=b=c", ValueError)[1].value == "b=c"
    for bad in ("a", "=1", "a..b=1"):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            c.parse_set(bad, ValueError)


# ---- writing TOML (tomli-w) ----------------------------------------------------------------------
def test_written_toml_round_trips(tmp_path):
    tricky = 'a "quoted" \\ back\\slash\nnewline, ünïcode, [brackets] = # not a comment'
    raw = toy.config(tmp_path / "store", tmp_path / "enc", tmp_path / "out", teacher_weights={"t1": 3.0, "t2": 1.0},
                     stages=[{"name": tricky, "corpora": ["train"], "lr": 1e-3, "loss": {"soft": "kl"}},
                             {"corpora": ["unlabeled"], "gold": False}])
    text = toy.to_toml(raw)
    assert tomllib.loads(text) == raw
    path = tmp_path / "s.toml"
    path.write_text(text)
    cfg = load_train(path)
    assert isinstance(cfg, TrainConfig) and cfg.stages[0].name == tricky and cfg.teacher_weights == {"t1": 3.0,
                                                                                                     "t2": 1.0}
    # a dataclass is written as its tables; None (TOML has no null) is left out and reads back as the default
    again = c.dumps(cfg)
    assert load_train(_write(tmp_path / "again.toml", again)).to_dict() == cfg.to_dict()
    assert "positive_label" not in again


def test_finetune_writes_a_teachers_toml_that_loads(tmp_path):
    (tmp_path / "out").mkdir()
    path = tmp_path / "ft.toml"
    path.write_text(FINETUNE.replace('"O"', f'"{tmp_path / "out"}"').replace('name = "b"', 'name = "b.v2"'))
    cfg = load_finetune(path, sets=["bf16=false"])
    names = ['no "way"', "yes\\maybe"]
    written = write_teachers_toml(cfg, cfg.teacher, names)
    assert written.read_text().startswith("# Written by teachers/finetune.py")
    assert tomllib.loads(written.read_text())["teacher"][1] == {
        "name": "b.v2", "path": "b.v2", "max_length": 128, "dtype": "float32", "labels": names}
    specs = load_teachers_toml(written)
    assert [s.name for s in specs] == ["a", "b.v2"] and specs[0].labels == names and specs[0].dtype == "float32"


def _write(path, text):
    path.write_text(text)
    return path


def test_tmkd_label_run_takes_the_same_set_syntax(tmp_path, wikiqa_sample, tiny_teachers):
    """`tmkd-label run --set` overrides teachers.toml as `--set` does in training and fine-tuning."""
    from test_label import cli, write_teachers

    from tmkd.data.store import Store

    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq")
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    res = cli("run", "--store", store, "--teachers", teachers, "--set", "teacher.0.max_length=abc", ok=False)
    assert res.exit_code == 1 and "--set teacher.0.max_length=abc: teacher.0.max_length: expected an integer" in res.output
    cli("run", "--store", store, "--teachers", teachers, "--set", "teacher.0.max_length=32")
    assert Store(store).teacher("t1").max_length == 32


def test_every_shipped_config_loads_and_checks():
    """The configs the benches and the README run (bench/configs, student/configs, teachers/configs) load through
    the same typed loaders the jobs use: a misspelt key or a bad value in one fails here, not hours into a bench.
    The benches fill in store, output, encoder and teachers with --set, as here."""
    root = Path(__file__).resolve().parents[1]
    paths = [p for d in ("bench/configs", "student/configs", "teachers/configs") for p in sorted((root / d).glob("*.toml"))]
    teachers = [p for p in paths if "teacher" in tomllib.loads(p.read_text())]  # fine-tuning: [[teacher]] tables
    students = [p for p in paths if p not in teachers]
    assert len(students) >= 10 and len(teachers) >= 4
    for path in students:
        cfg = load_train(path, ['store="S"', 'output="O"', 'student.encoder="E"', 'teachers=["t1", "t2"]'])
        assert cfg.stages and all(s.corpora for s in cfg.stages), path
    for path in teachers:
        cfg = load_finetune(path)
        assert cfg.teacher and cfg.train_corpus, path


def test_a_config_saved_with_a_byte_order_mark_reads_as_without_one(files):
    """Windows editors save UTF-8 with a BOM; every job reads the file as if it had none, as ingest reads data."""
    plain = (load_teachers_toml(files["teachers"]), load_train(files["train"]), load_finetune(files["finetune"]))
    for name in ("teachers", "train", "finetune"):
        files[name].write_bytes(b"\xef\xbb\xbf" + files[name].read_bytes())
    assert (load_teachers_toml(files["teachers"]), load_train(files["train"]), load_finetune(files["finetune"])) \
        == plain
    files["train"].write_bytes(b"\xef\xbb\xbfa = 1\n\xff\n")  # a bad byte is counted from the file's start
    assert error_of(load_train, files["train"]) == f"{files['train']}: not valid TOML: not UTF-8 text " \
                                                  "(invalid start byte at byte 9)"

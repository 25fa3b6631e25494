"""Bad input is refused with a message naming its cause (file, column or field, type), and nothing is written.

Parquet columns of the wrong type, UTF-16 text files, mistyped teachers.toml and fine-tuning
configs, truncated teacher weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmkd.data.store import Store
from tmkd.teachers.spec import TeacherError, TeacherSpec, check_weights, load_teachers_toml

from test_label import cli  # noqa: E402  (the one helper that runs tmkd-label in-process)


def one_line(result) -> str:
    """The output of a refused command, with line wrapping undone; checks it was a clean exit 1 (no exception)."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- Parquet columns of the wrong type --------------------------------------------------------------

GOOD = {"text_a": ["q1", "q2"], "text_b": ["s1", "s2"], "label": [0, 1], "group": ["g1", "g2"], "id": ["a", "b"]}


@pytest.mark.parametrize("field, column, arrow_type, expected", [
    ("text_a", pa.array([1, 2], pa.int64()), "int64", "expected string"),
    ("text_b", pa.array([1.5, 2.5]), "double", "expected string"),
    ("label", pa.array([[0], [1]]), "list<element: int64>", "expected string, integer or boolean"),
    ("group", pa.array([True, False]), "bool", "expected string or number"),
    ("id", pa.array([{"x": 1}, {"x": 2}]), "struct<x: int64>", "expected string or integer"),
])
def test_a_parquet_column_of_the_wrong_type_is_refused_and_nothing_committed(tmp_path, field, column, arrow_type,
                                                                             expected):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(pa.table(GOOD), good)
    pq.write_table(pa.table({**GOOD, field: column}), bad)
    store = tmp_path / "store"
    # The good file first: its part is written before the bad file is opened, and must not survive.
    result = cli("ingest", good, bad, "--format", "parquet", "--store", store, "--corpus", "c",
                 "--label-names", "n,y", "--part-rows", 1, ok=False)
    msg = one_line(result)
    assert f"{bad}: column '{field}' (field {field}) has type {arrow_type}; {expected}" in msg
    assert not Store(store).has_corpus("c")
    assert not list(store.rglob("*.parquet"))


def test_parquet_columns_of_every_accepted_type_ingest(tmp_path):
    table = pa.table({
        "text_a": pa.array(["q1", "q2"], pa.large_string()),
        "text_b": pa.array(["s1", "s2"]).dictionary_encode(),
        "label": pa.array([True, False]),
        "group": pa.array([1.0, None]),  # pandas' int column with a null
        "id": pa.array([7, 8], pa.int32()),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    store = tmp_path / "store"
    cli("ingest", tmp_path / "t.parquet", "--format", "parquet", "--store", store, "--corpus", "c",
        "--label-names", "n,y")
    st = Store(store)
    got = [r for p in st.corpus("c").parts for r in st.read_corpus_part(p).to_pylist()]
    assert [(r["id"], r["text_b"], r["label"], r["group"]) for r in got] == [(7, "s1", 1, "1"), (8, "s2", 0, None)]


def test_a_file_that_is_not_parquet_is_a_clean_error(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("text_a,text_b\na,b\n")
    result = cli("ingest", path, "--format", "parquet", "--store", tmp_path / "s", "--corpus", "c", ok=False)
    assert f"{path}: not a readable Parquet file" in one_line(result)


def _not_utf8(tmp_path: Path, fmt: str) -> Path:
    """Two rows, the second's text_a starting with the bytes ff fe (not UTF-8)."""
    if fmt == "jsonl":
        path = tmp_path / "x.jsonl"
        path.write_bytes(b'{"text_a": "good", "text_b": "b", "label": "0"}\n'
                         b'{"text_a": "\xff\xfe bad", "text_b": "b", "label": "1"}\n')
        return path
    values = b"good" + b"\xff\xfe bad"  # a string column written without validation, as a buggy exporter might
    offsets = pa.array([0, 4, len(values)], pa.int32()).buffers()[1]
    text_a = pa.StringArray.from_buffers(2, offsets, pa.py_buffer(values))
    if fmt == "parquet-dictionary":
        text_a = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), text_a)
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text_a": text_a, "text_b": ["b", "b"], "label": ["0", "1"]}), path)
    return path


@pytest.mark.parametrize("fmt, where", [("jsonl", "line 2"), ("parquet", "row 1"), ("parquet-dictionary", "row 1")])
def test_text_that_is_not_utf8_is_named_or_quarantined_never_a_traceback(tmp_path, fmt, where):
    path = _not_utf8(tmp_path, fmt)
    fmt = fmt.split("-")[0]
    store = tmp_path / "store"
    result = cli("ingest", path, "--format", fmt, "--store", store, "--corpus", "strict", "--label-names", "0,1",
                 "--strict", ok=False)
    assert f"{path}, {where}, field 'text_a': undecodable bytes" in one_line(result)
    assert not Store(store).has_corpus("strict")
    result = cli("ingest", path, "--format", fmt, "--store", store, "--corpus", "c", "--label-names", "0,1")
    assert "undecodable bytes" in result.output and "Traceback" not in result.output
    st = Store(store)
    assert st.corpus("c").rows == 1  # the good row kept, the bad one counted and quarantined
    assert [r["text_a"] for p in st.corpus("c").parts for r in st.read_corpus_part(p).to_pylist()] == ["good"]
    bad = [json.loads(line) for line in next((store / "quarantine" / "c").glob("*.jsonl")).read_text().splitlines()]
    assert [(b["field"], b["reason"]) for b in bad] == [("text_a", "undecodable bytes")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json-samples"])
def test_a_utf16_file_is_refused_by_name(tmp_path, fmt):
    text = {"csv": "text_a,text_b,label\na,b,0\n", "jsonl": '{"text_a": "a", "text_b": "b", "label": 0}\n',
            "json-samples": '{"1": {"text_a": "a", "text_b": "b", "label": 0}}'}[fmt]
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(text.encode("utf-16"))  # with its BOM, as Windows writes "Unicode text"
    store = tmp_path / "store"
    result = cli("ingest", path, "--format", fmt, "--store", store, "--corpus", "c", "--label-names", "0,1", ok=False)
    assert f"{path}: the file is UTF-16" in one_line(result) and "save it as UTF-8" in one_line(result)
    assert not Store(store).has_corpus("c")


def test_a_header_naming_a_mapped_column_twice_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text_a,text_b,label,label\nq,s,0,1\n")
    result = cli("ingest", path, "--format", "csv", "--store", tmp_path / "s", "--corpus", "c", "--label-names", "0,1",
                 ok=False)
    assert f"{path}: column(s) label appear more than once in the header" in one_line(result)


# ---- teachers.toml: wrong types name the file, the teacher, the field and the type -------------------------


@pytest.mark.parametrize("line, message", [
    ('max_length = "128"', """max_length: expected an integer, got "128" (a string)"""),
    ("batch_tokens = 1.5", "batch_tokens: expected an integer, got 1.5 (a float)"),
    ('corpora = 3', """corpora: expected a list of strings, got 3 (an integer)"""),
    ("labels = [1, 2]", "labels.0: expected a string, got 1 (an integer)"),
    ("compile = 1", "compile: expected true or false, got 1 (an integer)"),
    ('dtype = 16', "dtype: expected a string, got 16 (an integer)"),
])
def test_teachers_toml_type_errors_name_file_teacher_field_and_type(tmp_path, line, message):
    path = tmp_path / "teachers.toml"
    path.write_text(f'[[teacher]]\nname = "a"\npath = "x"\n\n[[teacher]]\nname = "minilm-a"\npath = "y"\n{line}\n')
    with pytest.raises(TeacherError) as e:
        load_teachers_toml(path)
    assert str(e.value) == f"{path}: teacher.1.{message}"


def test_teachers_toml_value_errors_name_the_file(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text('[[teacher]]\nname = "a"\npath = "x"\ndtype = "int8"\n')
    with pytest.raises(TeacherError, match=rf"^{path}: teacher 'a': dtype 'int8' is not one of"):
        load_teachers_toml(path)
    path.write_text('[[teacher]]\nname = "a b"\npath = "x"\n')
    with pytest.raises(TeacherError, match=rf"^{path}: teacher.0.name: invalid teacher name"):
        load_teachers_toml(path)


def tiny_store(tmp_path: Path) -> Path:
    path = tmp_path / "c.csv"
    path.write_text("text_a,text_b,label\nwhat is a cat,a cat is an animal,1\nwhere is paris,paris is in france,0\n")
    store = tmp_path / "store"
    cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c", "--label-names", "LABEL_0,LABEL_1")
    return store


def test_run_reports_a_teachers_toml_type_error_in_one_line(tmp_path):
    store = tiny_store(tmp_path)
    teachers = tmp_path / "teachers.toml"
    teachers.write_text('[[teacher]]\nname = "minilm-a"\npath = "x"\nmax_length = "128"\n')
    result = cli("run", "--store", store, "--teachers", teachers, ok=False)
    assert f"{teachers}: teacher.0.max_length: expected an integer" in one_line(result)
    assert not (store / "teachers").exists()


# ---- the fine-tuning config -------------------------------------------------------------------------------

BASE = """encoder = "enc"
store = "st"
train_corpus = "a"
dev_corpus = "b"
out = "o"
"""


@pytest.mark.parametrize("text, sets, message", [
    ('max_length = "128"\n[[teacher]]\nname = "t"\n', [], """{path}: max_length: expected an integer, got "128" (a string)"""),
    ("bf16 = 1\n[[teacher]]\nname = \"t\"\n", [], "{path}: bf16: expected true or false, got 1 (an integer)"),
    ("[defaults]\nepochs = 1.5\n[[teacher]]\nname = \"t\"\n", [], "{path}: defaults.epochs: expected an integer, got 1.5 (a float)"),
    ('[[teacher]]\nname = "s"\n[[teacher]]\nname = "minilm-a"\nlr = "fast"\n', [],
     """{path}: teacher.1.lr: expected a number, got "fast" (a string)"""),
    ('[[teacher]]\nname = "t"\nlayers = [2]\n', [], "{path}: teacher.0.layers: expected an integer, got [2] (a list)"),
    ('[[teacher]]\nname = "t"\n', ["batch_size=many"], """--set batch_size=many: teacher.0.batch_size: expected an integer, got "many" (a string)"""),
    ('[[teacher]]\nname = "t"\n', ["t.seed=1.5"], "--set t.seed=1.5: teacher.0.seed: expected an integer, got 1.5 (a float)"),
    ('[[teacher]]\nname = "t"\n', ["teacher.0.seed=1.5"], "--set teacher.0.seed=1.5: teacher.0.seed: expected an integer, got 1.5 (a float)"),
    ('[[teacher]]\nname = "t"\n', ["defaults.epochs=two"], """--set defaults.epochs=two: defaults.epochs: expected an integer, got "two" (a string)"""),
    ('[[teacher]]\nname = "t"\nlr = -1.0\n', [], "{path}: teacher 't': lr must be > 0, not -1.0"),
])
def test_finetune_config_type_errors_name_file_field_and_type(tmp_path, text, sets, message):
    from tmkd.teachers import finetune as ft

    path = tmp_path / "train.toml"
    path.write_text(BASE + text)
    with pytest.raises(ft.FinetuneError) as e:
        ft.load_config(path, sets=sets)
    assert str(e.value) == message.format(path=path)


def test_finetune_set_takes_text_for_a_text_field_and_main_reports_one_line(tmp_path, capsys):
    from tmkd.teachers import finetune as ft

    path = tmp_path / "train.toml"
    path.write_text(BASE + '[[teacher]]\nname = "t"\n')
    cfg = ft.load_config(path, sets=["positive_label=1", "lr=1", "max_train_rows=100"])
    assert cfg.positive_label == "1" and cfg.teacher[0].lr == 1 and cfg.max_train_rows == 100

    path.write_text(BASE + 'threads = "2"\n[[teacher]]\nname = "t"\n')
    assert ft.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f'error: {path}: threads: expected an integer, got "2" (a string)\n'


# ---- truncated teacher weights -----------------------------------------------------------------------------


def copy_teacher(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_truncated_safetensors_is_refused_before_the_teacher_is_recorded(tmp_path, tiny_teachers):
    store = tiny_store(tmp_path)
    folder = copy_teacher(tiny_teachers["t1"], tmp_path / "broken")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    teachers = tmp_path / "teachers.toml"
    teachers.write_text(f'[[teacher]]\nname = "broken"\npath = "{folder}"\nmax_length = 32\n')
    before = files_of(store)

    result = cli("run", "--store", store, "--teachers", teachers, ok=False)
    msg = one_line(result)
    assert f"teacher 'broken': weight file {weights} is truncated: {len(data) // 2:,} bytes of the {len(data):,}" in msg
    assert not (store / "teachers" / "broken.json").exists()
    assert files_of(store) == before


def test_check_weights_judges_headers_and_sizes(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    spec = TeacherSpec(name="m", path=str(folder))
    save_file({"w": np.zeros((4, 4), np.float32), "b": np.ones(4, np.float32)}, str(folder / "model.safetensors"))
    check_weights(spec, folder)  # a whole file passes

    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for damaged, problem in [
        (data + b"\0", "is corrupt"),
        (data[:5], "is truncated: 5 bytes, too short"),
        (data[:40], "is truncated or not a safetensors file"),
        (b"\x04\0\0\0\0\0\0\0[1] ", "is not a safetensors file"),
    ]:
        weights.write_bytes(damaged)
        with pytest.raises(TeacherError, match=rf"^teacher 'm': weight file {weights} {problem}"):
            check_weights(spec, folder)

    weights.unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(TeacherError, match="lists shard.* missing from the folder: model-00001-of-00002.safetensors"):
        check_weights(spec, folder)
    (folder / "model.safetensors.index.json").unlink()

    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a zip cut short")
    with pytest.raises(TeacherError, match=r"pytorch_model.bin is truncated or corrupt"):
        check_weights(spec, folder)



@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_an_empty_input_is_an_error_not_an_empty_corpus(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    store = tmp_path / "store"
    result = cli("ingest", path, "--format", "jsonl", "--store", store, "--corpus", "c", "--label-names", "0,1", ok=False)
    assert f"{path}: no rows in the input; nothing was ingested" in one_line(result)
    assert not (store / "corpus" / "c").exists()


# ---- teachers.toml values that pass the types but cannot be scored: refused before anything is written -----


def run_refused(store: Path, teachers: Path, *sets: str) -> str:
    """`tmkd-label run` refused in one line (returned), the store left exactly as it was."""
    before = files_of(store)
    msg = one_line(cli("run", "--store", store, "--teachers", teachers,
                       *[a for s in sets for a in ("--set", s)], ok=False))
    assert files_of(store) == before
    return msg


@pytest.mark.parametrize("setting, message", [
    ("teacher.0.truncation=bogus", "--set teacher.0.truncation=bogus: teacher 't1': truncation 'bogus' is not one "
                                   "of longest_first, only_first, only_second"),
    ("teacher.0.truncation=do_not_truncate", "--set teacher.0.truncation=do_not_truncate: teacher 't1': truncation "
                                             "'do_not_truncate' is not one of"),
    ("teacher.0.max_length=512", "--set teacher.0.max_length=512: teacher 't1': max_length 512 is more than the "
                                 "128 tokens the model can position (max_position_embeddings = 128, in {config})"),
])
def test_a_setting_the_model_cannot_score_is_refused_before_the_teacher_is_recorded(tmp_path, tiny_teachers,
                                                                                    setting, message):
    from test_label import write_teachers

    store = tiny_store(tmp_path)
    teachers = write_teachers(tmp_path / "teachers.toml", {"t1": tiny_teachers["t1"]}, max_length=32)
    msg = run_refused(store, teachers, setting)
    assert message.format(config=tiny_teachers["t1"] / "config.json") in msg
    assert not (store / "teachers").exists()
    cli("run", "--store", store, "--teachers", teachers)  # the corrected run is not refused as a changed teacher


def test_a_bad_truncation_in_the_file_names_the_file(tmp_path, tiny_teachers):
    from test_label import write_teachers

    store = tiny_store(tmp_path)
    teachers = write_teachers(tmp_path / "teachers.toml", {"t1": tiny_teachers["t1"]}, max_length=32,
                              truncation="only_third")
    assert f"{teachers}: teacher 't1': truncation 'only_third' is not one of" in run_refused(store, teachers)


@pytest.mark.parametrize("line, sets, source", [
    ('corpora = ["c", "nope"]', [], "{teachers}"),
    ("", ['teacher.0.corpora=["nope"]'], '--set teacher.0.corpora=["nope"]'),
])
def test_a_teacher_naming_a_corpus_the_store_lacks_is_refused(tmp_path, tiny_teachers, line, sets, source):
    store = tiny_store(tmp_path)
    teachers = tmp_path / "teachers.toml"
    teachers.write_text(f'[[teacher]]\nname = "t1"\npath = "{tiny_teachers["t1"]}"\nmax_length = 32\n{line}\n')
    msg = run_refused(store, teachers, *sets)
    assert f"{source.format(teachers=teachers)}: teacher 't1': corpora: no corpus 'nope' in {store} " \
           "(corpora in the store: c)" in msg


@pytest.mark.parametrize("text, problem", [("{bad", "is not valid JSON"), ("[]", "is not a JSON object")])
def test_a_teacher_config_json_that_is_not_a_json_object_is_named(tmp_path, tiny_teachers, text, problem):
    store = tiny_store(tmp_path)
    folder = copy_teacher(tiny_teachers["t1"], tmp_path / "broken")
    (folder / "config.json").write_text(text)
    teachers = tmp_path / "teachers.toml"
    teachers.write_text(f'[[teacher]]\nname = "broken"\npath = "{folder}"\nmax_length = 32\n')
    assert f"teacher 'broken': {folder / 'config.json'} {problem}" in run_refused(store, teachers)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Hub access switched on (as for a user without HF_HUB_OFFLINE) over an empty cache; every name lookup or
    connection is recorded and refused."""
    import socket

    from huggingface_hub import constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_teacher_path_that_is_no_folder_is_refused_without_the_network(tmp_path, tiny_teachers, no_network):
    store = tiny_store(tmp_path)
    teachers = tmp_path / "teachers.toml"
    teachers.write_text('[[teacher]]\nname = "t1"\npath = "t1x"\nmax_length = 32\n')
    msg = run_refused(store, teachers)
    assert f"{teachers}: teacher 't1': no folder t1x (resolved to {tmp_path / 't1x'})" in msg
    assert no_network == []


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, tiny_teachers, no_network):
    """A hub id still names a model already in the local Hugging Face cache; nothing is fetched."""
    from huggingface_hub import constants

    from tmkd.teachers.spec import resolve_folder

    repo = Path(constants.HF_HUB_CACHE) / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_teachers["t1"], repo / "snapshots" / ("0" * 40))
    assert resolve_folder(TeacherSpec(name="t", path="org/tiny")) == repo / "snapshots" / ("0" * 40)
    assert no_network == []


def test_a_range_error_from_a_set_names_the_set(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text('[[teacher]]\nname = "r1"\npath = "x"\nmax_length = 64\nbatch_tokens = 4096\n')
    with pytest.raises(TeacherError) as e:
        load_teachers_toml(path, ["teacher.0.batch_tokens=-1"])
    assert str(e.value) == "--set teacher.0.batch_tokens=-1: teacher 'r1': batch_tokens -1 must be at least " \
                           "max_length 64"
    with pytest.raises(TeacherError) as e:  # two fields in one rule: the one the --set gave is named
        load_teachers_toml(path, ["teacher.0.max_length=8192"])
    assert str(e.value).startswith("--set teacher.0.max_length=8192: teacher 'r1': batch_tokens 4096 must be")
    path.write_text('[[teacher]]\nname = "r1"\npath = "x"\nmax_length = 4\n')
    with pytest.raises(TeacherError, match=rf"^{path}: teacher 'r1': max_length 4 out of range"):  # the file's
        load_teachers_toml(path, ["teacher.0.dtype=float32"])


def test_compile_without_a_compiler_is_refused_before_the_teacher_is_recorded(tmp_path, tiny_teachers, monkeypatch):
    from torch._inductor import cpp_builder

    from test_label import write_teachers

    store = tiny_store(tmp_path)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda *a, **k: "no-such-compiler-here")
    teachers = write_teachers(tmp_path / "teachers.toml", {"t1": tiny_teachers["t1"]}, max_length=32, compile=True)
    assert "teacher 't1': compile = true needs a C++ compiler" in run_refused(store, teachers)


def test_a_pair_only_second_cannot_cut_is_a_clean_error(tmp_path, tiny_teachers):
    """Known only while tokenizing (the teacher is recorded by then); a clean error, and no label part written."""
    from test_label import write_teachers

    path = tmp_path / "c.csv"
    path.write_text("text_a,text_b,label\n" + "what is a cat " * 10 + ",a cat,1\n")
    store = tmp_path / "store"
    cli("ingest", path, "--format", "csv", "--store", store, "--corpus", "c", "--label-names", "LABEL_0,LABEL_1")
    teachers = write_teachers(tmp_path / "teachers.toml", {"t1": tiny_teachers["t1"]}, max_length=16,
                              truncation="only_second")
    msg = one_line(cli("run", "--store", store, "--teachers", teachers, ok=False))
    assert "teacher 't1': truncation 'only_second' cannot cut a pair of c/00000 to max_length 16" in msg
    assert not Store(store).label_files()

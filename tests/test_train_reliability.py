"""The trainer survives kills, and its user-facing choices are checked up front.

Kills are simulated in process (fast): an exception raised at a chosen point stops the run as a
kill would, leaving the output folder as it was at that instant; then ``--resume`` must end with
the uninterrupted run's weights and metrics. (tests/test_student_procs.py does a real kill -9.)
Also: the positive class by name, config type errors, and the one label-space rule.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tmkd.data.store import LabelSpaceError, Store, StoreError, TeacherRecord
import toy
from tmkd.student.config import ConfigError, config_from_dict, load_config


class Killed(Exception):
    """Stands for a kill -9 at the point it is raised."""


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-store")
    toy.build_store(root, teachers=("t1", "t2"))
    return root


def _raw(store_dir, encoder, out) -> dict:
    """Stage 1: 1 epoch on `unlabeled`; stage 2: 2 epochs on `train`; a checkpoint every 3 steps."""
    stages = [
        {"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 16, "lr": 5e-3, "gold": False},
        {"name": "stage2", "corpora": ["train"], "epochs": 2, "batch_size": 16, "lr": 5e-3},
    ]
    raw = toy.config(store_dir, encoder, out, stages=stages)
    raw["eval"]["positive_label"] = "pos"  # the toy labels (neg, pos) declare no positive class
    raw["train"].update({"checkpoint_every": 3, "keep_checkpoints": 2})
    return raw


def _train(raw: dict, resume: bool = False):
    from accelerate.state import AcceleratorState

    from tmkd.student.train import run

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process each time
    try:
        return run(config_from_dict(raw), resume=resume)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store_dir, encoder):
    """An uninterrupted run: its metrics and exported weights are what every resumed run must end with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = _train(_raw(store_dir, encoder, out))
    return {"lines": _lines(out), "weights": _weights(out), "steps": result.steps, "best": result.best}


def _assert_same_as_reference(out: Path, reference: dict) -> None:
    lines = _lines(out)
    assert [(x["stage"], x["epoch"]) for x in lines] == [("stage1", 1), ("stage2", 1), ("stage2", 2)]
    for got, want in zip(lines, reference["lines"]):  # whole-epoch losses and rows, not the part after a resume
        assert "partial" not in got
        assert (got["train_loss"], got["examples"], got["eval_map"]) == \
               (want["train_loss"], want["examples"], want["eval_map"])
    got = _weights(out)
    assert got.keys() == reference["weights"].keys()
    assert all(torch.equal(got[k], reference["weights"][k]) for k in got)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["steps"] == reference["steps"]
    assert record["best"] == reference["best"]


# ---- kills ------------------------------------------------------------------------------------
def _kill_at_first_stage2_epoch_end(raw: dict, monkeypatch) -> Path:
    """Run until stage 2's first epoch has written its metrics line, and kill it before that epoch's
    checkpoint: the last checkpoint is mid-epoch, so the resume trains the end of that epoch again."""
    import tmkd.student.checkpoint as checkpoint

    real = checkpoint.save_checkpoint

    def save(*args, **kwargs):
        if args[3].where() == {"stage": 1, "epoch": 1, "batch": 0}:  # the position after stage 2's first epoch
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)  # the loop saves through the checkpoint module
    with pytest.raises(Killed):
        _train(raw)
    monkeypatch.undo()
    out = Path(raw["output"])
    assert [(x["stage"], x["epoch"]) for x in _lines(out)] == [("stage1", 1), ("stage2", 1)]
    ckpt = checkpoint.latest_checkpoint(out)
    position = json.loads((ckpt / "state.json").read_text())["position"]
    assert position["stage"] == 1 and position["epoch"] == 0 and position["batch"] > 0  # mid-epoch
    return ckpt


def test_kill_after_an_epoch_line_resumes_with_one_line_per_epoch_and_whole_epoch_loss(
        tmp_path, store_dir, encoder, reference, monkeypatch):
    raw = _raw(store_dir, encoder, tmp_path / "out")
    _kill_at_first_stage2_epoch_end(raw, monkeypatch)
    _train(raw, resume=True)  # trains the end of stage 2's first epoch again: its line must not repeat
    _assert_same_as_reference(tmp_path / "out", reference)


def test_a_checkpoint_from_before_save_state_is_refused_by_name(tmp_path, store_dir, encoder, monkeypatch, capsys):
    from tmkd.student.train import main

    raw = _raw(store_dir, encoder, tmp_path / "out")
    ckpt = _kill_at_first_stage2_epoch_end(raw, monkeypatch)
    state = json.loads((ckpt / "state.json").read_text())
    del state["layout"]  # as the trainer wrote it before checkpoints were accelerate's save_state
    (ckpt / "state.json").write_text(json.dumps(state))
    cfg = tmp_path / "student.toml"
    cfg.write_text(toy.to_toml(raw))
    assert main(["--config", str(cfg), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{ckpt}: a checkpoint saved by an earlier tmkd" in err and "Traceback" not in err


def test_a_kill_after_the_last_checkpoint_resumes_to_the_same_model(tmp_path, store_dir, encoder, reference,
                                                                   monkeypatch):
    """The run's last checkpoint is at its end (no stage left): a kill while exporting, then --resume."""
    import tmkd.student.train as train

    raw = _raw(store_dir, encoder, tmp_path / "out")
    monkeypatch.setattr(train, "finish", lambda s: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        _train(raw)
    monkeypatch.undo()
    _train(raw, resume=True)
    _assert_same_as_reference(tmp_path / "out", reference)


@pytest.mark.parametrize("kill_at", [11, 15])
def test_a_resume_in_a_later_epoch_whose_batch_count_differs_keeps_the_data_order(tmp_path, encoder, monkeypatch,
                                                                                    kill_at):
    """With 3 DataLoader workers and uneven parts, epochs differ in batch count (7, then 9): a resume in
    the second epoch must seek in that epoch's stream (it was clipped by the first one's count)."""
    import tmkd.student.checkpoint as checkpoint

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(19, 4, 20, 6, 5), unlabeled=(8,), dev=(16,))
    raw = toy.config(store.root, encoder, tmp_path / "ref", teachers=("t1",), seed=2, stages=[
        {"name": "task", "corpora": ["train"], "epochs": 3, "batch_size": 8, "lr": 5e-3}])
    raw["eval"]["positive_label"] = "pos"
    raw["data"]["num_workers"] = 3
    raw["train"].update({"checkpoint_every": 1, "keep_checkpoints": 1})
    _train(raw)
    reference = _weights(tmp_path / "ref")
    raw["output"] = str(tmp_path / "run")
    real = checkpoint.save_checkpoint

    def save(accelerator, out, step, *args, **kwargs):
        real(accelerator, out, step, *args, **kwargs)
        if step == kill_at:
            raise Killed

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    with pytest.raises(Killed):
        _train(raw)
    monkeypatch.undo()
    _train(raw, resume=True)
    got = _weights(tmp_path / "run")
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_kill_while_saving_a_checkpoint_leaves_the_previous_one_usable(
        tmp_path, store_dir, encoder, reference, monkeypatch):
    import tmkd.student.checkpoint as checkpoint

    raw = _raw(store_dir, encoder, tmp_path / "out")
    out = tmp_path / "out"
    real = torch.save

    def killed_while_writing_step_6(obj, path, *a, **k):
        if Path(path).name == "optimizer.bin" and Path(path).parent.name.endswith("step-00000006"):
            raise Killed  # the model is written, the optimizer, the RNG and state.json not
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", killed_while_writing_step_6)
    with pytest.raises(Killed):
        _train(raw)
    monkeypatch.undo()
    assert (out / "checkpoints" / ".tmp-step-00000006" / "model.safetensors").exists()  # the half-written save
    # a folder with a final name but no state.json, or a file shorter than recorded, never counts
    (out / "checkpoints" / "step-99999999").mkdir()
    (out / "checkpoints" / "step-99999999" / "model.safetensors").write_bytes(b"half")
    good = checkpoint.latest_checkpoint(out)
    assert good.name == "step-00000003"  # stage 1 has 10 steps: saves at 3 and 6 (killed), 9, 10
    torn = out / "checkpoints" / "step-99999998"
    torn.mkdir()
    for f in good.iterdir():
        torn.joinpath(f.name).write_bytes(f.read_bytes())
    with open(torn / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert checkpoint.latest_checkpoint(out) == good
    shutil.rmtree(torn)
    shutil.rmtree(out / "checkpoints" / "step-99999999")

    _train(raw, resume=True)
    _assert_same_as_reference(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # leftovers are cleaned once a new save is in place


def test_kill_while_switching_the_best_export_keeps_the_current_best(
        tmp_path, store_dir, encoder, reference, monkeypatch):
    import os

    import tmkd.student.checkpoint as checkpoint

    raw = _raw(store_dir, encoder, tmp_path / "out")
    out = tmp_path / "out"
    real = os.replace
    exports = []

    def killed_at_the_second_best_switch(src, dst, *a, **k):
        if Path(dst).name.startswith("best"):
            exports.append(dst)
            if len(exports) == 2:
                raise Killed
        return real(src, dst, *a, **k)

    monkeypatch.setattr(checkpoint.os, "replace", killed_at_the_second_best_switch)
    with pytest.raises(Killed):
        _train(raw)
    monkeypatch.undo()
    if len(exports) < 2:
        pytest.skip("the reference run improved only once: no second switch to interrupt")
    state = json.loads((checkpoint.latest_checkpoint(out) / "state.json").read_text())
    assert checkpoint.best_folder(out, state["best"]).joinpath("model.safetensors").exists()

    _train(raw, resume=True)
    _assert_same_as_reference(out, reference)
    # the current best is the reference's, and the only exports kept are those a kept checkpoint refers to
    # (an older best stays while a kept checkpoint that a resume may start from still names it)
    named = [json.loads((c / "state.json").read_text())["best"] for c in (out / "checkpoints").glob("step-*")]
    wanted = {f"best-{b['step']:08d}" for b in named if b and "step" in b}
    assert f"best-{reference['best']['step']:08d}" in wanted
    assert {p.name for p in (out / "checkpoints").glob("best*")} == wanted
    assert not list((out / "checkpoints").glob(".tmp-*")) + list((out / "checkpoints").glob(".old-*"))


def test_publish_never_leaves_a_step_without_a_usable_folder(tmp_path, monkeypatch):
    """Saving a step that exists already: the old folder is moved aside, and counts until the new one is in."""
    import os

    import tmkd.student.checkpoint as checkpoint

    base = tmp_path / "checkpoints"
    old = base / "step-00000004"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 4, "files": {}}))
    new = base / ".tmp-step-00000004"
    new.mkdir()
    (new / "state.json").write_text(json.dumps({"step": 4, "files": {}, "new": True}))
    real = os.replace
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda src, dst: (_ for _ in ()).throw(Killed) if Path(src) == new else real(src, dst))
    with pytest.raises(Killed):
        checkpoint.publish(new, old)
    monkeypatch.undo()
    assert checkpoint.latest_checkpoint(tmp_path).name == ".old-step-00000004"  # the old one, moved aside
    checkpoint.publish(new, old)
    assert checkpoint.latest_checkpoint(tmp_path) == old and json.loads((old / "state.json").read_text())["new"]
    assert sorted(p.name for p in base.iterdir()) == ["step-00000004"]


# ---- positive class by name ------------------------------------------------------------------
def _qnli_store(root: Path, declared: str | None = None) -> Store:
    """No-KD corpora labelled like QNLI: label 0 is the positive class, entailment."""
    store = Store.create(root)
    names = ["entailment", "not_entailment"]
    toy.add_corpus(store, "train", [32], [], seed=1, label_names=names)
    toy.add_corpus(store, "dev", [16], [], seed=3, id_offset=200_000, group_size=4, label_names=names)
    if declared:
        m = store.corpus("dev")
        m.positive_label = declared
        store.write_corpus_manifest(m)
    return store


def test_positive_class_is_found_by_name(tmp_path, encoder, monkeypatch):
    import tmkd.teachers.metrics as metrics
    from tmkd.student.plan import positive_class

    store = _qnli_store(tmp_path / "qnli")
    raw = toy.config(store.root, encoder, tmp_path / "out", teachers=(),
                     stages=[{"name": "task", "corpora": ["train"], "epochs": 1, "batch_size": 16, "lr": 1e-3}])
    cfg = config_from_dict(raw)
    assert cfg.eval.positive_label is None
    assert positive_class(cfg, store, ["entailment", "not_entailment"]) == 0  # the name that means positive
    cfg.eval.positive_label = "not_entailment"
    assert positive_class(cfg, store, ["entailment", "not_entailment"]) == 1
    cfg.eval.positive_label = "nope"
    with pytest.raises(StoreError, match=r"eval corpus 'dev': positive_label 'nope' is not one of the labels"):
        positive_class(cfg, store, ["entailment", "not_entailment"])

    # the corpus's declared positive class wins over the guess
    declared = _qnli_store(tmp_path / "declared", declared="not_entailment")
    assert positive_class(config_from_dict(dict(raw, store=str(declared.root))), declared,
                          ["entailment", "not_entailment"]) == 1
    # labels (neg, pos): nothing means positive, nothing declared: a clear error, not index 1
    toy_store = toy.build_store(tmp_path / "toy", teachers=("t1",), train=(16,), unlabeled=(16,), dev=(16,))
    m = toy_store.corpus("dev")
    m.positive_label = None  # the toy store declares "pos"; here the corpus declares nothing
    toy_store.write_corpus_manifest(m)
    with pytest.raises(StoreError, match=r"cannot tell the positive class of labels \['neg', 'pos'\]"):
        positive_class(config_from_dict(toy.config(toy_store.root, encoder, tmp_path / "o", teachers=("t1",))),
                       toy_store, ["neg", "pos"])

    # the trainer evaluates with that class: F1 and MAP/MRR of "entailment" (index 0)
    seen = []
    real = metrics.evaluate_predictions
    monkeypatch.setattr(metrics, "evaluate_predictions", lambda *a: seen.append(a[3]) or real(*a))
    _train(raw)
    assert seen == [0]


def test_positive_label_index_and_unknown_name_are_user_errors(tmp_path, encoder, capsys):
    from tmkd.student.train import main

    store = _qnli_store(tmp_path / "qnli")
    raw = toy.config(store.root, encoder, tmp_path / "out", teachers=(),
                     stages=[{"name": "task", "corpora": ["train"], "epochs": 1, "batch_size": 16, "lr": 1e-3}])
    path = tmp_path / "s.toml"
    path.write_text(toy.to_toml(raw))
    path.write_text(toy.to_toml(dict(raw, eval=dict(raw["eval"], positive_label=0))))  # an index, in the file
    assert main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: eval.positive_label: expected a string, got 0 (an integer)" in err
    assert "give the label's name" in err and "Traceback" not in err
    path.write_text(toy.to_toml(raw))
    # on the command line a string field takes the text: the label named "0", which this corpus lacks
    assert main(["--config", str(path), "--set", "eval.positive_label=0"]) == 1
    err = capsys.readouterr().err
    assert "positive_label '0' is not one of the labels ['entailment', 'not_entailment']" in err
    assert main(["--config", str(path), "--set", "eval.positive_label=entailed"]) == 1
    err = capsys.readouterr().err
    assert "positive_label 'entailed' is not one of the labels ['entailment', 'not_entailment']" in err
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before any training


def test_shipped_configs_name_the_positive_class():
    root = Path(__file__).resolve().parents[1] / "student" / "configs"
    for path in root.glob("*.toml"):
        cfg = load_config(path, ["store=\"S\"", "output=\"O\"", "student.encoder=\"E\""])
        assert cfg.eval.positive_label is None or isinstance(cfg.eval.positive_label, str), path
    assert load_config(root / "demo.toml").eval.positive_label == "entailment"


# ---- config type errors -----------------------------------------------------------------------
def test_config_type_errors_name_file_field_and_expected_type(tmp_path, encoder, store_dir, capsys):
    from tmkd.student.train import main

    raw = _raw(store_dir, encoder, tmp_path / "out")
    path = tmp_path / "s.toml"

    def error(stages_1: dict, *overrides) -> str:
        bad = dict(raw, stages=[raw["stages"][0], dict(raw["stages"][1], **stages_1)])
        path.write_text(toy.to_toml(bad))
        with pytest.raises(ConfigError) as e:
            load_config(path, list(overrides))
        return str(e.value)

    assert error({"lr": "abc"}) == f'{path}: stages.1.lr: expected a number, got "abc" (a string)'
    assert error({"epochs": 1.5}) == f"{path}: stages.1.epochs: expected an integer, got 1.5 (a float)"
    assert error({"gold": "no"}) == f'{path}: stages.1.gold: expected true or false, got "no" (a string)'
    assert error({"corpora": [1]}) == f"{path}: stages.1.corpora.0: expected a string, got 1 (an integer)"
    assert error({}, "stages.0.lr=fast") == '--set stages.0.lr=fast: stages.0.lr: expected a number, got "fast" ' \
                                            '(a string)'
    assert error({}, "stages.1.loss=3").startswith("--set stages.1.loss=3: stages.1.loss: expected a table")
    # a single string is a list of one
    path.write_text(toy.to_toml(dict(raw, stages=[dict(raw["stages"][0], corpora="unlabeled")])))
    assert load_config(path).stages[0].corpora == ["unlabeled"]
    # through the script: exit code 2, the message, no traceback
    assert main(["--config", str(path), "--set", "stages.0.epochs=1.5"]) == 1
    err = capsys.readouterr().err
    assert err == "error: --set stages.0.epochs=1.5: stages.0.epochs: expected an integer, got 1.5 (a float)\n"


# ---- one label-space rule ---------------------------------------------------------------------
def test_label_spaces_follow_the_store_rule(tmp_path, encoder, capsys):
    from tmkd.student.plan import label_space
    from tmkd.student.train import main

    store = toy.build_store(tmp_path / "store", teachers=("t1",), train=(16,), unlabeled=(16,), dev=(16,))
    store.write_teacher(TeacherRecord(name="three", fingerprint="toy:three", path="toy/three",
                                      label_names=["a", "b", "c"], dtype="float32", max_length=64))
    store.write_teacher(TeacherRecord(name="swapped", fingerprint="toy:swapped", path="toy/swapped",
                                      label_names=["pos", "neg"], dtype="float32", max_length=64))
    store.write_teacher(TeacherRecord(name="generic", fingerprint="toy:generic", path="toy/generic",
                                      label_names=["LABEL_0", "LABEL_1"], dtype="float32", max_length=64))
    raw = toy.config(store.root, encoder, tmp_path / "out", teachers=("t1",))
    teachers = lambda *names: [store.teacher(n) for n in names]  # noqa: E731

    cfg = config_from_dict(raw)
    with pytest.raises(LabelSpaceError, match=r"teacher 'three' has 3 labels \['a', 'b', 'c'\] but teacher 't1' "
                                              r"has 2"):
        label_space(cfg, store, teachers("t1", "three"))
    with pytest.raises(LabelSpaceError, match=r"teacher 'swapped' labels \['pos', 'neg'\] do not match corpus "
                                              r"'train' labels \['neg', 'pos'\]"):
        label_space(cfg, store, teachers("swapped"))
    # generic LABEL_i names match any names of the same count; the export takes the meaningful ones
    assert label_space(cfg, store, teachers("generic", "t1")) == ["neg", "pos"]
    assert label_space(cfg, store, teachers("generic")) == ["neg", "pos"]

    path = tmp_path / "s.toml"
    path.write_text(toy.to_toml(raw))
    assert main(["--config", str(path), "--set", "teachers=[\"t1\", \"three\"]"]) == 1
    err = capsys.readouterr().err
    assert "teacher 'three' has 3 labels" in err and "Traceback" not in err

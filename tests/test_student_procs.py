"""The student trainer as users run it, in subprocesses: kill -9 + --resume, and two real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tmkd.data.store import Store
from tmkd.teachers.device import cpu_has_bf16
import toy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def toy_config(*args, **kwargs) -> dict:
    """toy.config, naming the positive class: the toy labels (neg, pos) declare none."""
    raw = toy.config(*args, **kwargs)
    raw["eval"]["positive_label"] = "pos"
    return raw


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "tests" / "hooks"))  # the kill hook (tests/hooks/sitecustomize.py)
    env.update(extra)
    return env


def _train(args, **env):
    return subprocess.run([sys.executable, "student/train.py", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # other test runs on this machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def encoder(tiny_teachers):
    return tiny_teachers["t2"]


def test_kill_9_then_resume_continues_with_the_same_data_order(tmp_path, encoder):
    store = toy.build_store(tmp_path / "store", teachers=("t1", "t2"))
    stages = [
        {"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 16, "lr": 5e-3, "gold": False},
        {"name": "stage2", "corpora": ["train"], "epochs": 2, "batch_size": 16, "lr": 5e-3, "schedule": "linear",
         "warmup_ratio": 0.2, "loss": {"soft": "kl", "temperature": 2.0}},
    ]
    raw = toy_config(store.root, encoder, tmp_path / "unused", stages=stages)
    raw["data"]["num_workers"] = 1  # tokenize in a DataLoader worker, as on a GPU
    # 2 batches per optimizer step: stage1 = 5 steps (10 batches), stage2 = 4 steps per epoch (8 batches)
    raw["train"].update({"gradient_accumulation_steps": 2, "checkpoint_every": 3})
    cfg = tmp_path / "student.toml"
    cfg.write_text(toy.to_toml(raw))

    ref = _train(["--config", str(cfg), "--output", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    assert "done: 13 optimizer steps" in ref.stdout

    # SIGKILL as step 9's checkpoint (stage 2's first epoch ends) is saved: the last one is step 6, mid-epoch
    killed = _train(["--config", str(cfg), "--output", str(tmp_path / "run")], TMKD_TEST_KILL_AT_SAVE="9")
    assert killed.returncode == -9, killed.stderr
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-00000006"
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["position"] == {"stage": 1, "epoch": 0, "batch": 2}
    assert not (tmp_path / "run" / "model.safetensors").exists()

    # starting again without --resume would mix two runs: refused
    again = _train(["--config", str(cfg), "--output", str(tmp_path / "run")])
    assert again.returncode == 1 and "pass --resume" in again.stderr and "Traceback" not in again.stderr

    # the data order depends on the worker count: resuming with another one is refused, naming the right one
    other = _train(["--config", str(cfg), "--output", str(tmp_path / "run"), "--resume", "--set", "data.num_workers=2"])
    assert other.returncode == 1 and "data.num_workers = 1, now 2" in other.stderr, other.stderr

    resumed = _train(["--config", str(cfg), "--output", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 13 optimizer steps" in resumed.stdout

    # same data order, optimizer, schedule and dropout RNG: the very same weights as the uninterrupted run
    rank_ref = json.loads((tmp_path / "ref" / "ranks" / "rank-0.json").read_text())
    rank_run = json.loads((tmp_path / "run" / "ranks" / "rank-0.json").read_text())
    assert rank_run["param_digest"] == rank_ref["param_digest"]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # one line per (stage, epoch); the epoch cut by the kill reports its whole loss and rows (the checkpoint
    # carried the sums of the batches before it), equal to the uninterrupted run's
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    run_lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"]) for x in run_lines] == [("stage1", 1), ("stage2", 1), ("stage2", 2)]
    assert [(x["stage"], x["epoch"]) for x in ref_lines] == [("stage1", 1), ("stage2", 1), ("stage2", 2)]
    for got, want in zip(run_lines, ref_lines):
        assert got["train_loss"] == want["train_loss"] and got["examples"] == want["examples"]
        assert got["eval_map"] == want["eval_map"] and "partial" not in got
    # what each rank saw in the resumed epoch: the whole epoch, as in the uninterrupted run
    assert rank_run["epochs"][0] == rank_ref["epochs"][1]


def test_two_real_processes_complete_and_keep_weights_in_sync(tmp_path, encoder):
    store = toy.build_store(tmp_path / "store", teachers=("t1", "t2", "t3"))  # train parts 64/40/24 rows: uneven
    stages = [
        {"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 16, "lr": 5e-3, "gold": False},
        {"name": "stage2", "corpora": ["train"], "epochs": 2, "batch_size": 8, "lr": 5e-3,
         "loss": {"soft": "mse", "alpha": 0.5}},
    ]
    raw = toy_config(store.root, encoder, tmp_path / "out", teachers=("t1", "t2", "t3"), stages=stages)
    raw["data"]["num_workers"] = 2
    cfg = tmp_path / "student.toml"
    cfg.write_text(toy.to_toml(raw))
    # what ENVIRONMENT.md measured works on this machine (`--cpu --num_processes 2` runs one process)
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "student/train.py", "--config", str(cfg), "--mixed_precision", "bf16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / "out" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["param_digest"] == ranks[1]["param_digest"]  # DDP kept the replicas identical

    s = Store(store.root)
    expect = {}
    for corpus in ("unlabeled", "train"):
        ids = np.concatenate([s.read_corpus_part(p, ["id"]).column("id").to_numpy() for p in s.corpus(corpus).parts])
        expect[corpus] = (len(ids), int(ids.sum()) % (1 << 64))
    for i, (stage, corpus) in enumerate([("stage1", "unlabeled"), ("stage2", "train"), ("stage2", "train")]):
        per_rank = [r["epochs"][i] for r in ranks]
        assert all(e["stage"] == stage for e in per_rank)
        rows = sum(e["rows"] for e in per_rank)
        id_sum = sum(e["id_sum"] for e in per_rank) % (1 << 64)
        assert (rows, id_sum) == expect[corpus]  # every row once per epoch, split over both ranks
        assert all(e["rows"] > 0 for e in per_rank)  # both ranks really trained

    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "done" and record["world_size"] == 2 and record["variant"] == "tmkd"
    # bf16 as asked where the CPU has it natively; else fp32 (emulated bf16 is several times slower)
    assert record["mixed_precision"] == ("bf16" if cpu_has_bf16() else "no")
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["examples"] for x in lines] == [expect["unlabeled"][0], expect["train"][0], expect["train"][0]]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_loss_gone_nan_on_one_process_stops_every_process_and_run_json_says_failed(tmp_path, encoder):
    """The loss is read (every log_every steps) on each process; rank 1's NaN must stop rank 0 too, at the same
    step, so that rank 0 records the failure rather than wait in its next collective until it is killed."""
    store = toy.build_store(tmp_path / "store", teachers=("t1",))
    stages = [{"name": "task", "corpora": ["train"], "epochs": 1, "batch_size": 8, "lr": 5e-3}]
    raw = toy_config(store.root, encoder, tmp_path / "out", teachers=("t1",), stages=stages)
    raw["train"]["log_every"] = 1
    cfg = tmp_path / "student.toml"
    cfg.write_text(toy.to_toml(raw))
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "student/train.py", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(ACCELERATE_USE_CPU="1", TMKD_TEST_NAN_AT="1:3"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "failed", record
    assert "task" in record["error"] and "diverged" in record["error"], record["error"]
    assert not list((tmp_path / "out").rglob("*.safetensors"))

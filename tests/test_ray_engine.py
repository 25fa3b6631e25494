"""`tmkd-label run --engine ray` on a local Ray cluster: the same label parts as the local engine,
every unit committed exactly once, and a killed actor's unit finished by another."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tmkd.data.store import Store
from test_label import cli, write_teachers

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_env():
    """A private local Ray cluster per run (RAY_ADDRESS=local; this machine's 2 CPUs): no token under
    HOME, no usage report, its files in a temporary folder that is removed afterwards."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_ADDRESS": "local", "TOKENIZERS_PARALLELISM": "false"}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _label_bytes(store) -> dict:
    st = Store(store)
    return {f"{f.parent.parent.name}/{f.parent.name}/{f.name}": f.read_bytes() for f in st.label_files()}


def _ray_run(store, teachers: Path, env: dict, *extra: str) -> subprocess.Popen:
    cmd = [str(BIN / "tmkd-label"), "run", "--store", str(store), "--teachers", str(teachers), "--engine", "ray",
           "--workers", "2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_ray_engine_gives_the_local_engines_label_parts(tmp_path, wikiqa_sample, tiny_teachers, ray_env):
    teachers = write_teachers(tmp_path / "t.toml", {k: tiny_teachers[k] for k in ("t1", "t2")})
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for store in (local, on_ray):
        cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 20)
    cli("run", "--store", local, "--teachers", teachers)

    proc = _ray_run(on_ray, teachers, ray_env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "scored 12 units" in out.replace("\n", " ") and "ray: 2 worker(s)" in out.replace("\n", " ")
    log = Store(on_ray).run_logs()[-1]
    assert sorted(map(tuple, log["scored"])) == sorted((t, "wq", p) for t in ("t1", "t2") for p in range(6))
    assert _label_bytes(on_ray) == _label_bytes(local)  # bit for bit
    assert "OK" in cli("verify", "--store", on_ray).output
    again = cli("run", "--store", on_ray, "--teachers", teachers, "--engine", "ray").output
    assert "nothing to score: 12 units already scored" in again  # planned on the driver: no cluster started

    # a part that is bad only once decoded (a NaN, and a commit record that matches the bytes) is re-scored
    from test_store_trust import _rewrite, nan_row, recommit

    st = Store(on_ray)
    _rewrite(st.label_path("t1", "wq", 2), nan_row)
    recommit(st, st.label_path("t1", "wq", 2))
    proc = _ray_run(on_ray, teachers, ray_env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "re-scored 1 invalid label part(s): t1/wq/2" in out.replace("\n", " "), out
    assert _label_bytes(on_ray) == _label_bytes(local)


@pytest.mark.parametrize("option, says", [(["--workers", "-1"], "--workers -1"),
                                          (["--gpus-per-worker", "nan"], "--gpus-per-worker nan"),
                                          (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0: a number > 0")])
def test_bad_ray_options_are_refused_before_anything_is_written(tmp_path, wikiqa_sample, tiny_teachers, option, says):
    teachers = write_teachers(tmp_path / "t.toml", {"t1": tiny_teachers["t1"]})
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 60)
    result = cli("run", "--store", store, "--teachers", teachers, "--engine", "ray", *option, ok=False)
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output
    assert not Store(store).teachers() and not (store / "runs").exists()
    local = cli("run", "--store", store, "--teachers", teachers, "--workers", "2", ok=False)
    assert local.exit_code == 1 and "go with --engine ray" in local.output


def test_a_killed_ray_actors_unit_goes_to_another_actor(tmp_path, shared_data, tiny_tokenizer, ray_env):
    from tiny import build_bert, read_lines

    source = tmp_path / "wikiqa.tsv"
    source.write_text("".join(read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 801)), newline="")
    big = {f"b{s}": build_bert(tmp_path / f"b{s}", tiny_tokenizer, seed=s, layers=4, hidden=128) for s in (1, 2)}
    teachers = write_teachers(tmp_path / "t.toml", big, max_length=128)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for store in (local, on_ray):
        cli("ingest", source, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 100)
    units = 2 * len(Store(on_ray).corpus("wq").parts)

    proc = _ray_run(on_ray, teachers, ray_env)
    deadline, victim = time.time() + 180, None
    while victim is None and proc.poll() is None and time.time() < deadline:
        if Store(on_ray).label_files():  # the actors are scoring: kill one of them, mid-unit
            found = subprocess.run(["pgrep", "-f", "ray::ScoringWorker.score"], capture_output=True, text=True)
            pids = [int(p) for p in found.stdout.split()]
            if pids:
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.05)
    out = proc.communicate(timeout=300)[0]
    assert victim is not None, "no actor was caught scoring"
    assert proc.returncode == 0, out
    assert "a Ray worker died; starting a replacement" in out
    log = Store(on_ray).run_logs()[-1]
    scored = [tuple(u) for u in log["scored"]]
    assert len(scored) == len(set(scored)) and len(scored) + log["units_by_others"] == units  # each unit once
    cli("run", "--store", local, "--teachers", teachers)
    assert _label_bytes(on_ray) == _label_bytes(local)
    assert "OK" in cli("verify", "--store", on_ray).output


def test_a_unit_that_fails_on_a_ray_actor_is_a_one_line_error(tmp_path, wikiqa_sample, tiny_teachers, ray_env):
    """A teacher that gives NaN: refused as on the local engine, with the unit named, no traceback."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    broken = tmp_path / "t-nan"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teachers["t1"])
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_teachers["t1"]).save_pretrained(broken)
    teachers = write_teachers(tmp_path / "t.toml", {"tnan": broken})
    store = tmp_path / "store"
    cli("ingest", wikiqa_sample, "--format", "wikiqa", "--store", store, "--corpus", "wq", "--part-rows", 60)
    proc = _ray_run(store, teachers, ray_env)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out
    assert "error: tnan × wq/" in out and "gave NaN/inf logits" in out and "Traceback" not in out
    assert not Store(store).label_files()

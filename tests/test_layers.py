"""The package's shape: one installed `tmkd`, layers that follow the data flow, no upward import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_nothing_imports_upward():
    """tmkd.data (store, readers) <- tmkd.teachers <- tmkd.pipeline | tmkd.student (pyproject's contract)."""
    res = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "1 kept, 0 broken" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_only_tmkd_is_installed_and_the_entry_points_run(tmp_path):
    """From outside the checkout: `tmkd.*` imports, the bare folder names do not, and every command answers."""
    code = ("import importlib.util as u, tmkd.data.store, tmkd.teachers.spec, tmkd.pipeline.cli, tmkd.student.config;"
            "print([n for n in ('data', 'pipeline', 'student', 'teachers') if u.find_spec(n)])")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    for cmd in ("tmkd-label", "tmkd-train", "tmkd-finetune"):
        res = subprocess.run([str(BIN / cmd), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0 and "usage" in res.stdout.lower() + res.stdout, (cmd, res.stderr[-2000:])


def test_no_sys_path_edits_anywhere():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.py")
                 if not any(part.startswith(".venv") for part in p.parts)  # .venv, and e.g. bench/peer.py's .venv-onnx
                 and "sys.path.insert" in p.read_text() and p.name != "test_layers.py"]
    assert offenders == []

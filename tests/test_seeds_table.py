"""bench/seeds_table.py: the quality-over-seeds tables (mean ± std, n) and the paired comparison, checked by hand."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("seeds_table", ROOT / "bench" / "seeds_table.py")
seeds_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds_table)

RUNS = [
    {"variant": "tmkd", "seed": 1, "dev_map": 0.80, "test_map": 0.75, "test_mrr": 0.76, "test_accuracy": 0.89},
    {"variant": "tmkd", "seed": 2, "dev_map": 0.82, "test_map": 0.77, "test_mrr": 0.78, "test_accuracy": 0.90},
    {"variant": "tmkd", "seed": 3, "dev_map": 0.81, "test_map": 0.76, "test_mrr": 0.77, "test_accuracy": 0.91},
    {"variant": "mkd-matched", "seed": 1, "dev_map": 0.70, "test_map": 0.70, "test_mrr": 0.71, "test_accuracy": 0.88},
    {"variant": "mkd-matched", "seed": 2, "dev_map": 0.71, "test_map": 0.73, "test_mrr": 0.74, "test_accuracy": 0.88},
    {"variant": "mkd-matched", "seed": 4, "dev_map": 0.72, "test_map": 0.71, "test_mrr": 0.72, "test_accuracy": 0.87},
    {"variant": "qnli-nokd", "seed": 1, "dev_map": None, "test_map": None, "test_mrr": None, "test_accuracy": 0.8},
]


def test_mean_std_n_per_variant_and_metric():
    s = seeds_table.summarise(RUNS)
    mean, std, n = s["tmkd"]["test_map"]
    assert n == 3 and mean == pytest.approx(0.76) and std == pytest.approx(0.01)  # sample std of .75, .77, .76
    assert "test_map" not in s["qnli-nokd"] and s["qnli-nokd"]["test_accuracy"][2] == 1
    table = seeds_table.markdown(s)
    assert "| tmkd | 0.8100 ± 0.0100 | 0.7600 ± 0.0100 | 0.7700 ± 0.0100 | 0.9000 ± 0.0100 | 3 |" in table
    assert "| qnli-nokd | – | – | – | 0.8000 | 1 |" in table


def test_the_paired_difference_uses_the_shared_seeds_only():
    d = seeds_table.paired_difference(RUNS, "tmkd", "mkd-matched", "test_map")
    assert d["seeds"] == [1, 2]  # seed 3 and 4 are in one variant only
    diffs = [0.75 - 0.70, 0.77 - 0.73]
    mean = sum(diffs) / 2
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 1) / math.sqrt(2)
    assert d["mean"] == pytest.approx(mean) and d["se"] == pytest.approx(se) and d["beyond_2se"] is (mean > 2 * se)


def test_the_command_prints_the_table_and_the_comparison(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(RUNS))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds_table.py"), str(path), "--compare", "tmkd",
                          "mkd-matched"], capture_output=True, text=True, check=True).stdout
    assert "| variant | dev_map | test_map | test_mrr | test_accuracy | n |" in out
    assert "tmkd − mkd-matched (test_map, seeds [1, 2])" in out


def test_the_bars_say_which_claims_held():
    runs = RUNS + [
        {"variant": "teacher-ensemble", "seed": None, "dev_map": 0.8, "test_map": 0.765, "test_mrr": 0.78,
         "test_accuracy": 0.89},
        *[{"variant": v, "seed": s, "dev_map": None, "test_map": m + 0.001 * s, "test_mrr": None,
           "test_accuracy": None} for v, m in (("mkd", 0.70), ("tkd", 0.69), ("nokd", 0.71)) for s in (1, 2)],
    ]
    got = {claim: (held, detail) for claim, held, detail in seeds_table.bars(runs)}
    assert got["TMKD mean >= teacher ensemble"] == (False, "0.7600 (n=3) vs 0.7650")
    # seeds 1, 2: differences .05 and .04, mean .045, SE = std / sqrt(2) = .005: beyond 2 SE
    assert got["TMKD − MKD-matched > 2 SE"] == (True, "+0.0450 ± 0.0050 SE over seeds [1, 2]")
    assert got["TMKD >= MKD >= TKD >= no-KD (means)"][0] is False  # no-KD's 0.7115 beats TKD's 0.6915
    assert got["TMKD >= MKD >= TKD >= no-KD (means)"][1].endswith("tkd 0.6915 < nokd 0.7115")  # said, not ">="
    without = [r for r in runs if r["variant"] != "nokd"]
    assert seeds_table.bars(without)[2][1] is None  # a missing variant: not judged
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds_table.py"), "--bars", "/dev/stdin"],
                         input=json.dumps(runs), capture_output=True, text=True, check=True).stdout
    assert "| TMKD mean >= teacher ensemble | no | 0.7600 (n=3) vs 0.7650 |" in out
    lever = [dict(r, variant="tmkd-x", test_map=r["test_map"] + 0.01) for r in runs if r["variant"] == "tmkd"]
    got = {claim: held for claim, held, _ in seeds_table.bars(runs + lever, tmkd="tmkd-x")}
    assert got["TMKD (tmkd-x) mean >= teacher ensemble"] is True  # 0.77 >= 0.765


def test_compare_says_when_the_second_variant_is_ahead_beyond_2_se():
    """The bar is one-sided (A ahead of B), but a B ahead beyond 2 SE must not read as a plain 'False' (no news)."""
    def compare(a, b):
        return subprocess.run([sys.executable, str(ROOT / "bench" / "seeds_table.py"), "/dev/stdin", "--compare", a, b],
                              input=json.dumps(RUNS), capture_output=True, text=True, check=True).stdout

    assert "beyond 2 SE: False (tmkd ahead beyond 2 SE)" in compare("mkd-matched", "tmkd")  # −0.045 ± 0.005
    assert "beyond 2 SE: True" in compare("tmkd", "mkd-matched") and "ahead beyond" not in compare("tmkd", "mkd-matched")


def test_runs_from_several_invocations_merge_and_a_clash_is_refused(tmp_path):
    """Each bench invocation re-evaluates the teachers: their rows repeat across files and are kept once; a
    student row that repeats with other numbers (other teachers, another run) is refused, naming both files."""
    ensemble = {"variant": "teacher-ensemble", "seed": None, "dev_map": 0.8, "test_map": 0.765, "test_mrr": 0.78,
                "test_accuracy": 0.89}
    (tmp_path / "a.json").write_text(json.dumps([ensemble, *RUNS[:2]]))
    (tmp_path / "b.json").write_text(json.dumps([ensemble, RUNS[2]]))
    merged = tmp_path / "merged.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds_table.py"), str(tmp_path / "a.json"),
                          str(tmp_path / "b.json"), "--merged-out", str(merged)],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(merged.read_text()) == [ensemble, *RUNS[:3]]
    assert "| tmkd | 0.8100 ± 0.0100 | 0.7600 ± 0.0100 | 0.7700 ± 0.0100 | 0.9000 ± 0.0100 | 3 |" in out
    (tmp_path / "c.json").write_text(json.dumps([dict(RUNS[0], test_map=0.70)]))
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "seeds_table.py"), str(tmp_path / "a.json"),
                          str(tmp_path / "c.json")], capture_output=True, text=True)
    assert bad.returncode != 0 and "tmkd seed 1 has other test_map" in bad.stderr and "a.json" in bad.stderr

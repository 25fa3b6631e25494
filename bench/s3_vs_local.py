"""`tmkd-label run` on an s3:// store (moto's S3 server on 127.0.0.1) against the same run on local disk.

The demo's corpora (data/samples/qnli: 1,000 + 3,000 + 500 pairs) and its three fine-tuned teachers
(demo-out/teachers, from `bash scripts/demo.sh`) are ingested into a fresh store of each kind, then
`tmkd-label run` is timed, alternating local and s3 for ``--rounds`` rounds (this machine is noisy:
only the ratio measured side by side means something).

    python bench/s3_vs_local.py --rounds 3     # prints the times and the ratio local / s3 (1.0: as fast)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "data" / "samples" / "qnli"
CORPORA = {"qnli-train": "train.jsonl", "qnli-unlabeled": "unlabeled.jsonl", "qnli-dev": "dev.jsonl"}


def sh(*args) -> float:
    t = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, args))}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def fresh_store(kind: str, scratch: Path, endpoint: str) -> str:
    if kind == "local":
        store = str(scratch / f"store-{uuid.uuid4().hex[:8]}")
    else:
        import boto3

        bucket = f"tmkd-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        store = f"s3://{bucket}/store"
    for corpus, file in CORPORA.items():
        extra = ["--unlabeled"] if corpus == "qnli-unlabeled" else []
        sh(BIN / "tmkd-label", "ingest", SAMPLE / file, "--format", "jsonl", "--store", store, "--corpus", corpus,
           "--columns", "text_a=question,text_b=sentence,label=label,id=id",
           "--label-names", "entailment,not_entailment", *extra)
    return store


def main() -> None:
    from moto.server import ThreadedMotoServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teachers", type=Path, default=ROOT / "demo-out" / "teachers" / "teachers.toml")
    args = ap.parse_args()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    scratch = Path(tempfile.mkdtemp(prefix="s3-vs-local-"))
    times = {"local": [], "s3": []}
    try:
        for r in range(args.rounds):
            for kind in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                store = fresh_store(kind, scratch, endpoint)
                times[kind].append(round(sh(BIN / "tmkd-label", "run", "--store", store, "--teachers", args.teachers),
                                         2))
                print(f"round {r + 1}: {kind} {times[kind][-1]} s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"times_s": times, "median_s": med, "ratio_local_over_s3": round(med["local"] / med["s3"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

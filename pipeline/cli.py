"""`tmkd-label`: ingest corpora, score them with teachers, inspect and verify the label store.

Heavy imports (torch, transformers) happen inside the commands that need them, so
`--help`, `status` and `query` start fast.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tmkd.data.errors import error_line, without_credentials
from tmkd.data.store import Store, StoreError

err = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="Score corpora with several teachers once, into a Parquet label store; inspect it with DuckDB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

STORE_OPT = typer.Option(..., "--store", "-s", help="The label store: a folder, or a URI (s3://bucket/prefix, gs://...,"
                                                    " file://...); credentials from the environment (AWS_*).")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline


def visible(text: str) -> str:
    """User text with its control characters shown as \\xNN: an ESC in a corpus must not drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def say(console: Console, message: str, style: str = "", prefix: str = "") -> None:
    """Print a message that may echo user text (paths, values, SQL) as plain text, never as markup."""
    line = Text(prefix, style=style)
    line.append(visible(without_credentials(message)))
    console.print(line, highlight=False, soft_wrap=True)


def fail(message) -> None:
    """A user-facing error: one red line on stderr, exit code 1, no traceback. An OSError (a full
    disk, a read-only store, a missing permission) is the user's to fix too: named, not a traceback."""
    say(err, error_line(message) if isinstance(message, BaseException) else str(message), "bold red", "error: ")
    raise typer.Exit(1)


def cell(value) -> Text:
    """A table cell shown as text: `[estimated]` stays visible and `[/z]` is just characters."""
    return Text("NULL" if value is None else visible(without_credentials(str(value))))


@app.command()
def run(
    store: str = STORE_OPT,
    teachers: Path = typer.Option(..., "--teachers", "-t", help="teachers.toml listing the teachers to score with."),
    corpus: Optional[list[str]] = typer.Option(None, "--corpus", "-c", help="Only these corpora (repeatable). Default: all."),
    replace: bool = typer.Option(False, "--replace", help="Accept a teacher whose checkpoint changed under the same name; its old labels become stale and are re-scored."),
    shard: str = typer.Option("0/1", "--shard", help="This node's share i/n of the parts, for independent nodes (combines with accelerate/torchrun ranks)."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device; default: this rank's GPU if any, else CPU."),
    logits_dtype: str = typer.Option("float32", "--logits-dtype", help="Stored logits: float32 or float16."),
    lease: float = typer.Option(120.0, "--lease", help="Seconds a claim on a unit lives without renewal; a killed worker's units are taken over after this."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Override teachers.toml, as in every job: --set teacher.0.max_length=64 (repeatable)."),
    engine: str = typer.Option("local", "--engine", help="local: this process (and its accelerate/torchrun ranks); ray: actors on a Ray cluster (pip install -e \".[ray]\" from the checkout)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster (auto, ray://host:port); default RAY_ADDRESS, else a new local one."),
    workers: Optional[int] = typer.Option(None, "--workers", help="--engine ray: actors to start; default as many as the cluster's GPUs (or CPUs) allow."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="--engine ray: GPUs per actor; default 1 where the cluster has GPUs, else 0."),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker", help="--engine ray: CPUs per actor (default 1)."),
):
    """Score every corpus part with every teacher; skip what is already scored and intact.

    Several runs may share one store (processes, nodes): they divide the units through claims.
    """
    from tmkd.pipeline.run import RunOptions, run as run_labels

    ray_opts = None
    if any(x is not None for x in (address, workers, gpus_per_worker, cpus_per_worker)):
        from tmkd.pipeline.ray_engine import RayOptions

        ray_opts = RayOptions(address, 0 if workers is None else workers, gpus_per_worker,
                              1.0 if cpus_per_worker is None else cpus_per_worker)
    opts = RunOptions(store, teachers, replace, corpus or None, shard, device, logits_dtype, lease, sets or [],
                      engine, ray_opts)
    try:
        s = run_labels(opts, err)
    except (StoreError, OSError) as e:
        fail(e)
    who = f"rank {s.rank}/{s.world}: " if s.world > 1 else ""
    if s.rescored:
        shown = ", ".join(f"{t}/{c}/{p} ({why})" for t, c, p, why in s.rescored)
        say(err, f"{who}re-scored {len(s.rescored)} invalid label part(s): {shown}", "yellow")
    others = f", {s.units_by_others} committed by other workers" if s.units_by_others else ""
    lost = f", {s.units_lost} dropped after losing their claim" if s.units_lost else ""
    if s.units_scored == 0:
        say(err, f"{who}nothing to score: {s.units_skipped} units already scored{others}{lost}; "
                 f"run log: {s.log_path}")
        return
    say(err,
        f"{who}scored {s.units_scored} units ({s.pairs:,} pairs) and skipped {s.units_skipped} already scored"
        f"{others}{lost}, in {s.seconds:.1f} s: {s.pairs_per_s:,.0f} pairs/s, {s.forward_passes} forward passes "
        f"on {s.device}; run log: {s.log_path}")


@app.command()
def status(
    store: str = STORE_OPT,
    full: bool = typer.Option(False, "--full", help="Read and check every byte of every part, as verify does "
                                                    "(default: commit records and file sizes only, in seconds)."),
):
    """Coverage: for each teacher × corpus, label parts done / total."""
    from tmkd.pipeline.status import coverage

    try:
        st = Store(store)
        rows = coverage(st, full)
        corpora = {c: st.corpus(c) for c in st.corpora()}
    except (StoreError, OSError) as e:
        fail(e)
    t = Table(title=Text(visible(without_credentials(f"corpora in {store}"))))
    for col in ("corpus", "parts", "rows", "labels"):
        t.add_column(col)
    for name, m in corpora.items():
        t.add_row(cell(name), cell(len(m.parts)), cell(f"{m.rows:,}"),
                  cell(", ".join(m.label_names) if m.label_names else "(unlabeled)"))
    out.print(t)
    t = Table(title="teacher coverage")
    for col in ("teacher", "corpus", "parts done", "rows done", "stale or damaged", "state"):
        t.add_column(col)
    for r in rows:
        state = Text("complete", "green") if r.done == r.total else Text("incomplete", "yellow")
        t.add_row(cell(r.teacher), cell(r.corpus), cell(f"{r.done}/{r.total}"),
                  cell(f"{r.rows_done:,}/{r.rows_total:,}"), cell(r.stale), state)
    out.print(t)
    if not rows:
        out.print("no teachers yet: score with `tmkd-label run --store STORE --teachers teachers.toml`")
    elif not full:
        say(out, "from commit records and file sizes; `tmkd-label verify` (or `status --full`) reads every byte")


def _json_value(v):
    """NaN and infinities are not JSON: they are written as null (valid JSON that every reader takes)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):  # DuckDB structs and maps
        return {k: _json_value(x) for k, x in v.items()}
    return v


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over the views corpus, labels, scores, teachers, corpora (read-only)."),
    store: str = STORE_OPT,
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    limit: int = typer.Option(100, "--max-rows", min=0, help="Rows shown in table format (csv/json print all)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Stream the result into this file (.parquet, "
                                          ".csv or .jsonl), batch by batch, instead of printing it."),
    output_format: Optional[str] = typer.Option(None, "--output-format", help="parquet, csv or jsonl (default: "
                                                "from --output's suffix)."),
):
    """DuckDB SQL over the store, with no file access (nothing a query does can change the store).

    Views: corpus(corpus, part, id, text_a, text_b, label, group), labels(teacher, corpus,
    part, row, id, logits), scores(corpus, part, row, id, label, group, one logits column per
    teacher), teachers(name, fingerprint, path, label_names, dtype, max_length),
    corpora(corpus, label_names, parts, rows). Macros: predicted(logits), probs(logits).
    """
    from tmkd.pipeline.query import run_query, write_query

    try:
        if output is not None:
            fmt_out = output_format or output.suffix.lstrip(".").lower()
            written, left = write_query(Store(store), sql, output, fmt_out)
        else:
            columns, rows, left = run_query(Store(store), sql)
    except (StoreError, OSError) as e:
        fail(e)
    for kind, parts in (("corpus", left.corpus_parts), ("label", left.label_parts)):
        if parts:
            say(err, f"{len(parts)} {kind} parts left out as invalid: " + "; ".join(parts), "yellow", "warning: ")
    if output is not None:
        say(err, f"{written:,} rows -> {output} ({fmt_out})")
        return
    if fmt is Format.csv:
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt is Format.json:
        if len(set(columns)) != len(columns):
            dup = sorted({c for c in columns if columns.count(c) > 1})
            fail(f"--format json needs distinct column names; {dup} occur more than once: name them with AS")
        json.dump([dict(zip(columns, map(_json_value, r))) for r in rows], sys.stdout, default=str, allow_nan=False)
        sys.stdout.write("\n")
    else:
        t = Table()
        for c in columns:
            t.add_column(cell(c))
        for r in rows[:limit]:
            t.add_row(*(cell(v) for v in r))
        out.print(t)
        if len(rows) > limit:
            say(out, f"({len(rows) - limit:,} more rows; use --max-rows or --format csv)")


@app.command()
def report(
    store: str = STORE_OPT,
    out_path: Path = typer.Option(..., "--out", "-o", help="The HTML file to write; its numbers go beside it as "
                                                           "JSON (report.html -> report.json)."),
    runs: list[Path] = typer.Option([], "--runs", help="A student run folder (run.json, metrics.jsonl); repeat."),
    corpus: list[str] = typer.Option([], "--corpus", help="Only this corpus; repeat (default: every corpus)."),
    top: int = typer.Option(20, "--top", min=0, help="Disagreements listed per corpus."),
):
    """One self-contained HTML page: coverage, agreement, confidence, calibration, disagreements, students."""
    import time

    from tmkd.data.fs import inside_store, output_file
    from tmkd.data.store import atomic_write_bytes
    from tmkd.pipeline.query import finite
    from tmkd.pipeline.report import build_report
    from tmkd.pipeline.report_html import render

    started = time.perf_counter()
    out_path = out_path.absolute()
    json_path = out_path.with_suffix(".json")
    try:
        st = Store(store)
        if out_path.suffix.lower() == ".json":
            fail(f"--out {out_path}: the page is HTML (its numbers go beside it as .json); name it .html")
        # both files, where they really go (through a symlink): never into the store, never onto a pipe
        targets = [output_file(out_path), output_file(json_path)]
        for given, target in zip((out_path, json_path), targets):
            if inside_store(target, st.root):
                fail(f"--out {given}: inside the store {st.root}; a report never writes into a store")
        data = finite(build_report(st, runs, corpus or None, top))
    except (StoreError, OSError) as e:
        fail(e)
    for kind, parts in (("corpus", data["left_out"]["corpus_parts"]), ("label", data["left_out"]["label_parts"])):
        if parts:
            say(err, f"{len(parts)} {kind} parts left out as invalid: " + "; ".join(parts), "yellow", "warning: ")
    try:
        atomic_write_bytes(targets[1], json.dumps(data, indent=1, default=str, allow_nan=False).encode())
        atomic_write_bytes(targets[0], render(data).encode())
    except OSError as e:
        fail(e)
    rows = sum(c["rows"] for c in data["corpora"].values())
    pairs = sum(c["pairs_scanned"] for c in data["corpora"].values())  # rows with a teacher's scores: 0 without any
    seconds = time.perf_counter() - started
    say(out, f"report of {len(data['corpora'])} corpora ({rows:,} rows, {pairs:,} scored pairs read), "
             f"{len(data['teachers'])} teachers, "
             f"{len(data['students'])} student runs in {seconds:.1f} s ({pairs / max(seconds, 1e-9):,.0f} pairs/s) "
             f"-> {out_path} (+ {json_path.name})")


@app.command()
def verify(store: str = STORE_OPT):
    """Check the store is complete and consistent; exit 0 only if it is."""
    from tmkd.pipeline.verify import verify as verify_store

    try:
        report = verify_store(Store(store))
    except (StoreError, OSError) as e:
        fail(e)
    for p in report.problems:
        say(err, p, "red", "problem: ")
    for n in report.notes:
        say(err, n, "yellow", "note: ")
    counts = (f"{report.corpora} corpora, {report.corpus_parts} corpus parts, {report.teachers} teachers, "
              f"{report.label_parts} label parts")
    if report.ok:
        say(out, f"{counts} verified", "green", "OK: ")
    else:
        say(err, f"{len(report.problems)} problem(s) in {counts}", "bold red")
        raise typer.Exit(1)


@app.command()
def ingest(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Source files (gzip is read as is)."),
    fmt: str = typer.Option(..., "--format", "-f", help="wikiqa | glue | json-samples | jsonl | csv | tsv | parquet"),
    store: str = typer.Option(..., "--store", "-s", help="The label store, created if missing: a folder or a URI "
                                                         "(s3://bucket/prefix, gs://..., file://...)."),
    corpus: str = typer.Option(..., "--corpus", "-c", help="Corpus name; ingesting into an existing corpus appends parts."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Field=column pairs, e.g. text_a=question,text_b=sentence,label=label,group=qid,id=idx."),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="The label space in index order, e.g. entailment,not_entailment."),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="Raw value=label name pairs, e.g. yes=entailment,no=not_entailment."),
    unlabeled: bool = typer.Option(False, "--unlabeled", help="Ignore any label column: labels are null (a stage-1 corpus)."),
    part_rows: int = typer.Option(50_000, "--part-rows", help="Rows per corpus part."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row and commit nothing (default: quarantine bad rows)."),
    ids: str = typer.Option("source", "--ids", help="source: the source's id where it has one, else a hash of the text pair; text: always the hash."),
    positive_label: Optional[str] = typer.Option(None, "--positive-label", help="The positive class (a label name), stored in the corpus manifest. Default: wikiqa 1, GLUE QNLI/RTE entailment, else none."),
):
    """Check and shard source files into a corpus of the store; bad rows are quarantined with file, line and reason."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from tmkd.data.ingest import IngestError, IngestOptions, ingest as ingest_files, parse_mapping, parse_names

    try:
        opts = IngestOptions(
            fmt, corpus, parse_mapping(columns, "--columns"), parse_names(label_names),
            parse_mapping(label_map, "--label-map"), unlabeled, part_rows, strict, ids, positive_label=positive_label,
        )
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            tasks: dict[Path, int] = {}

            def progress(path: Path, done: int, total: int) -> None:
                if path not in tasks:
                    tasks[path] = bar.add_task(visible(path.name), total=total)
                bar.update(tasks[path], completed=done)

            s = ingest_files(Store.create(store), files, opts, progress)
    except (IngestError, StoreError, OSError) as e:
        fail(e)
    t = Table(title=Text(visible(without_credentials(f"ingested into corpus {s.corpus!r} of {store}"))), show_header=False)
    t.add_row(cell("rows read"), cell(f"{s.rows_read:,}"))
    t.add_row(cell("rows written"), cell(f"{s.rows_written:,} ({s.rows_labelled:,} labelled)"))
    t.add_row(cell("parts"), cell(f"{len(s.parts)} (part {s.parts[0]}..{s.parts[-1]})" if s.parts else "0"))
    t.add_row(cell("label names"), cell(", ".join(s.label_names) if s.label_names else "(none: unlabeled)"))
    if s.positive_label:
        t.add_row(cell("positive label"), cell(s.positive_label))
    for reason, n in sorted(s.bad.items()):
        t.add_row(Text(f"bad: {reason}", "red"), cell(f"{n:,}"))
    t.add_row(cell("bad rows"), cell(f"{sum(s.bad.values()):,}" + (f" -> {s.quarantine}" if s.quarantine else "")))
    t.add_row(cell("time"), cell(f"{s.seconds:.2f} s ({s.rows_per_second:,.0f} rows/s)"))
    out.print(t)


@app.command()
def mine(
    store: str = typer.Option(..., "--store", "-s", help="The label store, created if missing: a folder or a URI."),
    corpus: str = typer.Option(..., "--corpus", "-c", help="The unlabeled corpus to write (or append to)."),
    questions: list[Path] = typer.Option(..., "--questions", exists=True, dir_okay=False,
                                         help="Questions: .txt (a line each), .jsonl, .csv, .tsv or .parquet; repeat."),
    passages: list[Path] = typer.Option(..., "--passages", exists=True, dir_okay=False,
                                        help="The passage pool, in the same formats; repeat."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="Passages kept per question (score > 0 only)."),
    question_field: str = typer.Option("question", "--question-field", help="The questions' key or column."),
    passage_field: str = typer.Option("text", "--passage-field", help="The passages' key or column."),
    exclude: list[str] = typer.Option([], "--exclude", help="A corpus of the store whose questions (text_a) are "
                                                            "left out, e.g. dev and test; repeat."),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="The teachers' label space, e.g. 0,1."),
    part_rows: int = typer.Option(50_000, "--part-rows", help="Rows per corpus part."),
):
    """Pair questions with their top-k passages by BM25 into an unlabeled stage-1 corpus (bm25s)."""
    from tmkd.data.ingest import IngestError, parse_names
    from tmkd.data.mine import MineOptions, mine as mine_pairs

    try:
        opts = MineOptions(corpus, top_k, question_field, passage_field, list(exclude), parse_names(label_names),
                           part_rows)
        with err.status("mining: indexing the passages, ranking them for every question"):
            s = mine_pairs(Store.create(store), list(questions), list(passages), opts)
    except (IngestError, StoreError, OSError) as e:
        fail(e)
    for reason, n in sorted({**s.skipped, **{f"bad pair: {r}": n for r, n in s.ingest.bad.items()}}.items()):
        say(err, f"{n:,} {reason}", "yellow", "skipped: ")
    say(out, f"mined {s.found:,} pairs ({s.pairs:,} new) for {s.questions - s.unmatched:,} of {s.questions:,} questions "
             f"({s.unmatched:,} share no term with any passage) from {s.passages:,} passages, top {top_k}, in "
             f"{s.seconds:.1f} s ({s.questions / max(s.seconds, 1e-9):,.0f} questions/s) -> corpus {corpus!r} "
             f"of {store}, parts {s.ingest.parts}")


def main() -> None:
    """`tmkd-label`: the app, then a plain exit without the interpreter's teardown, where a C++
    library's thread aborted an exit now and then (SIGABRT after the work was done: `verify` once
    exited 134 in ~100 runs). Every file is written and closed by then."""
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

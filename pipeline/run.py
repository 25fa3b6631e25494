"""`tmkd-label run`: score every corpus part with every teacher, once.

Work unit = (teacher, corpus part). A unit whose label part is committed with the current
teacher fingerprint and corpus digest is skipped, so a second run loads no model and does
no forward pass; a killed run, started again, redoes only the units it had not committed.

Corpus parts are spread over processes: part i goes to global rank i mod world, where the
global rank combines the launcher's rank (accelerate / torchrun set RANK and WORLD_SIZE)
with ``--shard i/n`` for independent nodes. Every rank writes its own files; nothing is
gathered. Within a rank, reading and tokenizing the next part and writing finished parts
run in background threads, overlapping the forward passes.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.cpu import bound_cpu_caches, release_free_memory
from pipeline.store import CorpusPart, Store, StoreError, TeacherRecord
from teachers.spec import TeacherError, TeacherSpec, check_label_space, load_teachers_toml, make_record


@dataclass
class RunOptions:
    store: Path
    teachers: Path
    replace: bool = False
    corpora: list[str] | None = None  # None: every corpus in the store
    shard: str = "0/1"  # this node's share, "i/n", for runs on independent nodes
    device: str | None = None  # None: this rank's GPU if there is one, else the CPU
    logits_dtype: str = "float32"  # float32 | float16 (halves the store; DuckDB reads both)


@dataclass
class RunSummary:
    rank: int
    world: int
    pid: int
    host: str
    device: str
    units_scored: int = 0
    units_skipped: int = 0
    pairs: int = 0
    forward_passes: int = 0
    seconds: float = 0.0  # the whole run, from opening the store to the run log
    scoring_seconds: float = 0.0  # from the first part read to the last part written (models loaded)
    teachers: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    scored: list[list] = field(default_factory=list)  # [teacher, corpus, part] per unit scored
    log_path: str = ""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise StoreError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise StoreError(f"--shard {shard!r}: need 0 <= i < n")
    return i, n


def global_rank(shard: str) -> tuple[int, int]:
    """(rank, world) over launcher processes × independent shards."""
    i, n = parse_shard(shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return i * world + rank, n * world


def pick_device(device: str | None):
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def register_teachers(store: Store, specs: list[TeacherSpec], corpora: list[str], replace: bool):
    """Fingerprint each teacher, refuse changed checkpoints and wrong label spaces, record them."""
    known = store.teachers()
    manifests = {c: store.corpus(c) for c in corpora}
    out = []
    for spec in specs:
        record, folder = make_record(spec)
        old = known.get(spec.name)
        if old is not None and old.fingerprint != record.fingerprint and not replace:
            raise TeacherError(
                f"teacher {spec.name!r} changed: the store has fingerprint {old.fingerprint[:19]}… "
                f"(from {old.path}), the checkpoint now gives {record.fingerprint[:19]}…. Give it a new name, "
                "or pass --replace to re-score it (its old labels then count as stale)"
            )
        for c in corpora:
            if record.scores(c):
                check_label_space(record, manifests[c])
        if old != record:
            store.write_teacher(record)
        out.append((spec, record, folder))
    return out


def plan_units(store: Store, records: list[TeacherRecord], corpora: list[str], rank: int, world: int):
    """This rank's corpus parts, each with the teachers that still have to score it; and the skip count."""
    parts = [p for c in corpora for p in store.corpus(c).parts]
    mine, skipped = [], 0
    for i, part in enumerate(parts):
        if i % world != rank:
            continue
        todo = []
        for rec in records:
            if not rec.scores(part.corpus):
                continue
            if store.check_label(rec, part).status == "ok":
                skipped += 1
            else:
                todo.append(rec)
        if todo:
            mine.append((part, todo))
    return mine, skipped


def run(opts: RunOptions, console: Console | None = None) -> RunSummary:
    bound_cpu_caches()
    console = console or Console(stderr=True)
    start = time.perf_counter()
    store = Store(opts.store)
    if opts.logits_dtype not in ("float32", "float16"):
        raise StoreError(f"--logits-dtype {opts.logits_dtype!r}: use float32 or float16")
    corpora = opts.corpora or store.corpora()
    for c in corpora:
        store.corpus(c)  # a clear error for an unknown corpus
    if not corpora:
        raise StoreError(f"{store.root}: no corpora yet; add one with `tmkd-label ingest`")
    rank, world = global_rank(opts.shard)
    teachers = register_teachers(store, load_teachers_toml(opts.teachers), corpora, opts.replace)
    records = [rec for _, rec, _ in teachers]
    plan, skipped = plan_units(store, records, corpora, rank, world)

    device = pick_device(opts.device) if plan else None
    summary = RunSummary(rank, world, os.getpid(), socket.gethostname(), str(device or "none"))
    summary.units_skipped = skipped
    summary.teachers = {r.name: r.fingerprint for r in records}
    if plan:
        _score_plan(store, plan, teachers, device, opts, summary, console)
    summary.seconds = time.perf_counter() - start
    summary.log_path = str(store.write_run_log({**asdict(summary), "pairs_per_s": summary.pairs_per_s,
                                                "options": {k: str(v) for k, v in asdict(opts).items()}}, rank))
    return summary


def _score_plan(store, plan, teachers, device, opts, summary, console) -> None:
    from transformers.utils import logging as hf_logging

    from teachers.scoring import LoadedTeacher, encode_pairs, load_tokenizer

    hf_logging.disable_progress_bar()  # our own bar is the one that matters

    needed = {rec.name for _, todo in plan for rec in todo}
    tokenizers, loaded = {}, {}
    for spec, rec, folder in teachers:
        if rec.name not in needed:
            continue  # nothing to score: never load the model
        if rec.tokenizer_fingerprint not in tokenizers:
            tokenizers[rec.tokenizer_fingerprint] = (load_tokenizer(folder), spec)
        loaded[rec.name] = LoadedTeacher(spec, rec, folder, device, tokenizers[rec.tokenizer_fingerprint][0])

    def prepare(part: CorpusPart, todo: list[TeacherRecord]):
        """Read a part and tokenize it once per distinct tokenizer its teachers use."""
        table = store.read_corpus_part(part, ["id", "text_a", "text_b"])
        a, b = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()
        encs = {}
        for fp in dict.fromkeys(r.tokenizer_fingerprint for r in todo):
            tok, spec = tokenizers[fp]
            encs[fp] = encode_pairs(tok, a, b, spec.max_length, spec.truncation)
        return table.column("id").to_numpy(), encs

    started = time.perf_counter()
    total = sum(part.rows * len(todo) for part, todo in plan)
    label = f"scoring (rank {summary.rank}/{summary.world})" if summary.world > 1 else "scoring"
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
        TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal,
    )
    with progress, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        task = progress.add_task(label, total=total)
        ahead = deque(reader.submit(prepare, *unit) for unit in plan[:2])
        writes = []
        for i, (part, todo) in enumerate(plan):
            ids, encs = ahead.popleft().result()
            if i + 2 < len(plan):
                ahead.append(reader.submit(prepare, *plan[i + 2]))
            for rec in todo:
                teacher = loaded[rec.name]
                progress.update(task, description=f"{label}: {rec.name} × {part.corpus}/{part.part:05d}")
                logits = teacher.score(encs[rec.tokenizer_fingerprint], on_batch=lambda n: progress.advance(task, n))
                writes.append(writer.submit(store.write_label_part, rec, part, ids, logits,
                                            opts.logits_dtype, teacher.compute_dtype))
                summary.units_scored += 1
                summary.pairs += part.rows
                summary.scored.append([rec.name, part.corpus, part.part])
            # surface a failed write early rather than after hours of scoring
            while writes and writes[0].done():
                writes.pop(0).result()
            del encs, ids, logits
            release_free_memory()
        for w in writes:
            w.result()
    summary.scoring_seconds = time.perf_counter() - started
    summary.forward_passes = sum(t.forward_passes for t in loaded.values())

"""`tmkd-label run`: score every corpus part with every teacher, once.

Work unit = (teacher, corpus part). A unit whose label part is committed with the current
teacher fingerprint and corpus digest is skipped, so a second run loads no model and does
no forward pass; a killed run, started again, redoes only the units it had not committed.

Before anything is scored, every unit is checked with the store's one rule
(``Store.check_label``: commit record, digest, checksums, ids, finite logits). A damaged or
stale label part counts as not done and is scored again, and the summary says so. A corpus
part that does not match its manifest digest stops the run before anything is written.

Workers share the store through claims (data/claims.py): each unit is claimed with a
lease before it is scored, so any number of runs started on one store (processes, nodes)
divide the units between them and score each exactly once; a unit whose worker died is
taken over when its lease expires. A run ends when every unit it planned is committed, by
itself or by another worker. Corpus parts are also spread statically: part i goes to global
rank i mod world, where the global rank combines the launcher's rank (accelerate / torchrun
set RANK and WORLD_SIZE) with ``--shard i/n``. Within a worker, reading and tokenizing the
next part and writing finished parts run in background threads, overlapping the forward passes.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tmkd.data.claims import DEFAULT_LEASE_S, ClaimLost, Claims, remove_dead_temporaries
from tmkd.teachers.cpu import bound_cpu_caches, release_free_memory
from tmkd.data.store import CommitRaceError, CorruptPartError, CorpusPart, Store, StoreError, TeacherRecord, remove_stale_tmp
from tmkd.teachers.spec import TeacherError, TeacherSpec, check_label_space, load_teachers_toml, make_record

if TYPE_CHECKING:
    from tmkd.pipeline.ray_engine import RayOptions


@dataclass
class RunOptions:
    store: str | Path  # a folder or a URI (data/fs.py)
    teachers: Path
    replace: bool = False
    corpora: list[str] | None = None  # None: every corpus in the store
    shard: str = "0/1"  # this node's share, "i/n", for runs on independent nodes
    device: str | None = None  # None: this rank's GPU if there is one, else the CPU
    logits_dtype: str = "float32"  # float32 | float16 (halves the store; DuckDB reads both)
    lease_s: float = DEFAULT_LEASE_S  # a claim untouched this long belongs to a dead worker
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE overrides of teachers.toml
    engine: str = "local"  # local (this process, its accelerate rank, --shard) | ray (actors on a Ray cluster)
    ray: "RayOptions | None" = None  # --address, --workers, --gpus-per-worker, --cpus-per-worker


@dataclass
class RunSummary:
    rank: int
    world: int
    pid: int
    host: str
    device: str
    units_scored: int = 0
    units_skipped: int = 0  # already committed, current and intact when this run planned
    units_by_others: int = 0  # committed by another worker sharing the store while this one ran
    units_lost: int = 0  # claims lost after a stall: the result was dropped, another worker committed it
    rescored: list[list] = field(default_factory=list)  # [teacher, corpus, part, reason] per invalid part redone
    temporaries_removed: int = 0
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
    """The torch device to score on; a device that does not exist here is a user error."""
    import torch

    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise StoreError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise StoreError(f"--device {device!r}: this machine has no CUDA device")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StoreError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def check_teachers(store: Store, specs: list[TeacherSpec], corpora: list[str], replace: bool):
    """Fingerprint each teacher (its weights, config and max_length checked), refuse changed checkpoints,
    corpora the store lacks and wrong label spaces. Writes nothing: a run records its teachers only once
    all of them passed."""
    known = store.teachers()
    manifests = {c: store.corpus(c) for c in corpora}
    present = store.corpora()
    out = []
    for spec in specs:
        for c in spec.corpora or ():  # as --corpus does: a corpus the store lacks is a mistake, not "nothing to do"
            if c not in present:
                spec.refuse(f"corpora: no corpus {c!r} in {store.root} (corpora in the store: "
                            f"{', '.join(present) or 'none'})", "corpora")
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
        out.append((spec, record, folder))
    return out


def check_compilers(teachers: list, plan: list["Unit"]) -> None:
    """A teacher with compile = true that has work here needs a C++ compiler: refused before it is
    recorded (scoring would stop at its first forward), not on a store with nothing left to score."""
    busy = {rec.name for unit in plan for rec in unit.teachers}
    for spec, rec, _ in teachers:
        if spec.compile and rec.name in busy:
            from tmkd.teachers.scoring import check_compiler

            check_compiler(spec)


def record_teachers(store: Store, records: list[TeacherRecord], replace: bool) -> None:
    """Write the records of new or changed teachers (a name another run recorded meanwhile with
    another checkpoint is refused, as it would have been had that run come first)."""
    for record in records:
        store.record_teacher(record, replace)


@dataclass
class Unit:
    """One corpus part with the teachers that still have to score it."""

    part: CorpusPart
    teachers: list[TeacherRecord]
    seen: dict[str, str | None]  # teacher -> commit id of its commit record when planned (None: none)


def plan_units(store: Store, records: list[TeacherRecord], corpora: list[str], rank: int, world: int):
    """This rank's units still to score, the count already done, and the invalid parts found.

    Every committed label part is checked in full against its corpus part (digest, checksums,
    ids, finite logits): a damaged or stale one is planned again, never skipped. A corpus part
    that fails its digest is an error before anything is written."""
    parts = [p for c in corpora for p in store.corpus(c).parts]
    units, skipped, invalid, corrupt = [], 0, [], []
    for i, part in enumerate(parts):
        if i % world != rank:
            continue
        mine = [rec for rec in records if rec.scores(part.corpus)]
        if not mine:
            continue
        try:
            ids = store.read_corpus_part(part, ["id"]).column("id").to_numpy()
        except CorruptPartError as e:
            corrupt.append(str(e))
            continue
        todo, seen = [], {}
        for rec in mine:
            check = store.check_label(rec, part, corpus_ids=ids)
            if check.status == "ok":
                skipped += 1
                continue
            if check.invalid:
                invalid.append([rec.name, part.corpus, part.part, check.reason])
            record = _commit_or_none(store, rec, part)
            seen[rec.name] = _commit_id(record)
            todo.append(rec)
        if todo:
            units.append(Unit(part, todo, seen))
    if corrupt:
        raise CorruptPartError(
            f"{len(corrupt)} corpus part(s) do not match the store's manifest; nothing was scored:\n  "
            + "\n  ".join(corrupt) + "\nre-ingest the corpus (or restore the files) and run again"
        )
    return units, skipped, invalid


def _commit_id(record: dict | None) -> str | None:
    """What tells one commit of a unit from another, even of the same bytes."""
    return None if record is None else record.get("commit_id") or record.get("digest")


def committed_since(store: Store, rec: TeacherRecord, part: CorpusPart, planned: str | None) -> bool:
    """Was the unit committed, intact, by another worker since it was planned (``planned``: the commit id
    seen then)? A new commit that is damaged does not count: the unit is scored again."""
    now = _commit_or_none(store, rec, part)
    return now is not None and _commit_id(now) != planned and store.check_label(rec, part, decode=False).status == "ok"


def read_and_encode(store: Store, part: CorpusPart, tokenizers: dict, fingerprints) -> tuple:
    """A corpus part's ids, read with its digest checked, and its pairs tokenized once per tokenizer
    (``tokenizers``: fingerprint -> (tokenizer, spec); teachers that share one share the encoding)."""
    from tmkd.teachers.scoring import encode_pairs

    table = store.read_corpus_part(part, ["id", "text_a", "text_b"])
    a, b = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()
    encs = {}
    for fp in dict.fromkeys(fingerprints):
        tok, spec = tokenizers[fp]
        try:
            encs[fp] = encode_pairs(tok, a, b, spec.max_length, spec.truncation)
        except Exception as e:  # the fast tokenizer's: only_first / only_second cannot cut a pair short enough
            if "Truncation error" not in str(e):
                raise
            raise TeacherError(f"teacher {spec.name!r}: truncation {spec.truncation!r} cannot cut a pair of "
                               f"{part.corpus}/{part.part:05d} to max_length {spec.max_length} (the other text "
                               "alone is longer); use truncation = \"longest_first\" or a larger max_length") from None
    return table.column("id").to_numpy(), encs


def _commit_or_none(store: Store, rec: TeacherRecord, part: CorpusPart) -> dict | None:
    try:
        return store.label_commit(rec.name, part.corpus, part.part)
    except CorruptPartError:
        return None


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
    if opts.engine not in ("local", "ray"):
        raise StoreError(f"--engine {opts.engine!r}: use local or ray")
    if opts.engine == "local" and opts.ray is not None:
        raise StoreError("--address, --workers, --gpus-per-worker and --cpus-per-worker go with --engine ray")
    if opts.ray is not None:
        opts.ray.check()
    rank, world = global_rank(opts.shard)
    teachers = check_teachers(store, load_teachers_toml(opts.teachers, opts.sets), corpora, opts.replace)
    records = [rec for _, rec, _ in teachers]
    plan, skipped, invalid = plan_units(store, records, corpora, rank, world)  # refuses damaged corpus parts
    claims = Claims(store, opts.lease_s)  # checks --lease
    local = opts.engine == "local"
    device = pick_device(opts.device) if local and (plan or opts.device) else None  # checks --device
    if local:
        check_compilers(teachers, plan)
    cluster = None
    if not local and plan:  # joins or starts Ray and sizes the actors: a bad option stops here
        from tmkd.pipeline.ray_engine import RayOptions, connect

        cluster = connect(opts.ray or RayOptions())
    summary = RunSummary(rank, world, os.getpid(), socket.gethostname(), str(device or "none"))
    summary.units_skipped = skipped
    summary.teachers = {r.name: r.fingerprint for r in records}
    try:
        store.upgrade()  # nothing was written before this line
        record_teachers(store, records, opts.replace)
        with claims:
            summary.temporaries_removed = remove_dead_temporaries(store, claims)
            if plan and local:
                _score_plan(store, plan, teachers, device, opts, summary, console, claims, invalid)
            elif plan:
                from tmkd.pipeline.ray_engine import score_on_ray

                units = [(rec.name, unit.part.corpus, unit.part.part, unit.seen[rec.name])
                         for unit in plan for rec in unit.teachers]
                score_on_ray(store, units, teachers, opts, cluster, summary, console)
                scored = {tuple(u) for u in summary.scored}
                summary.rescored = [list(x) for x in invalid if tuple(x[:3]) in scored]
    finally:
        if cluster is not None:
            cluster.ray.shutdown()  # the local cluster this run started stops; a shared one is left running
    summary.seconds = time.perf_counter() - start
    log_path = store.run_log_path(rank)
    summary.log_path = str(log_path)
    store.write_run_log({**asdict(summary), "pairs_per_s": summary.pairs_per_s,
                         "options": {k: str(v) for k, v in asdict(opts).items()}}, log_path)
    return summary


def _next_claimed(store: Store, pending: list[Unit], claims: Claims, summary: RunSummary, block: bool):
    """Claim the next part's units that no other worker holds; None when there is nothing to take
    now (``block``: wait for other workers' units to be committed or their leases to expire)."""
    while pending:
        for unit in list(pending):
            got = []
            for rec in list(unit.teachers):
                part = unit.part
                if not claims.try_claim(rec.name, part.corpus, part.part):
                    continue  # another worker holds it: come back later
                unit.teachers.remove(rec)
                if committed_since(store, rec, part, unit.seen[rec.name]):
                    claims.release(rec.name, part.corpus, part.part)  # committed by another worker meanwhile
                    summary.units_by_others += 1
                    continue
                summary.temporaries_removed += remove_stale_tmp(
                    store.label_path(rec.name, part.corpus, part.part), keep=claims.token)
                got.append(rec)
            if not unit.teachers:
                pending.remove(unit)
            if got:
                return unit.part, got
        if not block or not pending:
            return None
        time.sleep(min(2.0, claims.lease_s / 8))  # others hold the rest: wait for commits or expiry
    return None


def _score_plan(store, plan, teachers, device, opts, summary, console, claims: Claims, invalid: list) -> None:
    from transformers.utils import logging as hf_logging

    from tmkd.teachers.scoring import LoadedTeacher, load_tokenizer

    hf_logging.disable_progress_bar()  # our own bar is the one that matters

    needed = {rec.name for unit in plan for rec in unit.teachers}
    tokenizers, loaded = {}, {}
    for spec, rec, folder in teachers:
        if rec.name not in needed:
            continue  # nothing to score: never load the model
        if rec.tokenizer_fingerprint not in tokenizers:
            tokenizers[rec.tokenizer_fingerprint] = (load_tokenizer(folder), spec)
        loaded[rec.name] = LoadedTeacher(spec, rec, folder, device, tokenizers[rec.tokenizer_fingerprint][0])

    def prepare(part: CorpusPart, todo: list[TeacherRecord]):
        return read_and_encode(store, part, tokenizers, [r.tokenizer_fingerprint for r in todo])

    def write(rec, part, ids, logits, compute_dtype):
        """Commit a unit while still holding its claim; a lost claim drops the result, loudly."""
        try:
            store.write_label_part(rec, part, ids, logits, opts.logits_dtype, compute_dtype, token=claims.token,
                                   still_mine=lambda: claims.check_held(rec.name, part.corpus, part.part))
        except (ClaimLost, CommitRaceError) as e:
            summary.units_lost += 1
            console.print(f"warning: {e}", markup=False, highlight=False)
            return
        finally:
            claims.release(rec.name, part.corpus, part.part)
        summary.units_scored += 1
        summary.pairs += part.rows
        summary.scored.append([rec.name, part.corpus, part.part])
        if (rec.name, part.corpus, part.part) in redo:
            summary.rescored.append(list(redo[(rec.name, part.corpus, part.part)]))

    redo = {(t, c, p): (t, c, p, why) for t, c, p, why in invalid}
    pending = list(plan)
    started = time.perf_counter()
    total = sum(unit.part.rows * len(unit.teachers) for unit in plan)
    label = f"scoring (rank {summary.rank}/{summary.world})" if summary.world > 1 else "scoring"
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
        TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal,
    )
    with progress, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        task = progress.add_task(label, total=total)
        ahead: deque = deque()

        def fill(block: bool) -> None:
            """Claim and start preparing up to two parts ahead of the one being scored."""
            while len(ahead) < 2:
                unit = _next_claimed(store, pending, claims, summary, block=block and not ahead)
                if unit is None:
                    return
                ahead.append((*unit, reader.submit(prepare, *unit)))

        fill(block=True)
        writes = []
        while ahead:
            part, todo, prepared = ahead.popleft()
            fill(block=False)
            ids, encs = prepared.result()
            for rec in todo:
                teacher = loaded[rec.name]
                progress.update(task, description=f"{label}: {rec.name} × {part.corpus}/{part.part:05d}")
                logits = teacher.score(encs[rec.tokenizer_fingerprint], on_batch=lambda n: progress.advance(task, n))
                writes.append(writer.submit(write, rec, part, ids, logits, teacher.compute_dtype))
            # surface a failed write early rather than after hours of scoring
            while writes and writes[0].done():
                writes.pop(0).result()
            del encs, ids, logits
            release_free_memory()
            if not ahead:
                fill(block=True)  # only units other workers hold are left: wait for them
        for w in writes:
            w.result()
    summary.scoring_seconds = time.perf_counter() - started
    summary.forward_passes = sum(t.forward_passes for t in loaded.values())

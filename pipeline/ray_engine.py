"""`tmkd-label run --engine ray`: the units (teacher × corpus part) scored by Ray actors across a cluster.

The driver plans the units exactly as the local engine does (pipeline/run.py), then hands them
to actors, one unit at a time. Each actor holds one GPU (``--gpus-per-worker``) or some CPUs,
loads its teachers once, and for each unit: claims it (data/claims.py, the same claims the local
engine and other runs use), reads and tokenizes the corpus part, scores it and commits it
straight to the store (data/store.py's commit protocol). Nothing but a small status dict comes
back to the driver.

Failures: a unit whose actor dies (a crash, a lost node, kill -9) goes back to the queue and to
the next live actor; a replacement actor is started and admitted once its teachers have loaded.
Ray's own task retries are not used: they send a unit back to the same actor once it restarts,
and a unit on a lost node waits for capacity that may not come. Retries are at least once: an
actor that dies right after a commit leaves a unit that the next actor finds committed (the
store's check) and skips. Every actor is killed when the run ends, however it ends.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass

from tmkd.data.store import StoreError

ACTOR_RESTARTS = 3  # replacements per original actor before the run gives up


@dataclass
class RayOptions:
    address: str | None = None  # None: the cluster in RAY_ADDRESS, else a new local one; "auto"; ray://host:port
    workers: int = 0  # 0: as many as the cluster's GPUs (or CPUs) allow
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        """Refuse impossible values before anything is written or started."""
        gpus = 0.0 if self.gpus_per_worker is None else self.gpus_per_worker
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise StoreError(f"--workers {self.workers}: a number of actors >= 0 (0: as many as fit)")
        if not (math.isfinite(gpus) and gpus >= 0):
            raise StoreError(f"--gpus-per-worker {self.gpus_per_worker}: a number >= 0")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise StoreError(f"--cpus-per-worker {self.cpus_per_worker}: a number > 0")


@dataclass
class Cluster:
    """A connected Ray and the actors it can hold."""

    ray: object
    workers: int
    gpus: float
    cpus: float


# Settings an actor needs to reach the same store; no secret: each node finds its own credentials
# (instance role, ~/.aws, its environment), as the driver does.
PASSED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


class ScoringWorker:
    """One Ray actor: its teachers loaded once, then units scored and committed one by one."""

    def __init__(self, store_root: str, teachers: list, logits_dtype: str, lease_s: float, threads: int):
        import torch

        from tmkd.data.claims import Claims
        from tmkd.data.store import Store
        from tmkd.pipeline.run import pick_device
        from tmkd.teachers.cpu import bound_cpu_caches
        from tmkd.teachers.scoring import LoadedTeacher, load_tokenizer

        bound_cpu_caches()
        if threads:
            torch.set_num_threads(threads)
        self.store = Store(store_root)
        self.claims = Claims(self.store, lease_s).__enter__()  # renews this actor's leases in a thread
        self.logits_dtype = logits_dtype
        device = pick_device(None)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        tokenizers, self.teachers = {}, {}
        for spec, rec, folder in teachers:
            if rec.tokenizer_fingerprint not in tokenizers:
                tokenizers[rec.tokenizer_fingerprint] = load_tokenizer(folder)
            self.teachers[rec.name] = LoadedTeacher(spec, rec, folder, device, tokenizers[rec.tokenizer_fingerprint])

    def ready(self) -> dict:
        """Called once: returns when the teachers are loaded (a replacement is admitted only then)."""
        import socket

        return {"host": socket.gethostname(), "pid": os.getpid()}

    def close(self) -> None:
        """Release this actor's claims (called before it is killed)."""
        self.claims.__exit__(None, None, None)

    def score(self, teacher: str, corpus: str, part_number: int, planned_commit: str | None) -> dict:
        """Claim, score and commit one unit; the status says what happened. ``planned_commit``: the
        commit the driver saw when it planned the unit (None: none); another one means the unit was
        committed since, by another worker or by an actor that died right after its commit."""
        from tmkd.data.claims import ClaimLost
        from tmkd.data.store import CommitRaceError, remove_stale_tmp
        from tmkd.pipeline.run import committed_since, read_and_encode
        from tmkd.teachers.cpu import release_free_memory

        loaded, fp = self.teachers[teacher], self.teachers[teacher].record.tokenizer_fingerprint
        part = next(p for p in self.store.corpus(corpus).parts if p.part == part_number)
        if committed_since(self.store, loaded.record, part, planned_commit):
            return {"status": "committed"}
        if not self.claims.try_claim(teacher, corpus, part_number):
            return {"status": "held"}  # another worker is on it: ask again later
        if committed_since(self.store, loaded.record, part, planned_commit):  # while we claimed it
            self.claims.release(teacher, corpus, part_number)
            return {"status": "committed"}
        try:
            remove_stale_tmp(self.store.label_path(teacher, corpus, part_number), keep=self.claims.token)
            ids, encs = read_and_encode(self.store, part, {fp: (loaded.tokenizer, loaded.spec)}, [fp])
            before = loaded.forward_passes
            logits = loaded.score(encs[fp])
            self.store.write_label_part(
                loaded.record, part, ids, logits, self.logits_dtype, loaded.compute_dtype,
                token=self.claims.token, still_mine=lambda: self.claims.check_held(teacher, corpus, part_number))
        except (ClaimLost, CommitRaceError) as e:
            return {"status": "lost", "message": str(e)}
        finally:
            self.claims.release(teacher, corpus, part_number)
            release_free_memory()
        return {"status": "scored", "pairs": part.rows, "forward_passes": loaded.forward_passes - before}


def connect(opts: RayOptions) -> Cluster:
    """Start or join the Ray cluster and size the actors, before the run writes anything."""
    opts.check()
    try:
        import ray
    except ImportError:
        raise StoreError("--engine ray needs Ray: pip install -e \".[ray]\" from the checkout") from None
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        ray.init(address=opts.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": env} if env else None)
    total = ray.cluster_resources()
    gpus = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
    fits = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 0) // opts.cpus_per_worker)
    if fits < 1:
        raise StoreError(f"the Ray cluster has {total.get('GPU', 0):g} GPU(s) and {total.get('CPU', 0):g} CPU(s): "
                         f"not enough for one worker of {gpus:g} GPU(s) and {opts.cpus_per_worker:g} CPU(s)")
    return Cluster(ray, min(opts.workers, fits) if opts.workers else fits, gpus, opts.cpus_per_worker)


def score_on_ray(store, units: list[tuple], teachers: list, opts, cluster: Cluster, summary, console) -> None:
    """Score ``units`` (teacher, corpus, part, planned commit) with Ray actors; fills ``summary``'s counts."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    ray, n, gpus, cpus = cluster.ray, cluster.workers, cluster.gpus, cluster.cpus
    needed = {u[0] for u in units}
    mine = [(spec, rec, folder) for spec, rec, folder in teachers if rec.name in needed]
    actor_class = ray.remote(ScoringWorker)

    def start():
        actor = actor_class.options(num_gpus=gpus, num_cpus=cpus, max_restarts=0).remote(
            str(store.root), mine, opts.logits_dtype, opts.lease_s, int(cpus) if not gpus else 0)
        return actor, actor.ready.remote()

    queue, in_flight, starting, idle, every, later = deque(units), {}, {}, [], [], []
    replacements = ACTOR_RESTARTS * n
    summary.device = f"ray: {n} worker(s), {gpus:g} GPU and {cpus:g} CPU each"
    started = time.perf_counter()
    try:
        for _ in range(n):
            actor, ready = start()
            every.append(actor)
            starting[ready] = actor
        while queue or in_flight or later:
            now = time.time()
            queue.extend(unit for due, unit in later if due <= now)  # units another run held: ask again
            later = [(due, unit) for due, unit in later if due > now]
            while idle and queue:
                actor, unit = idle.pop(), queue.popleft()
                in_flight[actor.score.remote(*unit)] = (actor, unit)
            if not in_flight and not starting and not later:
                raise StoreError("every Ray worker died; the units left are scored by the next run")
            done, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=0.5 if later else None)
            if not done:
                continue
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except RayActorError:
                    replacements = _replace(actor, replacements, start, starting, every, console)
                continue
            actor, unit = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:  # the actor died with the unit: another actor takes the unit
                queue.append(unit)
                replacements = _replace(actor, replacements, start, starting, every, console)
                continue
            except RayTaskError as e:  # the unit itself failed (a NaN teacher, a damaged part): one line, as locally
                cause = getattr(e, "cause", None) or e
                raise StoreError(f"{unit[0]} × {unit[1]}/{unit[2]}: {cause}") from None
            idle.append(actor)
            _count(result, unit, summary, console, later)
    finally:
        try:  # release the live actors' claims (a unit cut short is free at once, on any node)
            ray.get([actor.close.remote() for actor in every], timeout=10)
        except (RayActorError, GetTimeoutError):
            pass
        for actor in every:
            ray.kill(actor, no_restart=True)
    summary.scoring_seconds = time.perf_counter() - started


def _replace(dead, left: int, start, starting: dict, every: list, console) -> int:
    """Start a replacement for a dead actor (admitted once its teachers have loaded)."""
    if left <= 0:
        return left
    console.print(f"warning: a Ray worker died; starting a replacement ({left - 1} more allowed)",
                  markup=False, highlight=False)
    actor, ready = start()
    every.append(actor)
    starting[ready] = actor
    return left - 1


def _count(result: dict, unit: tuple, summary, console, later: list) -> None:
    status = result["status"]
    if status == "scored":
        summary.units_scored += 1
        summary.pairs += result["pairs"]
        summary.forward_passes += result["forward_passes"]
        summary.scored.append(list(unit[:3]))
    elif status == "committed":
        summary.units_by_others += 1
    elif status == "held":  # another run holds it: ask again in a moment, until it is committed or expires
        later.append((time.time() + 0.5, unit))
    elif status == "lost":
        summary.units_lost += 1
        console.print(f"warning: {result['message']}", markup=False, highlight=False)

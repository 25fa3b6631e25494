"""Train a TMKD student from the label store.

    accelerate launch student/train.py --config student.toml [--set stages.0.lr=5e-5] [--resume]
    python student/train.py --config student.toml

One readable loop: stages -> epochs -> batches, with the accelerator threaded through
(devices, mixed precision, DDP). See student/config.py for the config schema and
student/data.py for the data order. Output folder::

    OUT/config.json, model.safetensors, tokenizer files   the exported (folded) student, best epoch
    OUT/run.json                                          teachers + fingerprints, corpora + part digests, config
    OUT/metrics.jsonl                                     one line per (stage, epoch)
    OUT/checkpoints/step-NNNNNNNN/                        model, optimizer, scheduler, RNG per rank, position
    OUT/checkpoints/best-NNNNNNNN/                        export of the best epoch so far (the step it ended)
    OUT/ranks/rank-R.json                                 what each process saw (rows, id checksum) + weight digest

Gradient accumulation: the data stream is per-rank and not wrapped by accelerate, so the loop
decides where accumulation windows end (every N batches and at the end of every epoch: a
checkpoint never holds half a window) and uses ``accelerator.no_sync`` inside a window.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field

from tmkd.student.config import ConfigError, TrainConfig, load_config

KILL_ENV = "TMKD_STUDENT_KILL_AT_STEP"  # test hook: SIGKILL this process after that optimizer step


class TrainError(Exception):
    """A user-facing problem found while setting up or running training."""


@dataclass
class Position:
    """Where the data stream stands: the next batch to train is batch ``batch`` of (stage, epoch)."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class RunResult:
    output: Path
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)


# ---- setup helpers ----------------------------------------------------------------------------
def label_space(cfg: TrainConfig, store, teachers) -> list[str]:
    """The task's label names, after checking every teacher and every named corpus agree on them.

    One rule for the whole project (tmkd.data.store.label_space_mismatch): counts match, names match in
    order unless one side has only generic LABEL_i names; a corpus without labels takes any teacher.
    The names returned are the first meaningful ones (a corpus's or a teacher's), for the export.
    """
    from tmkd.data.store import GENERIC_LABEL, LabelSpaceError, StoreError, label_space_mismatch

    for t in teachers[1:]:
        msg = label_space_mismatch(t.name, t.label_names, f"teacher {teachers[0].name!r}", teachers[0].label_names)
        if msg:
            raise LabelSpaceError(msg)
    stage_corpora = [c for s in cfg.stages for c in s.corpora]
    labelled: list[tuple[str, list[str]]] = []  # (corpus, label names), each declaring a label space
    for c in dict.fromkeys(stage_corpora + ([cfg.eval.corpus] if cfg.eval.corpus else [])):
        m = store.corpus(c)  # StoreError naming the known corpora if absent
        if not m.parts:
            raise StoreError(f"corpus {c!r} has no committed parts")
        if m.label_names is None:
            if not teachers and c in stage_corpora:
                raise TrainError(f"corpus {c!r} has no labels and there are no teachers: nothing to learn from "
                                 "(no-KD trains on labelled corpora only)")
            continue
        for t in teachers:
            msg = label_space_mismatch(t.name, t.label_names, f"corpus {c!r}", m.label_names)
            if msg:
                raise LabelSpaceError(msg)
        if not teachers and labelled:  # no-KD: the corpora must agree among themselves, by the same rule
            first, names = labelled[0]
            if label_space_mismatch(first, names, f"corpus {c!r}", m.label_names):
                raise LabelSpaceError(f"corpus {c!r} has labels {m.label_names}, corpus {first!r} has {names} "
                                      "(order matters)")
        labelled.append((c, m.label_names))
    if cfg.eval.corpus and cfg.eval.metric in ("map", "mrr"):
        has_groups = any(store.read_corpus_part(p, ["group"]).column("group").null_count < p.rows
                         for p in store.corpus(cfg.eval.corpus).parts)
        if not has_groups:
            raise TrainError(f"eval.metric = {cfg.eval.metric!r} ranks candidates by group, but corpus "
                             f"{cfg.eval.corpus!r} has no groups; use accuracy or f1")
    spaces = [t.label_names for t in teachers] + [names for _, names in labelled]
    if not spaces:
        raise TrainError("no label space: without teachers at least one corpus must declare label names")
    meaningful = [n for n in spaces if not any(GENERIC_LABEL.match(x) for x in n)]
    return list((meaningful or spaces)[0])


def positive_class(cfg: TrainConfig, store, label_names: list[str]) -> int | None:
    """Index of the class whose score ranks candidates (MAP/MRR) and whose F1 is reported, found by NAME.

    eval.positive_label, else the eval corpus's declared positive class, else the one label whose name
    means positive; a wrong or ambiguous name is an error before training starts, never a guess. With
    more than two labels and nothing named, None: accuracy and macro F1 need no positive class.
    """
    from tmkd.data.store import StoreError, positive_index

    if not cfg.eval.corpus:
        return None
    m = store.corpus(cfg.eval.corpus)
    names = m.label_names or label_names
    try:
        return positive_index(names, cfg.eval.positive_label, m.positive_label,
                              where=f"eval corpus {cfg.eval.corpus!r}: ")
    except StoreError:
        if cfg.eval.positive_label or m.positive_label or len(names) == 2 or cfg.eval.metric in ("map", "mrr"):
            raise
        return None


def check_labels(store, cfg: TrainConfig, teachers) -> None:
    """Refuse up front every missing, stale or damaged label part the stages need, naming them.

    Commit records and digests only: each part is decoded and checked in full (ids, finite
    logits) when the stream reads it, so the bytes are not decoded twice."""
    from tmkd.data.store import StaleLabelsError

    bad = []
    for stage in cfg.stages:
        for c in stage.corpora:
            for part in store.corpus(c).parts:
                for t in teachers:
                    chk = store.check_label(t, part, decode=False)
                    if chk.status != "ok":
                        path = store.label_path(t.name, c, part.part)
                        bad.append(f"{path} ({chk.status}{': ' + chk.reason if chk.reason else ''})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise StaleLabelsError(
            f"{len(bad)} label part(s) missing, stale or damaged for this run:\n  {shown}\n"
            "score them with `tmkd-label run`, or drop those teachers/corpora from the config"
        )


def run_record(cfg: TrainConfig, store, teachers, world: int, mixed_precision: str, status: str,
               extra: dict | None = None) -> dict:
    corpora = {}
    for c in dict.fromkeys([c for s in cfg.stages for c in s.corpora] + ([cfg.eval.corpus] if cfg.eval.corpus else [])):
        m = store.corpus(c)
        corpora[c] = {"rows": m.rows, "label_names": m.label_names,
                      "parts": [{"part": p.part, "rows": p.rows, "digest": p.digest} for p in m.parts]}
    rec = {
        "status": status,
        "variant": cfg.variant,
        "teachers": [{"name": t.name, "fingerprint": t.fingerprint, "path": t.path, "label_names": t.label_names}
                     for t in teachers],
        "teacher_weights": dict(zip(cfg.teachers, cfg.normalised_weights())),
        "corpora": corpora,
        "world_size": world,
        "mixed_precision": mixed_precision,
        "config": cfg.to_dict(),
    }
    rec.update(extra or {})
    return rec


def param_digest(model) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- checkpoints ------------------------------------------------------------------------------
# A kill at any moment leaves the last complete checkpoint usable: every folder is written under a
# hidden temporary name and takes its final name in one rename once complete; nothing is removed
# before its replacement is in place. The best epoch's export is a folder per step (best-NNNNNNNN),
# and the checkpoint's state says which one is current, so switching "best" is part of the
# checkpoint's own rename.
def write_atomic(path: Path, text: str) -> None:
    """Replace a file in one rename: a kill leaves the old or the new content, never a truncated file."""
    from tmkd.data.store import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl = one line per (stage, epoch) trained so far, rewritten whole (a kill keeps the old file)."""
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in history))


def checkpoint_complete(ckpt: Path) -> bool:
    """A step folder counts only with a readable state.json whose listed files are all there, whole."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return False
    files = state.get("files")  # absent in checkpoints from before it was recorded: trust the rename
    return files is None or all((ckpt / n).is_file() and (ckpt / n).stat().st_size == size
                                for n, size in files.items())


def _in_place(folder: Path) -> Path:
    """``folder``, or the copy ``publish`` moved aside if a kill came before the new one took its name."""
    aside = folder.with_name(f".old-{folder.name}")
    return aside if not folder.exists() and aside.exists() else folder


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; half-written folders (hidden temporaries, no state.json) never count."""
    base = out / "checkpoints"
    if not base.exists():
        return None
    steps = {p.name.removeprefix(".old-") for p in [*base.glob("step-*"), *base.glob(".old-step-*")]}
    found = [c for c in (_in_place(base / name) for name in sorted(steps)) if checkpoint_complete(c)]
    return found[-1] if found else None


def best_folder(out: Path, best: dict) -> Path:
    """The export of the best epoch ``best`` (state["best"]); runs from before per-step folders used best/."""
    folder = _in_place(out / "checkpoints" / f"best-{best['step']:08d}")
    legacy = out / "checkpoints" / "best"
    return legacy if not folder.exists() and legacy.exists() else folder


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's files and entries to disk, so a rename never publishes data still in the page cache."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Give the complete folder ``tmp`` its final name; a folder already there is moved aside first and
    removed only after the new one is in place (the same step saved again: an epoch without batches)."""
    _fsync_folder(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(base: Path, keep: int) -> None:
    """Remove the step folders beyond the newest ``keep``, best exports no kept checkpoint refers to, and
    leftovers of saves a kill interrupted. Runs only after the new checkpoint is in place."""
    steps = sorted(p for p in base.glob("step-*") if checkpoint_complete(p))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    wanted = set()
    for ckpt in steps[-keep:]:
        best = json.loads((ckpt / "state.json").read_text()).get("best")
        if best and "step" in best:
            wanted.add(f"best-{best['step']:08d}")
    for p in list(base.glob("best-*")) + list(base.glob(".tmp-*")) + list(base.glob(".old-*")):
        if p.name not in wanted:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, out: Path, step: int, pos: Position, model, optimizer, scheduler, state: dict,
                    keep: int, num_workers: int, running: dict | None = None) -> None:
    """Save everything a resume needs; ``running``: this rank's sums for the epoch in progress (mid-epoch),
    so the resumed epoch's train_loss covers the whole epoch."""
    import numpy as np
    import torch

    base = out / "checkpoints"
    tmp = base / f".tmp-step-{step:08d}"
    final = base / f"step-{step:08d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    if running is not None:
        (tmp / f"epoch-rank{rank}.json").write_text(json.dumps(running))
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        full = dict(state, step=step, position=pos.__dict__, world_size=accelerator.num_processes,
                    num_workers=num_workers, files=files)
        (tmp / "state.json").write_text(json.dumps(full, indent=2))
        publish(tmp, final)  # the checkpoint counts once its folder has its final name
        prune_checkpoints(base, keep)
    accelerator.wait_for_everyone()


def export_best(model, tokenizer, out: Path, step: int) -> None:
    """Export the best epoch so far to checkpoints/best-<step>; the next checkpoint makes it current."""
    from tmkd.student.model import export

    tmp = out / "checkpoints" / f".tmp-best-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    export(model, tokenizer, tmp)
    publish(tmp, out / "checkpoints" / f"best-{step:08d}")


def restore_rng(ckpt: Path, rank: int) -> None:
    import numpy as np
    import torch

    rng = torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def normalise(pos: Position, cfg: TrainConfig) -> Position:
    if pos.stage < len(cfg.stages) and pos.epoch >= cfg.stages[pos.stage].epochs:
        return Position(pos.stage + 1, 0, 0)
    return pos


def comparable(cfg_dict: dict) -> dict:
    """The parts of a config that decide the model, the data order and the schedule (must match to resume)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("output", "train", "eval")}
    out["gradient_accumulation_steps"] = cfg_dict["train"]["gradient_accumulation_steps"]
    out["data"] = {k: v for k, v in cfg_dict["data"].items() if k != "num_workers"}  # checked once resolved
    return out


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(accelerator, model, store, cfg: TrainConfig, tokenizer, positive: int | None) -> dict:
    import numpy as np
    import torch

    from tmkd.student.data import eval_batches
    from tmkd.teachers.metrics import evaluate_predictions

    parts = store.corpus(cfg.eval.corpus).parts[accelerator.process_index :: accelerator.num_processes]
    net = accelerator.unwrap_model(model)
    net.eval()
    logits, gold, groups = [], [], []
    with torch.no_grad(), accelerator.autocast():  # one context: weights are cast once, not per batch
        for batch, labels, grp in eval_batches(store, parts, tokenizer, cfg.student.max_length, cfg.eval.batch_size):
            inputs = {k: batch[k].to(accelerator.device) for k in ("input_ids", "attention_mask", "token_type_ids")
                      if k in batch}
            out = net(**inputs)
            logits.append(out.float().mean(dim=1).cpu().numpy())
            gold.append(labels)
            groups += grp
    net.train()
    c = net.num_labels
    local = (np.concatenate(logits) if logits else np.zeros((0, c), np.float32),
             np.concatenate(gold) if gold else np.zeros(0, np.int64), groups)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        allp = gather_object([local])
        local = (np.concatenate([p[0] for p in allp]), np.concatenate([p[1] for p in allp]),
                 [g for p in allp for g in p[2]])
    return evaluate_predictions(local[0], local[1], local[2], positive)


# ---- the run ----------------------------------------------------------------------------------
def run(cfg: TrainConfig, resume: bool = False) -> RunResult:
    """Train as the config says; ``resume``: continue from the last checkpoint in the output folder."""
    from tmkd.teachers.cpu import bound_cpu_caches

    bound_cpu_caches()  # before the first kernel: keeps memory flat as the corpus grows
    import torch

    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _run(cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, resume: bool) -> RunResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    from tmkd.data.store import Store
    from tmkd.student.data import DistillStream, data_workers, dummy_batch, plan_batches
    from tmkd.student.losses import distill_loss
    from tmkd.student.model import export, load_student

    hf_logging.disable_progress_bar()  # one progress bar: ours
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision or None)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(cfg.output)
    set_seed(cfg.seed)
    nw = data_workers(cfg.data.num_workers, accelerator.device)  # part of the data order: checked on resume

    store = Store(cfg.store)
    teachers = [store.teacher(n) for n in cfg.teachers]
    label_names = label_space(cfg, store, teachers)
    positive = positive_class(cfg, store, label_names)
    check_labels(store, cfg, teachers)
    num_labels = len(label_names)
    ensemble = cfg.soft_target == "ensemble"
    heads = 1 if (ensemble or not teachers) else len(teachers)

    # --- resume or start fresh ---
    ckpt = latest_checkpoint(out)
    state: dict = {"best": None, "history": [], "examples": 0, "seconds": 0.0}
    start, step = Position(), 0
    running: dict | None = None  # this rank's sums for the epoch the checkpoint stopped in
    if ckpt is not None and not resume:
        raise TrainError(f"{out} holds checkpoints of an earlier run ({ckpt.name}): pass --resume to continue it, "
                         "or choose another output folder")
    if resume and ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        if comparable(saved["config"]) != comparable(cfg.to_dict()):
            raise TrainError(f"{ckpt}: the checkpoint was made with another config (store, teachers, student, data "
                             "or stages differ); resume with the same config or start a new output folder")
        if saved["world_size"] != world:
            raise TrainError(f"{ckpt}: made with {saved['world_size']} processes, now {world}; the data order "
                             "depends on it, so resume with the same number of processes")
        # the data order depends on the worker count (0 and 1 give the same order); checkpoints from before the
        # count was recorded had it in their config, where it could not be auto
        old = saved.get("num_workers", saved["config"]["data"].get("num_workers", 1))
        if max(1, old) != max(1, nw):
            raise TrainError(f"{ckpt}: made with data.num_workers = {old}, now {nw}; the data order depends on it, "
                             f"so resume with --set data.num_workers={old}")
        start, step = Position(**saved["position"]), saved["step"]
        state.update({k: saved[k] for k in ("best", "history", "examples", "seconds")})
        if start.batch:  # stopped mid-epoch: continue this rank's loss sums (older checkpoints lack them)
            f = ckpt / f"epoch-rank{rank}.json"
            running = json.loads(f.read_text()) if f.exists() else None
    elif resume and main:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from the beginning", file=sys.stderr)

    # --- model and tokenizer ---
    tok_path = cfg.student.tokenizer or cfg.student.encoder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        student = load_student(cfg.student.encoder, num_labels, heads, cfg.student.num_layers, label_names)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the student encoder {cfg.student.encoder!r}: {e}") from None
    resumed = rng_pending = resume and ckpt is not None
    if resumed:
        student.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
    model = accelerator.prepare_model(student)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps(run_record(cfg, store, teachers, world, accelerator.mixed_precision,
                                                             "running", {"num_workers": nw}), indent=2))
        # the lines of the epochs the checkpoint holds, and no others: those a killed run wrote after its
        # last checkpoint are trained again and written again
        write_metrics(out, state["history"])
    accelerator.wait_for_everyone()

    weights = torch.tensor(cfg.normalised_weights() or [1.0], dtype=torch.float32, device=accelerator.device)
    ga = cfg.train.gradient_accumulation_steps
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    seen: list[dict] = []  # what this rank trained on, per epoch (rows and id checksum)
    t_start = time.time()
    examples_now = 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), disable=not main, transient=False)
    progress.start()
    try:
        for si, stage in enumerate(cfg.stages):
            if si < start.stage:
                continue
            parts = [p for c in stage.corpora for p in store.corpus(c).parts]
            plan = [max(plan_batches(parts, cfg.seed, e, world, nw, stage.batch_size)) for e in range(stage.epochs)]
            total = sum(math.ceil(n / ga) for n in plan)
            decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "norm" not in n.lower()]
            no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "norm" not in n.lower())]
            groups = [{"params": decay, "weight_decay": stage.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            try:  # fused AdamW: ~6x faster steps on this CPU than the default foreach kernels
                optimizer = torch.optim.AdamW(groups, lr=stage.lr, fused=True)
            except (RuntimeError, ValueError):
                optimizer = torch.optim.AdamW(groups, lr=stage.lr)
            sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[stage.schedule]
            scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=int(stage.warmup_ratio * total),
                                      num_training_steps=max(1, total))
            optimizer = accelerator.prepare_optimizer(optimizer)
            if resumed and si == start.stage and (start.epoch, start.batch) != (0, 0):
                optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
                scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
            dataset = DistillStream(
                cfg.store, parts, teachers, tok_path, num_labels=num_labels, batch_size=stage.batch_size,
                max_length=cfg.student.max_length, seed=cfg.seed, rank=rank, world=world, num_workers=nw,
                shuffle_buffer=cfg.data.shuffle_buffer, bucket_batches=cfg.data.bucket_batches,
            )
            filler = dummy_batch(tokenizer, len(teachers), num_labels)
            use_gold = stage.gold
            for epoch in range(stage.epochs):
                if (si, epoch) < (start.stage, start.epoch):
                    continue
                skip = start.batch if (si, epoch) == (start.stage, start.epoch) else 0
                if rng_pending:
                    restore_rng(ckpt, rank)  # dropout continues as if never stopped
                    rng_pending = False
                dataset.set_epoch(epoch)
                loader = DataLoader(dataset, batch_size=None, num_workers=nw, persistent_workers=False,
                                    generator=torch.Generator().manual_seed(cfg.seed))
                n_batches = plan[epoch]
                task = progress.add_task(f"{stage.name} epoch {epoch + 1}/{stage.epochs}", total=n_batches,
                                         completed=skip, info="")
                model.train()
                loss_sum = torch.zeros(2, dtype=torch.float64)  # weighted loss, weight
                rows = id_sum = 0
                t_epoch, ex_epoch = time.time(), 0
                partial = False  # train_loss covers only the rows after a resume (an older checkpoint)
                if skip:
                    if running is not None:  # the sums of the batches before the checkpoint: a whole-epoch loss
                        loss_sum = torch.tensor(running["loss_sum"], dtype=torch.float64)
                        rows, id_sum, ex_epoch = running["rows"], running["id_sum"], running["examples"]
                        t_epoch -= running["seconds"]
                    partial = running is None
                it = iter(loader)
                for i in range(n_batches):
                    batch = next(it, None)
                    if i < skip:
                        continue  # already trained before the checkpoint: same order, skipped
                    if batch is None:
                        batch = filler
                    w = float(batch["weight"])
                    real = int(w > 0) * len(batch["labels"])
                    rows += real
                    id_sum = (id_sum + int(batch["ids"].sum()) * int(w > 0)) % (1 << 64)
                    window = min(ga, n_batches - (i // ga) * ga)
                    sync = (i + 1) % ga == 0 or i + 1 == n_batches
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        inputs = {k: batch[k].to(accelerator.device)
                                  for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                        with accelerator.autocast():
                            logits = model(**inputs)
                        loss = distill_loss(
                            logits, batch["teacher_logits"].to(accelerator.device), batch["labels"].to(accelerator.device),
                            weights=weights, ensemble=ensemble, soft=stage.loss.soft,
                            temperature=stage.loss.temperature, alpha=stage.loss.alpha, use_gold=use_gold,
                        )
                        accelerator.backward(loss * w / window)
                    loss_sum += torch.tensor([float(loss.detach()) * w, w], dtype=torch.float64)
                    ex_epoch += real
                    if sync:
                        if cfg.train.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and i + 1 < n_batches:
                            sums = {"loss_sum": loss_sum.tolist(), "rows": rows, "id_sum": id_sum,
                                    "examples": ex_epoch, "seconds": time.time() - t_epoch}
                            save_checkpoint(accelerator, out, step, Position(si, epoch, i + 1), model, optimizer,
                                            scheduler, dict(state, examples=state["examples"] + examples_now,
                                                            seconds=state["seconds"] + time.time() - t_start,
                                                            config=cfg.to_dict()), cfg.train.keep_checkpoints, nw,
                                            running=sums)
                        if kill_at and step == kill_at:
                            os.kill(os.getpid(), signal.SIGKILL)
                    rate = ex_epoch / max(1e-9, time.time() - t_epoch)
                    progress.update(task, advance=1,
                                    info=f"loss {loss_sum[0] / max(loss_sum[1], 1e-9):.4f}  {rate:.0f} ex/s")
                del it, loader
                # --- end of epoch: losses from every rank, evaluation, metrics line, best, checkpoint ---
                totals = accelerator.reduce(loss_sum.to(accelerator.device), reduction="sum").cpu()
                seen.append({"stage": stage.name, "epoch": epoch, "rows": rows, "id_sum": id_sum})
                ex_all = int(accelerator.reduce(torch.tensor([ex_epoch], device=accelerator.device),
                                                reduction="sum").item())
                examples_now += ex_all  # every rank's rows
                secs = time.time() - t_epoch
                line = {"stage": stage.name, "epoch": epoch + 1, "step": step,
                        "train_loss": float(totals[0] / max(float(totals[1]), 1e-9)),
                        "examples": ex_all, "examples_per_s": ex_all / max(secs, 1e-9), "seconds": secs}
                if partial:  # resumed from a checkpoint without the epoch's sums: say what the numbers cover
                    line.update(partial=True, note="train_loss, examples and seconds cover only the rows trained "
                                                   "after the resume")
                if cfg.eval.corpus:
                    line.update({f"eval_{k}": v
                                 for k, v in evaluate(accelerator, model, store, cfg, tokenizer, positive).items()})
                    value = line.get(f"eval_{cfg.eval.metric}")
                    if value is None:
                        raise TrainError(f"eval.metric = {cfg.eval.metric!r} but corpus {cfg.eval.corpus!r} has no "
                                         "groups to rank; use accuracy or f1")
                    best = state["best"]
                    if best is None or value > best["value"]:
                        state["best"] = {"metric": cfg.eval.metric, "value": value, "stage": stage.name,
                                         "epoch": epoch + 1, "step": step}
                        if main:
                            export_best(accelerator.unwrap_model(model), tokenizer, out, step)
                state["history"].append(line)
                if main:
                    write_metrics(out, state["history"])
                    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()
                             if k in ("train_loss", "eval_accuracy", "eval_f1", "eval_map", "eval_mrr")}
                    progress.console.print(f"{stage.name} epoch {epoch + 1}: {shown}")
                save_checkpoint(accelerator, out, step, normalise(Position(si, epoch + 1, 0), cfg), model, optimizer,
                                scheduler, dict(state, examples=state["examples"] + examples_now,
                                                seconds=state["seconds"] + time.time() - t_start,
                                                config=cfg.to_dict()), cfg.train.keep_checkpoints, nw)
    finally:
        progress.stop()

    # --- export: the best epoch (or the last, without evaluation) as a stock HF model ---
    net = accelerator.unwrap_model(model)
    if main:
        if state["best"] is not None:
            best_dir = best_folder(out, state["best"])
            if not best_dir.is_dir():
                raise TrainError(f"{best_dir}: the export of the best epoch is missing (removed by hand?); the "
                                 "checkpoints are kept: restore it, or train again into a new output folder")
            for f in best_dir.iterdir():
                shutil.copy2(f, out / f.name)
        else:
            export(net, tokenizer, out)
    examples = state["examples"] + examples_now
    seconds = state["seconds"] + time.time() - t_start
    write_atomic(out / "ranks" / f"rank-{rank}.json", json.dumps(
        {"rank": rank, "world_size": world, "pid": os.getpid(), "epochs": seen, "param_digest": param_digest(net)},
        indent=2))
    accelerator.wait_for_everyone()
    if main:
        write_atomic(out / "run.json", json.dumps(run_record(
            cfg, store, teachers, world, accelerator.mixed_precision, "done",
            {"steps": step, "examples": examples, "seconds": seconds, "best": state["best"], "num_workers": nw}), indent=2))
        rate = examples / max(seconds, 1e-9)
        best = state["best"]
        best_txt = f"best {best['metric']} {best['value']:.4f} ({best['stage']} epoch {best['epoch']})" if best else \
            "no evaluation: exported the last epoch"
        print(f"done: {step} optimizer steps, {examples} examples in {seconds:.1f}s ({rate:.1f} ex/s); "
              f"{best_txt}; model -> {out}")
    if world > 1:
        accelerator.end_training()
    return RunResult(out, step, examples, seconds, state["best"], state["history"])


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a TMKD student from the label store (see student/config.py).")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.0.lr=5e-5 (repeatable)")
    p.add_argument("--output", help="output folder (overrides `output`)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], help="overrides train.mixed_precision")
    p.add_argument("--gradient_accumulation_steps", type=int, help="overrides train.gradient_accumulation_steps")
    return p.parse_args(argv)


def clean_message(e: Exception) -> str:
    msg = str(e)
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the message only
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    return msg


def main(argv=None) -> int:
    from tmkd.data.store import StoreError

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, **{
            "output": args.output, "train.mixed_precision": args.mixed_precision,
            "train.gradient_accumulation_steps": args.gradient_accumulation_steps})
        run(cfg, resume=args.resume)
    except (ConfigError, StoreError, TrainError) as e:
        print(f"error: {clean_message(e)}", file=sys.stderr)
        return 1  # a user error (README: exit codes); argparse exits 2 on usage errors
    return 0


def _teardown_and_exit(code: int) -> None:
    """Under several processes, leave cleanly (ENVIRONMENT.md: avoids a SIGABRT at teardown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            from accelerate import PartialState

            PartialState().wait_for_everyone() if code == 0 else None
            dist.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """`tmkd-train`, `python student/train.py` and `accelerate launch -m tmkd.student.train`: one entry."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _teardown_and_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()

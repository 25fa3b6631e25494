"""Checkpoints of a student run: atomic folders, the data position, and what a resume restores.

A kill at any moment leaves the last complete checkpoint usable (see publish). ``Resume`` is what
the recipe needs from the last checkpoint: where the data stream stands, the step, the run state
(best, history, examples, seconds) and this rank's sums for the epoch in progress.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tmkd.student.config import TrainConfig
from tmkd.student.plan import TrainError


@dataclass
class Position:
    """Where the data stream stands: the next batch to train is batch ``batch`` of (stage, epoch)."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0


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


# ---- resume -----------------------------------------------------------------------------------
@dataclass
class Resume:
    """What the run continues from: nothing (a fresh run) or the last complete checkpoint."""

    ckpt: Path | None = None
    start: Position = None  # type: ignore[assignment]
    step: int = 0
    state: dict = None  # type: ignore[assignment]  best, history, examples, seconds
    running: dict | None = None  # this rank's sums for the epoch the checkpoint stopped in

    def __post_init__(self):
        self.start = self.start or Position()
        self.state = self.state or {"best": None, "history": [], "examples": 0, "seconds": 0.0}

    def skip(self, si: int, epoch: int) -> int:
        """Batches of (stage si, epoch) already trained before the checkpoint."""
        return self.start.batch if (si, epoch) == (self.start.stage, self.start.epoch) else 0

    def restores_optimizer(self, si: int) -> bool:
        return self.ckpt is not None and si == self.start.stage and (self.start.epoch, self.start.batch) != (0, 0)


def load_resume(out: Path, cfg: TrainConfig, resume: bool, world: int, num_workers: int, rank: int,
                main: bool) -> Resume:
    """The checkpoint to continue from, after checking it was made by this config and process count."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise TrainError(f"{out} holds checkpoints of an earlier run ({ckpt.name}): pass --resume to continue it, "
                         "or choose another output folder")
    if ckpt is None:
        if resume and main:
            print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from the beginning", file=sys.stderr)
        return Resume()
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
    if max(1, old) != max(1, num_workers):
        raise TrainError(f"{ckpt}: made with data.num_workers = {old}, now {num_workers}; the data order depends "
                         f"on it, so resume with --set data.num_workers={old}")
    start = Position(**saved["position"])
    running = None
    if start.batch:  # stopped mid-epoch: continue this rank's loss sums (older checkpoints lack them)
        f = ckpt / f"epoch-rank{rank}.json"
        running = json.loads(f.read_text()) if f.exists() else None
    return Resume(ckpt, start, saved["step"], {k: saved[k] for k in ("best", "history", "examples", "seconds")},
                  running)


def load_model_state(model, ckpt: Path) -> None:
    import torch

    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))


def load_optimizer_state(optimizer, scheduler, ckpt: Path) -> None:
    import torch

    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))

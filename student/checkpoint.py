"""Checkpoints of a student run: atomic folders saved with ``accelerator.save_state``.

A checkpoint folder holds what ``accelerator.save_state`` writes (model, optimizer, RNG per rank,
gradient scaler) and two objects registered with ``accelerator.register_for_checkpointing``: the
stage's LR schedule and the data ``Position`` (where the stream stands, and every rank's sums
for the epoch in progress). ``state.json`` beside them holds the run's state (config, best,
history) and the size of every file. A kill at any moment leaves the last complete checkpoint
usable (see publish). ``Resume`` is what the recipe needs to know before loading one.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tmkd.student.config import TrainConfig
from tmkd.student.plan import TrainError

LAYOUT = 2  # state.json's "layout": 2 = accelerate's save_state (1, unrecorded: our own torch.save files)


@dataclass
class Position:
    """Where the data stream stands: the next batch to train is batch ``batch`` of (stage, epoch).
    ``running``: every rank's sums for that epoch's batches before it (None at an epoch's start).
    Checkpointed with the model: registered with ``accelerator.register_for_checkpointing``."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    running: list[dict] | None = None

    def where(self) -> dict:
        return {"stage": self.stage, "epoch": self.epoch, "batch": self.batch}

    def state_dict(self) -> dict:
        return dict(self.where(), running=self.running)

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.epoch, self.batch, self.running = (state[k] for k in ("stage", "epoch", "batch", "running"))


class StageSchedule:
    """The current stage's LR schedule as one checkpointable object: each stage builds its own
    scheduler, while the accelerator keeps the objects registered once."""

    scheduler = None

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Into the stage the checkpoint cut; a checkpoint at a stage's start (or the run's end) holds the
        schedule of a stage that is over, and the next stage starts its own."""
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


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


def save_checkpoint(accelerator, out: Path, step: int, position: Position, state: dict, keep: int,
                    num_workers: int, running: dict | None = None) -> None:
    """Save everything a resume needs into checkpoints/step-<step>, atomically; ``running``: this rank's
    sums for the epoch in progress (mid-epoch), so the resumed epoch's train_loss covers the whole epoch."""
    from accelerate.utils import gather_object

    base = out / "checkpoints"
    tmp = base / f".tmp-step-{step:08d}"
    final = base / f"step-{step:08d}"
    position.running = gather_object([running]) if running is not None else None  # every rank's, on each
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, RNG per rank, scaler, the schedule and the position
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        full = dict(state, step=step, position=position.where(), world_size=accelerator.num_processes,
                    num_workers=num_workers, files=files, layout=LAYOUT)
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


def next_epoch(stage: int, epoch: int, cfg: TrainConfig) -> Position:
    """The position after (stage, epoch) ends: the next epoch, or the next stage's first."""
    return Position(stage + 1, 0, 0) if epoch + 1 >= cfg.stages[stage].epochs else Position(stage, epoch + 1, 0)


def comparable(cfg_dict: dict) -> dict:
    """The parts of a config that decide the model, the data order and the schedule (must match to resume)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("output", "train", "eval")}
    out["gradient_accumulation_steps"] = cfg_dict["train"]["gradient_accumulation_steps"]
    out["data"] = {k: v for k, v in cfg_dict["data"].items() if k != "num_workers"}  # checked once resolved
    return out


# ---- resume -----------------------------------------------------------------------------------
@dataclass
class Resume:
    """What the run continues from: nothing (a fresh run) or the last complete checkpoint, with where
    it stands (``start``, from its state.json) and the run state (best, history, examples, seconds)."""

    ckpt: Path | None = None
    start: Position = field(default_factory=Position)
    step: int = 0
    state: dict = field(default_factory=lambda: {"best": None, "history": [], "examples": 0, "seconds": 0.0})

    def mid_stage(self, si: int) -> bool:
        """Stage si was cut by the checkpoint: its optimizer state and schedule continue."""
        return self.ckpt is not None and si == self.start.stage and (self.start.epoch, self.start.batch) != (0, 0)


def load_resume(out: Path, cfg: TrainConfig, resume: bool, world: int, num_workers: int, main: bool) -> Resume:
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
    if saved.get("layout") != LAYOUT:
        raise TrainError(f"{ckpt}: a checkpoint saved by an earlier tmkd (before accelerate's save_state); finish "
                         "that run with the tmkd that started it, or start a new output folder")
    if comparable(saved["config"]) != comparable(cfg.to_dict()):
        raise TrainError(f"{ckpt}: the checkpoint was made with another config (store, teachers, student, data "
                         "or stages differ); resume with the same config or start a new output folder")
    if saved["world_size"] != world:
        raise TrainError(f"{ckpt}: made with {saved['world_size']} processes, now {world}; the data order "
                         "depends on it, so resume with the same number of processes")
    old = saved["num_workers"]  # the data order depends on it (0 and 1 give the same order)
    if max(1, old) != max(1, num_workers):
        raise TrainError(f"{ckpt}: made with data.num_workers = {old}, now {num_workers}; the data order depends "
                         f"on it, so resume with --set data.num_workers={old}")
    return Resume(ckpt, Position(**saved["position"]), saved["step"],
                  {k: saved[k] for k in ("best", "history", "examples", "seconds")})

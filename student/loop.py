"""The pieces of the training loop: optimizer, one epoch of accumulation windows, the epoch's end.

An accumulation window is ``gradient_accumulation_steps`` batches (fewer at the end of an epoch,
so a checkpoint never holds half a window). Its batches are fetched first, then each one's loss is
weighted by its share of the window's rows, ``rows_b / sum(rows)``: a short last batch counts for
its rows, not as a full batch, and zero-weight padding batches (a rank that ran out of data) count
for nothing. With every batch full that is ``1 / N``, the plain mean. Each rank weights its own
window; DDP then averages the ranks. ``accelerator.no_sync`` is used inside a window.

The epoch's loss is summed on the device and read back only every ``train.log_every`` optimizer steps
(progress bar), at a checkpoint and at the epoch's end: no host sync per batch. A NaN or inf read there,
or weights gone NaN or inf at the epoch's end, stop the run before anything is checkpointed or exported.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tmkd.student import checkpoint
from tmkd.student.checkpoint import Position, StageSchedule
from tmkd.student.data import INPUTS
from tmkd.student.plan import Plan, StagePlan, TrainError
from tmkd.teachers.device import fused_adamw, to_device



@dataclass
class Session:
    """What the loop carries from epoch to epoch (one per process)."""

    accelerator: object
    plan: Plan
    model: object
    tokenizer: object
    out: Path
    state: dict  # best, history, examples, seconds (as of the run's start)
    position: Position  # registered for checkpointing: updated in place before each save
    step: int = 0
    examples_now: int = 0  # every rank's rows trained since this process started
    t_start: float = field(default_factory=time.time)
    seen: list = field(default_factory=list)  # what this rank trained on, per epoch (rows and id checksum)
    progress: object = None

    def checkpoint_state(self) -> dict:
        return dict(self.state, examples=self.state["examples"] + self.examples_now,
                    seconds=self.state["seconds"] + time.time() - self.t_start, config=self.plan.cfg.to_dict())


@dataclass
class EpochSums:
    """This rank's running sums for one epoch; ``loss`` stays on the device."""

    loss: torch.Tensor  # sum over batches of weight * batch loss (float64, on the device)
    weight: float = 0.0
    rows: int = 0
    id_sum: int = 0
    examples: int = 0
    t0: float = field(default_factory=time.time)

    @classmethod
    def start(cls, device, running: dict | None) -> "EpochSums":
        """Fresh sums, or (a run resumed mid-epoch) the sums of the batches before the checkpoint."""
        sums = cls(torch.zeros((), dtype=torch.float64, device=device))
        if running is not None:
            sums.loss += running["loss_sum"][0]
            sums.weight = running["loss_sum"][1]
            sums.rows, sums.id_sum, sums.examples = running["rows"], running["id_sum"], running["examples"]
            sums.t0 -= running["seconds"]
        return sums

    def running(self, acc, where: str) -> dict:
        """For a mid-epoch checkpoint (reads the loss back: a diverged run saves no checkpoint)."""
        loss = read_loss(acc, self.loss, where)
        return {"loss_sum": [loss, self.weight], "rows": self.rows, "id_sum": self.id_sum,
                "examples": self.examples, "seconds": time.time() - self.t0}


def read_loss(acc, loss: torch.Tensor, where: str) -> float:
    """This process's running loss sum, read back where it is read anyway (log_every, a checkpoint), never per
    batch: one NaN or inf batch makes the sum NaN or inf for good, and the run stops there. Every process reaches
    these reads at the same step, and they stop together: one stopping alone would leave the others waiting in
    their next collective."""
    value = float(loss)
    bad = not math.isfinite(value)
    if acc.num_processes > 1:
        bad = bool(acc.reduce(torch.tensor([float(bad)], device=acc.device), reduction="sum").item())
    if bad:
        raise diverged(where, value if not math.isfinite(value) else "not finite on another process")
    return value


def check_finite(loss: float, where: str) -> float:
    """Stop a diverged run (a loss already the same on every process)."""
    if not math.isfinite(loss):
        raise diverged(where, loss)
    return loss


def diverged(where: str, loss) -> TrainError:
    return TrainError(f"{where}: the training loss is {loss}: the model diverged; stopped, nothing exported "
                      "(lower the stage's lr, or check the teachers' logits)")


def new_optimizer(model):
    """AdamW over two groups (no decay on biases and norms), one for the whole run: each stage sets its
    own learning rate and decay and starts from empty moments (start_stage)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "norm" not in n.lower())]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return fused_adamw(groups, lr=0.0)


def start_stage(optimizer, schedule: StageSchedule, stage: StagePlan) -> None:
    """Start a stage as a fresh AdamW would: its lr and decay, no moments, and its schedule over its steps."""
    from transformers import get_scheduler

    cfg = stage.config
    optimizer.state.clear()
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(lr=cfg.lr, weight_decay=decay)
        group.pop("initial_lr", None)  # set again by the new schedule
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    schedule.scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * stage.steps),
                                       num_training_steps=max(1, stage.steps))


def batch_loss(s: Session, stage: StagePlan, batch: dict, weights: torch.Tensor) -> torch.Tensor:
    from tmkd.student.losses import distill_loss, listwise_distill_loss

    dev, cfg = s.accelerator.device, stage.config
    with s.accelerator.autocast():  # host tensors go over pinned and non-blocking: a plain copy makes the host wait
        logits = s.model(**{k: to_device(batch[k], dev) for k in INPUTS if k in batch})
    teacher_logits = to_device(batch["teacher_logits"], dev)
    loss = distill_loss(logits, teacher_logits, to_device(batch["labels"], dev), weights=weights,
                        ensemble=s.plan.ensemble, soft=cfg.loss.soft, temperature=cfg.loss.temperature,
                        alpha=cfg.loss.alpha, use_gold=cfg.gold)
    if cfg.loss.listwise > 0:
        loss = loss + cfg.loss.listwise * listwise_distill_loss(
            logits, teacher_logits, to_device(batch["group_index"], dev), batch["num_groups"], batch["num_lists"],
            weights=weights, ensemble=s.plan.ensemble, positive=s.plan.positive, temperature=cfg.loss.temperature)
    return loss


def window_divisors(rows: list[int]) -> list[float]:
    """What each micro-batch's loss is divided by in its accumulation window: total rows / its rows, so
    that it counts for its share of the rows. A short last batch counts for its rows, a padding batch
    (0 rows: inf) for nothing, and N full batches for exactly loss / N, as without weighting."""
    total = sum(rows)
    return [total / r if r else float("inf") for r in rows]


def train_epoch(s: Session, si: int, stage: StagePlan, epoch: int, batches, filler: dict, optimizer, scheduler,
                sums: EpochSums, skip: int, task) -> None:
    """Train (stage si, epoch) from batch ``skip`` on (``batches`` starts there), one accumulation window
    at a time."""
    acc, cfg = s.accelerator, s.plan.cfg
    ga, n = cfg.train.gradient_accumulation_steps, stage.batches[epoch]
    log_every = cfg.train.log_every
    weights = torch.tensor(s.plan.weights, dtype=torch.float32, device=acc.device)
    where = f"stages.{si} ({stage.config.name}) epoch {epoch + 1}"
    it = iter(batches)
    i = skip
    while i < n:
        end = min((i // ga + 1) * ga, n)  # windows end every ga batches and at the epoch's end
        window = [b if b is not None else filler for b in (next(it, None) for _ in range(i, end))]
        real = [len(b["labels"]) if b["weight"] > 0 else 0 for b in window]  # no host sync: plain numbers
        for j, (batch, rows, divisor) in enumerate(zip(window, real, window_divisors(real))):
            w = batch["weight"]
            with contextlib.nullcontext() if j + 1 == len(window) else acc.no_sync(s.model):
                loss = batch_loss(s, stage, batch, weights)
                acc.backward(loss * w / divisor if rows else loss * 0.0)
            sums.loss += loss.detach().double() * w
            sums.weight += w
            sums.rows += rows
            sums.examples += rows
            if rows:
                sums.id_sum = (sums.id_sum + batch["id_sum"]) % (1 << 64)
        i = end
        if cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(s.model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        s.step += 1
        if cfg.train.checkpoint_every and s.step % cfg.train.checkpoint_every == 0 and i < n:
            s.position.stage, s.position.epoch, s.position.batch = si, epoch, i
            checkpoint.save_checkpoint(acc, s.out, s.step, s.position, s.checkpoint_state(),
                                       cfg.train.keep_checkpoints, s.plan.num_workers, running=sums.running(acc, where))
        info = None
        if s.step % log_every == 0 or i == n:  # the only reads of the loss during the epoch
            rate = sums.examples / max(1e-9, time.time() - sums.t0)
            info = f"loss {read_loss(acc, sums.loss, where) / max(sums.weight, 1e-9):.4f}  {rate:.0f} ex/s"
        s.progress.update(task, advance=len(window), **({"info": info} if info else {}))


def end_epoch(s: Session, si: int, stage: StagePlan, epoch: int, sums: EpochSums) -> None:
    """Losses from every rank, evaluation, the metrics line, the best export, the epoch's checkpoint."""
    from tmkd.student.evaluate import evaluate

    acc, plan, cfg = s.accelerator, s.plan, s.plan.cfg
    name = stage.config.name
    where = f"stages.{si} ({name}) epoch {epoch + 1}"
    # the weights' health rides on the all-reduce the loss takes anyway: a last step that turned them NaN
    # leaves a finite loss behind it
    diverged = torch.stack([~torch.isfinite(p).all() for p in s.model.parameters()]).any()
    local = torch.stack([sums.loss, torch.tensor(sums.weight, dtype=torch.float64, device=acc.device),
                         diverged.to(torch.float64)])
    totals = acc.reduce(local, reduction="sum").cpu()
    s.seen.append({"stage": name, "epoch": epoch, "rows": sums.rows, "id_sum": sums.id_sum})
    ex_all = int(acc.reduce(torch.tensor([sums.examples], device=acc.device), reduction="sum").item())
    s.examples_now += ex_all  # every rank's rows
    secs = time.time() - sums.t0
    line = {"stage": name, "epoch": epoch + 1, "step": s.step,
            "train_loss": check_finite(float(totals[0] / max(float(totals[1]), 1e-9)), where),
            "examples": ex_all, "examples_per_s": ex_all / max(secs, 1e-9), "seconds": secs}
    if totals[2].item():  # before the evaluation, the best export and the checkpoint
        raise TrainError(f"{where}: the model's weights are not finite (by step {s.step}): the model diverged; "
                         "stopped, nothing exported (lower the stage's lr)")
    if cfg.eval.corpus:
        line.update({f"eval_{k}": v for k, v in evaluate(acc, s.model, plan, s.tokenizer).items()})
        value = line.get(f"eval_{cfg.eval.metric}")
        if value is None:
            raise TrainError(f"eval.metric = {cfg.eval.metric!r} but corpus {cfg.eval.corpus!r} has no "
                             "groups to rank; use accuracy or f1")
        best = s.state["best"]
        if best is None or value > best["value"]:
            s.state["best"] = {"metric": cfg.eval.metric, "value": value, "stage": name, "epoch": epoch + 1,
                               "step": s.step}
            if acc.is_main_process:
                checkpoint.export_best(acc.unwrap_model(s.model), s.tokenizer, s.out, s.step)
    s.state["history"].append(line)
    if acc.is_main_process:
        checkpoint.write_metrics(s.out, s.state["history"])
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()
                 if k in ("train_loss", "eval_accuracy", "eval_f1", "eval_map", "eval_mrr")}
        s.progress.console.print(f"{name} epoch {epoch + 1}: {shown}", markup=False)  # the name is user text
    nxt = checkpoint.next_epoch(si, epoch, cfg)
    s.position.stage, s.position.epoch, s.position.batch = nxt.stage, nxt.epoch, nxt.batch
    checkpoint.save_checkpoint(acc, s.out, s.step, s.position, s.checkpoint_state(), cfg.train.keep_checkpoints,
                               plan.num_workers)

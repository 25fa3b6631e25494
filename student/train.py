"""Train a TMKD student from the label store.

    accelerate launch student/train.py --config student.toml [--set stages.0.lr=5e-5] [--resume]
    python student/train.py --config student.toml

One readable loop: stages -> epochs -> batches, with the accelerator threaded through
(devices, mixed precision, DDP). See student/config.py for the config schema and
student/data.py for the data order. Output folder::

    OUT/config.json, model.safetensors, tokenizer files   the exported (folded) student, best epoch
    OUT/README.md                                         the model card (base model, corpora, teachers, metrics)
    OUT/run.json                                          teachers + fingerprints, corpora + part digests, config
    OUT/metrics.jsonl                                     one line per (stage, epoch)
    OUT/checkpoints/step-NNNNNNNN/                        accelerate's save_state (model, optimizer, RNG per rank,
                                                          schedule, data position) + state.json
    OUT/checkpoints/best-NNNNNNNN/                        export of the best epoch so far (the step it ended)
    OUT/ranks/rank-R.json                                 what each process saw (rows, id checksum) + weight digest

Gradient accumulation: the data stream is per-rank and not wrapped by accelerate, so the loop
decides where accumulation windows end (every N batches and at the end of every epoch: a
checkpoint never holds half a window), weights each batch by its rows (student/loop.py) and uses
``accelerator.no_sync`` inside a window.

The recipe (``_run``) reads top-down: accelerator -> plan (data) -> model, optimizer -> prepare ->
load the checkpoint (a resume) -> per stage: schedule, stream -> per epoch: train, end of epoch ->
export. A resumed stream seeks straight to its batch (student/data.py). The pieces live in
student/plan.py (the job resolved once), checkpoint.py, data.py, loop.py, evaluate.py, model.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

from tmkd.student.checkpoint import Position, StageSchedule, best_folder, load_resume, write_atomic, write_metrics
from tmkd.student.config import ConfigError, TrainConfig, load_config
from tmkd.student.loop import EpochSums, Session, end_epoch, new_optimizer, start_stage, train_epoch
from tmkd.student.plan import Plan, TrainError, resolve
from tmkd.teachers.spec import position_limit


@dataclass
class RunResult:
    output: Path
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)


def param_digest(model) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    from tmkd.student.data import data_workers, dummy_batch, epoch_batches
    from tmkd.teachers.device import train_mixed_precision

    hf_logging.disable_progress_bar()  # one progress bar: ours
    accelerator = Accelerator(mixed_precision=train_mixed_precision(cfg.train.mixed_precision))
    world, main = accelerator.num_processes, accelerator.is_main_process
    out = Path(cfg.output)
    set_seed(cfg.seed)
    # --- data: the job resolved once (corpora, parts, teachers, labels, positive class, weights, batches) ---
    plan = resolve(cfg, world, data_workers(cfg.data.num_workers, accelerator.device))
    check_output(plan, out)  # before anything is written
    res = load_resume(out, cfg, resume, world, plan.num_workers, main)
    # --- model, optimizer, prepare; a resumed run loads its checkpoint into them ---
    tokenizer, student = load_model(plan)
    model = accelerator.prepare_model(student)
    optimizer = accelerator.prepare_optimizer(new_optimizer(model))
    schedule, position = StageSchedule(), Position()
    accelerator.register_for_checkpointing(schedule, position)
    if res.mid_stage(res.start.stage):  # the stage the checkpoint cut: its schedule is in the checkpoint
        start_stage(optimizer.optimizer, schedule, plan.stages[res.start.stage])
    if res.ckpt:
        accelerator.load_state(str(res.ckpt))  # model, optimizer, schedule, data position, RNG per rank
    start_outputs(plan, accelerator, out, res.state["history"])
    s = Session(accelerator, plan, model, tokenizer, out, res.state, position, step=res.step)
    with progress_bar(main) as s.progress, marked_failed(plan, accelerator, out):
        for si, stage in enumerate(plan.stages):
            if si < res.start.stage:
                continue
            if not res.mid_stage(si):
                start_stage(optimizer.optimizer, schedule, stage)
            stream = make_stream(plan, stage, accelerator.process_index)
            filler = dummy_batch(tokenizer, len(plan.teachers), plan.num_labels)
            # --- loop ---
            for epoch in range(stage.config.epochs):
                if (si, epoch) < (res.start.stage, res.start.epoch):
                    continue
                resumed = (si, epoch) == (res.start.stage, res.start.epoch) and res.start.batch > 0
                skip = res.start.batch if resumed else 0
                task = s.progress.add_task(f"{stage.config.name} epoch {epoch + 1}/{stage.config.epochs}",
                                           total=stage.batches[epoch], completed=skip, info="")
                model.train()
                sums = EpochSums.start(accelerator.device,
                                       position.running[accelerator.process_index] if resumed else None)
                train_epoch(s, si, stage, epoch, epoch_batches(stream, epoch, skip), filler, optimizer,
                            schedule.scheduler, sums, skip, task)
                end_epoch(s, si, stage, epoch, sums)
    # --- save ---
    return finish(s)


# ---- the recipe's steps -----------------------------------------------------------------------
def load_model(plan: Plan):
    """The tokenizer and the multi-head student (one head per teacher, or one)."""
    from transformers import AutoTokenizer

    from tmkd.student.model import load_student

    cfg = plan.cfg
    for key in ("student.encoder", "student.tokenizer"):  # local folders only: a missing one is never a hub id
        folder = getattr(cfg.student, key.split(".")[1])
        if folder and not Path(folder).is_dir():
            raise TrainError(f"{key}: no folder {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.student.tokenizer or cfg.student.encoder, local_files_only=True)
        student = load_student(cfg.student.encoder, plan.num_labels, plan.heads, cfg.student.num_layers,
                               plan.label_names, cfg.student.layers)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the student encoder {cfg.student.encoder!r}: {e}") from None
    check_fits(cfg, tokenizer, student.hf)
    if cfg.student.init:
        init_weights(student, Path(cfg.student.init))
    return tokenizer, student


def check_fits(cfg: TrainConfig, tokenizer, hf) -> None:
    """Token ids and positions the encoder cannot embed fail deep inside a forward (an IndexError, a size
    mismatch) once training has started: refuse them here, naming the field."""
    vocab = getattr(hf.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise TrainError(f"student.tokenizer: {cfg.student.tokenizer or cfg.student.encoder} has a vocabulary of "
                         f"{len(tokenizer)} tokens but the encoder {cfg.student.encoder} embeds only {vocab} "
                         "(vocab_size): use the encoder's own tokenizer")
    limit = position_limit(hf.config.to_dict())  # RoBERTa's padding offset counted
    if limit is not None and cfg.student.max_length > limit[0]:
        raise TrainError(f"student.max_length = {cfg.student.max_length} but the encoder {cfg.student.encoder} "
                         f"can position at most {limit[0]} tokens ({limit[1]}): set "
                         f"student.max_length <= {limit[0]}")


def check_output(plan: Plan, out: Path) -> None:
    """A job's outputs never go into a label store: a stray file there is a damaged store to every reader."""
    from tmkd.data.fs import inside_store

    if inside_store(out, plan.store.root):
        raise TrainError(f"output {out}: inside the label store {plan.store.root}; choose a folder outside it")


def init_weights(student, folder: Path) -> None:
    """Load another run's checkpoint weights (its model.safetensors: the multi-head student) into ``student``;
    every tensor must be there with the same shape, or nothing starts."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    try:
        state = load_file(path)
    except (OSError, ValueError) as e:  # missing, unreadable or not safetensors
        raise TrainError(f"student.init: cannot read {path}: {e}") from None
    own = student.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (want {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        raise TrainError(f"student.init: {path} does not fit this student (encoder cut, heads, labels): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}")
    student.load_state_dict(state)


def start_outputs(plan: Plan, accelerator, out: Path, history: list[dict]) -> None:
    """run.json (status running) and the metrics lines of the epochs the checkpoint holds, and no others:
    those a killed run wrote after its last checkpoint are trained again and written again."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps(plan.record("running", accelerator.mixed_precision,
                                                              {"num_workers": plan.num_workers}), indent=2))
        write_metrics(out, history)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def marked_failed(plan: Plan, accelerator, out: Path):
    """A run stopped by an error (a diverged loss) says so in run.json: "failed" and why, not "running"."""
    try:
        yield
    except TrainError as e:
        if accelerator.is_main_process:
            write_atomic(out / "run.json", json.dumps(plan.record("failed", accelerator.mixed_precision, {
                "error": str(e), "num_workers": plan.num_workers}), indent=2))
        raise


def make_stream(plan: Plan, stage, rank: int):
    from tmkd.student.data import DistillStream

    cfg = plan.cfg
    return DistillStream(
        cfg.store, stage.parts, plan.teachers, cfg.student.tokenizer or cfg.student.encoder,
        num_labels=plan.num_labels, batch_size=stage.config.batch_size, max_length=cfg.student.max_length,
        seed=cfg.seed, rank=rank, world=plan.world, num_workers=plan.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer, bucket_batches=cfg.data.bucket_batches,
        grouped=stage.config.loss.listwise > 0,
    )


def progress_bar(main: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # markup=False: a stage name is the user's text ("[/]x" would be a MarkupError, "[red]x" shown as "x")
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False), disable=not main,
                    transient=False)


def finish(s: Session) -> RunResult:
    """Export the best epoch (or the last, without evaluation) as a stock HF model; ranks/, run.json."""
    from tmkd.student.model import export

    accelerator, plan, out, state = s.accelerator, s.plan, s.out, s.state
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    net = accelerator.unwrap_model(s.model)
    if main:
        if state["best"] is not None:
            best_dir = best_folder(out, state["best"])
            if not best_dir.is_dir():
                raise TrainError(f"{best_dir}: the export of the best epoch is missing (removed by hand?); the "
                                 "checkpoints are kept: restore it, or train again into a new output folder")
            for f in best_dir.iterdir():
                shutil.copy2(f, out / f.name)
        else:
            export(net, s.tokenizer, out)
    examples = state["examples"] + s.examples_now
    seconds = state["seconds"] + time.time() - s.t_start
    write_atomic(out / "ranks" / f"rank-{rank}.json", json.dumps(
        {"rank": rank, "world_size": world, "pid": os.getpid(), "epochs": s.seen, "param_digest": param_digest(net)},
        indent=2))
    accelerator.wait_for_everyone()
    if main:
        metrics = run_metrics(plan, state, out, accelerator.device)
        record = plan.record("done", accelerator.mixed_precision, {
            "steps": s.step, "examples": examples, "seconds": seconds, "best": state["best"],
            "num_workers": plan.num_workers, **({"test": metrics["test"]} if "test" in metrics else {})})
        write_atomic(out / "run.json", json.dumps(record, indent=2))
        write_card(plan, record, metrics, out)
        rate = examples / max(seconds, 1e-9)
        best = state["best"]
        best_txt = f"best {best['metric']} {best['value']:.4f} ({best['stage']} epoch {best['epoch']})" if best else \
            "no evaluation: exported the last epoch"
        print(f"done: {s.step} optimizer steps, {examples} examples in {seconds:.1f}s ({rate:.1f} ex/s); "
              f"{best_txt}; model -> {out}")
    if world > 1:
        accelerator.end_training()
    return RunResult(out, s.step, examples, seconds, state["best"], state["history"])


def run_metrics(plan: Plan, state: dict, out: Path, device) -> dict:
    """The exported model's metrics: dev (its epoch's evaluation) and test (scored now, if configured)."""
    from tmkd.student.evaluate import evaluate_export

    metrics = {}
    best = state["best"]
    if best is not None:
        line = next(x for x in state["history"] if x["stage"] == best["stage"] and x["epoch"] == best["epoch"])
        metrics["dev"] = {k[len("eval_"):]: v for k, v in line.items() if k.startswith("eval_")}
    if plan.cfg.eval.test_corpus:
        metrics["test"] = evaluate_export(out, plan, plan.cfg.eval.test_corpus, device)
    return metrics


def write_card(plan: Plan, record: dict, metrics: dict, out: Path) -> None:
    """The exported model's README.md: base model, corpora, teachers, config, metrics, how to load it."""
    from tmkd.teachers.model_card import write_model_card

    cfg = plan.cfg

    def role(corpus: str) -> str:
        stages = [s.name for s in cfg.stages if corpus in s.corpora]
        return ("train: " + ", ".join(stages) if stages else "dev" if corpus == cfg.eval.corpus else "test")
    write_model_card(out, kind="student", name=out.name, base_model=cfg.student.encoder,
                     label_names=plan.label_names, max_length=cfg.student.max_length, config=cfg.to_dict(),
                     corpora={c: {"role": role(c), "rows": v["rows"], "parts": v["parts"]}
                              for c, v in record["corpora"].items()},
                     teachers=record["teachers"], metrics=metrics,
                     method=f"{cfg.variant}, " + (f"encoder layers {cfg.student.layers}" if cfg.student.layers
                                                   else f"{cfg.student.num_layers or 'all'} layers"))


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
    from tmkd.data.errors import error_line

    msg = error_line(e)
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
    except (ConfigError, StoreError, TrainError, OSError) as e:  # OSError: an unwritable output, a full disk
        print(f"error: {clean_message(e)}", file=sys.stderr)
        return 1  # a user error (README: exit codes); argparse exits 2 on usage errors
    return 0


def _teardown_and_exit(code: int) -> None:
    """Leave without the interpreter's teardown, where a C++ library's thread aborted the exit now and
    then (SIGABRT, "terminate called without an active exception": 1 run in 7 with two processes,
    shared/ENVIRONMENT.md, and once in a single process refused at start, in CI). Everything is
    written and closed by now; the process group is destroyed first."""
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
    _teardown_and_exit(main())


if __name__ == "__main__":
    console_main()

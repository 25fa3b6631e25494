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
Mistakes are TeacherErrors that name the file, the teacher and the field (a wrong type says
which type is expected); a truncated weight file is refused before the teacher is recorded.
"""
from __future__ import annotations

import hashlib
import json
import struct
import tomllib
import types
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tmkd.data.store import CorpusManifest, StoreError, TeacherRecord, check_name, label_space_mismatch

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)


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


def fits_type(value: object, tp: object) -> bool:
    """Whether a TOML value has the type a dataclass field declares (int is not bool; a float takes an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(fits_type(v, args[0]) for v in value))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # a type this check does not know: the dataclass decides


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(tp: object) -> str:
    """A field's type in words (None is left out: TOML has no null, leaving a key out means the default)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_expected(args[0]).partition(' ')[2]}s" if args else "a list"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: object) -> str:
    """What a TOML value is, in words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        odd = [v for v in value if not isinstance(v, str)]
        return f"a list holding {_kind(odd[0])}" if odd else "a list"
    return type(value).__name__  # dates and times


def check_types(cls: type, values: dict, where: str, error: type[Exception]) -> None:
    """Refuse a value whose type is not the one ``cls`` (a dataclass) declares for it.

    The message names the place, the field, the expected type and what was given, e.g.
    ``teachers.toml: teacher #2 'minilm-a': max_length: expected an integer, got "128" (a string)``.
    Keys ``cls`` does not have are left to the caller's unknown-field check.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not fits_type(value, hints[key]):
            shown = json.dumps(value, ensure_ascii=False, default=str)
            raise error(f"{where}: {key}: expected {_expected(hints[key])}, got {shown} ({_kind(value)})")


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
        if not isinstance(entry, dict):
            raise TeacherError(f"{path}: teacher #{i}: expected a [[teacher]] table, got {entry!r}")
        where = f"{path}: teacher #{i}" + (f" {entry['name']!r}" if isinstance(entry.get("name"), str) else "")
        unknown = set(entry) - known
        if unknown:
            raise TeacherError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for required in ("name", "path"):
            if required not in entry:
                raise TeacherError(f"{where}: missing field {required!r}")
        check_types(TeacherSpec, entry, where, TeacherError)
        local = (path.parent / entry["path"]).resolve()
        if local.exists():
            entry = {**entry, "path": str(local)}
        try:
            specs.append(TeacherSpec(**entry))
        except TeacherError as e:
            raise TeacherError(f"{path}: {e}") from None
        except (StoreError, TypeError) as e:  # an invalid name
            raise TeacherError(f"{where}: {e}") from None
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


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file, judged by its header and size alone (no tensor is read), or None.

    The format: an 8-byte little-endian header length N, N bytes of JSON naming each tensor's
    ``data_offsets`` into the data that follows; the file ends exactly where the last tensor does.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, too short for a safetensors header"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"truncated or not a safetensors file: {size:,} bytes, but its header alone should be {n:,}"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not a safetensors JSON header)"
    expected = 8 + n + end
    if size < expected:
        return f"truncated: {size:,} bytes of the {expected:,} its header describes"
    if size > expected:
        return f"corrupt: {size:,} bytes, but its header describes {expected:,}"
    return None


def check_weights(spec: TeacherSpec, folder: Path) -> None:
    """Refuse truncated or corrupt weight files before the teacher is recorded (cheap: headers and sizes only).

    Every ``*.safetensors`` file is checked, and every shard a ``*.index.json`` lists must exist.
    ``pytorch_model*.bin`` files (read only when there is no safetensors file) are checked only
    for a complete zip directory, when they are zip files (torch.save since torch 1.6).
    """
    where = f"teacher {spec.name!r}: weight file"
    safetensors = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    for f in safetensors:
        problem = _safetensors_problem(f)
        if problem:
            raise TeacherError(f"{where} {f} is {problem}; copy or save the model again")
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TeacherError(f"{where} index {index} is not a valid weight index (no weight_map)") from None
        missing = sorted(n for n in shards if not (folder / str(n)).is_file())
        if missing:
            raise TeacherError(f"{where} index {index} lists shard(s) missing from the folder: {', '.join(missing)}")
    if not safetensors:
        for f in sorted(folder.glob("pytorch_model*.bin")):
            with open(f, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
            if zipped and not zipfile.is_zipfile(f):
                raise TeacherError(f"{where} {f} is truncated or corrupt (its zip directory is missing); "
                                   "copy or save the model again")


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
    """Refuse a teacher whose label space differs from the corpus's (the store's one rule)."""
    problem = label_space_mismatch(record.name, record.label_names, f"corpus {corpus.name!r}", corpus.label_names)
    if problem:
        raise TeacherError(problem)


def make_record(spec: TeacherSpec) -> tuple[TeacherRecord, Path]:
    """The teacher's record (fingerprints, label names) and folder; refuses damaged weight files first."""
    folder = resolve_folder(spec)
    check_weights(spec, folder)
    fp, tok_fp = fingerprints(spec, folder)
    record = TeacherRecord(
        name=spec.name, fingerprint=fp, path=str(spec.path), label_names=label_names(spec, folder), dtype=spec.dtype,
        max_length=spec.max_length, truncation=spec.truncation, corpora=spec.corpora, tokenizer_fingerprint=tok_fp,
    )
    return record, folder

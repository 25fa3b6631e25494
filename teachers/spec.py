"""Teachers as the user lists them (teachers.toml), their fingerprints and label spaces.

``teachers.toml``::

    [[teacher]]
    name = "minilm-a"            # a folder name in the store
    path = "teachers/minilm-a"   # a Hugging Face folder (relative to this file), or a hub id already in the
                                 #   local Hugging Face cache (nothing is downloaded)
    max_length = 128
    dtype = "bfloat16"           # float32 | bfloat16 | float16: the compute dtype (autocast)
    batch_tokens = 4096          # optional: padded tokens per forward batch (default: from the device: 4,096 on
                                 #   a CPU, a share of the free memory on a GPU; tmkd.teachers.device)
    labels = ["0", "1"]          # optional: label names in logit order (default: the model's id2label)
    corpora = ["wikiqa-train"]   # optional: only these corpora, each in the store (default: every corpus there)
    truncation = "longest_first"   # optional: longest_first | only_first | only_second (the tokenizer's names)
    compile = true               # optional: torch.compile the forward (one compile for all batch shapes).
                                 #   On this CPU: +12% pairs/s in bf16, +5% in fp32, after a 7-42 s compile;
                                 #   worth it above ~250k pairs. Labels are the same up to float rounding.
    cpu_streams = 2              # optional: on a CPU, batches forwarded at once, torch's threads split between
                                 #   them (default 2, at most the thread count; 1 on a GPU). Not in the fingerprint.
    first_token_last_layer = true  # optional (default true): compute the last layer for the first token only,
                                 #   the one position the classification head reads (BERT, RoBERTa, XLM-R, ELECTRA
                                 #   heads; tmkd.teachers.first_token). ~1.1x pairs/s, the same logits up to
                                 #   float rounding, checked against the full forward on every part.

A fingerprint hashes what decides a teacher's logits: weights, config, tokenizer files,
max length, truncation and dtype. It is what tells a current label part from a stale one.
Only the standard library and the JSON config are read here: no model is loaded.
The file is read by the shared config loader (``tmkd.teachers.config``): mistakes are TeacherErrors
that name the file (or the ``--set``), the field as a dotted path (``teacher.1.max_length``, teachers
counted from 0) and, for a wrong type, the type expected; a truncated weight file is refused before
the teacher is recorded.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tmkd.data.store import CorpusManifest, StoreError, TeacherRecord, check_name, label_space_mismatch
from tmkd.teachers.config import Given, apply_sets, items_of, missing_keys, plain, read_toml, table_values

DTYPES = ("float32", "bfloat16", "float16")
# The tokenizer's strategies that cut every pair to max_length (do_not_truncate would pass longer rows to the model).
# only_first / only_second fail on a pair whose other text alone is longer than max_length.
TRUNCATIONS = ("longest_first", "only_first", "only_second")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)


class TeacherError(StoreError):
    """A user-facing problem with a teacher: bad spec, changed checkpoint, wrong label space.

    ``fields``: the spec fields a bad value was in, so that the loader can name where it came from."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


@dataclass
class TeacherSpec:
    name: str
    path: str
    max_length: int = 128
    dtype: str = "float32"
    batch_tokens: int | None = None  # None: chosen from the device (tmkd.teachers.device.token_budget)
    labels: list[str] | None = None
    corpora: list[str] | None = None
    truncation: str = "longest_first"
    compile: bool = False  # not in the fingerprint: the same model, the same logits up to rounding
    first_token_last_layer: bool = True  # not in the fingerprint either, for the same reason
    cpu_streams: int | None = None  # None: tmkd.teachers.device.CPU_STREAMS; not in the fingerprint
    # Where each value came from (teachers.toml, or the --set that gave it), and the folder a path that is not
    # one was resolved to: set by load_teachers_toml, for messages only.
    sources: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    resolved: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_name("teacher", self.name)
        if self.dtype not in DTYPES:
            self.refuse(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}", "dtype")
        if not (8 <= int(self.max_length) <= 8192):
            self.refuse(f"max_length {self.max_length} out of range 8..8192", "max_length")
        if self.truncation not in TRUNCATIONS:
            self.refuse(f"truncation {self.truncation!r} is not one of {', '.join(TRUNCATIONS)}", "truncation")
        if self.corpora is not None and not self.corpora:
            self.refuse("corpora is empty; leave it out to score every corpus", "corpora")
        for flag in ("compile", "first_token_last_layer"):
            if not isinstance(getattr(self, flag), bool):
                self.refuse(f"{flag} must be true or false, not {getattr(self, flag)!r}", flag)
        streams = self.cpu_streams
        if streams is not None and (isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= 256):
            self.refuse(f"cpu_streams must be a whole number from 1 to 256, not {self.cpu_streams!r}", "cpu_streams")
        if self.batch_tokens is not None and int(self.batch_tokens) < self.max_length:
            self.refuse(f"batch_tokens {self.batch_tokens} must be at least max_length {self.max_length}",
                        "batch_tokens", "max_length")

    def refuse(self, problem: str, *fields: str) -> None:
        """Raise a TeacherError about this teacher's ``fields``, naming where they came from once loaded."""
        raise TeacherError(f"{self.source_of(*fields)}teacher {self.name!r}: {problem}", fields)

    def source_of(self, *fields: str) -> str:
        """``"--set teacher.0.max_length=512: "`` when a --set gave one of ``fields``, else the file's ``"path: "``
        (``""`` for a spec not read from a file)."""
        where = source_of(self.sources, fields)
        return f"{where}: " if where else ""


def source_of(sources: dict[str, str], fields: Sequence[str]) -> str:
    """The first --set that gave one of ``fields``, else the file (``sources[""]``): what a message blames."""
    given = [sources[f] for f in fields if sources.get(f, "").startswith("--set ")]
    return given[0] if given else sources.get("", "")


@dataclass
class TeachersFile:
    """The whole file: one or more [[teacher]] tables and nothing else."""

    teacher: list[TeacherSpec] = field(default_factory=list)


def check_unique_names(path: Path, names: list[str], error: type[Exception]) -> None:
    """Teacher names are folder and record names: each may appear once per file."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise error(f"{path}: teacher name(s) listed twice: {', '.join(dup)}")


def load_teachers_toml(path: str | Path, overrides: Sequence[str] = ()) -> list[TeacherSpec]:
    """Parse teachers.toml; relative paths are relative to the file's folder.

    ``overrides`` are ``--set KEY=VALUE`` items, as in every job (``teacher.0.max_length=64``).
    """
    path = Path(path)
    raw = read_toml(path, TeacherError, "teachers file")
    apply_sets(raw, overrides, TeacherError)
    entries = items_of(raw, "teacher")
    if not isinstance(entries, list) or not entries or not all(isinstance(plain(e), dict) for e in entries):
        raise TeacherError(f"{path}: expected one or more [[teacher]] tables")
    table_values(TeachersFile, {k: v for k, v in raw.items() if k != "teacher"}, "", str(path), TeacherError)
    specs = []
    for i, entry in enumerate(entries):
        where = f"teacher.{i}"
        values = table_values(TeacherSpec, entry, where, str(path), TeacherError)
        missing = missing_keys(TeacherSpec, values)
        if missing:
            raise TeacherError(f"{path}: missing key(s) {', '.join(f'{where}.{k}' for k in missing)}")
        local = (path.parent / values["path"]).resolve()
        if local.exists():
            values["path"] = str(local)
        sources = value_sources(entry, str(path))
        try:
            spec = TeacherSpec(**values)
        except TeacherError as e:  # raised before the spec knew its sources: blamed here
            raise TeacherError(f"{source_of(sources, e.fields)}: {e}", e.fields) from None
        except StoreError as e:  # an invalid name
            raise TeacherError(f"{sources.get('name', path)}: {where}.name: {e}") from None
        spec.sources, spec.resolved = sources, str(local)
        specs.append(spec)
    check_unique_names(path, [s.name for s in specs], TeacherError)
    return specs


def value_sources(entry: Any, path: str) -> dict[str, str]:
    """Where each key of a [[teacher]] table came from: the --set that gave it, else the file (key ``""``)."""
    if isinstance(entry, Given):  # the whole table given by one --set
        return {"": path, **{k: entry.source for k in plain(entry)}}
    return {"": path, **{k: v.source if isinstance(v, Given) else path for k, v in entry.items()}}


def resolve_folder(spec: TeacherSpec) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache. Never downloads: a run
    must not reach the network, and a mistyped folder name must not be taken for a model to fetch."""
    folder = Path(spec.path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.path, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception:  # noqa: BLE001 - not in the cache, or not a valid hub id: either way not a folder
        pass
    resolved = spec.resolved or str(folder.resolve())
    raise TeacherError(f"{spec.source_of('path')}teacher {spec.name!r}: no folder {spec.path} (resolved to {resolved}),"
                       " and no such hub id in the local Hugging Face cache (nothing is downloaded at run time)",
                       ("path",))


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


def read_config(spec: TeacherSpec, folder: Path) -> dict:
    """The model's config.json as a dict; a missing or malformed one is the user's to fix, by name."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise TeacherError(f"teacher {spec.name!r}: no config.json in {folder}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TeacherError(f"teacher {spec.name!r}: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TeacherError(f"teacher {spec.name!r}: {path} is not a JSON object (a model config)")
    return config


# Architectures whose position ids start after the padding index (RoBERTa's family): max_position_embeddings
# counts pad_token_id + 1 positions no token can use (514 in the config, 512 tokens). MPNet's padding index is
# fixed at 1 whatever pad_token_id says, so it always keeps 2.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert", "longformer",
                    "roberta-prelayernorm", "xmod", "luke", "markuplm", "esm", "lilt", "layoutlmv3")


def position_limit(config: dict) -> tuple[int, str] | None:
    """How many tokens the model's position embeddings take (a config.json as a dict), and where that number
    comes from, for messages; None where the model has no absolute positions (DeBERTa-v2/v3, rotary) and so no
    limit."""
    model_type = config.get("model_type")
    offset = model_type in OFFSET_POSITIONS
    positions, pad = config.get("max_position_embeddings"), config.get("pad_token_id")
    source = "max_position_embeddings"
    if isinstance(model_type, str) and (positions is None or (offset and pad is None)):
        # left out of the file: the defaults transformers fills in, so that every job reads the same limit
        defaults = _defaults(model_type)
        if positions is None:
            positions, source = defaults.get("max_position_embeddings"), f"{model_type}'s default {source}"
        pad = defaults.get("pad_token_id") if pad is None else pad
    if (not isinstance(positions, int) or isinstance(positions, bool) or config.get("position_biased_input") is False
            or config.get("position_embedding_type") == "rotary"):
        return None
    unused = 2 if model_type == "mpnet" else ((pad if isinstance(pad, int) else 1) + 1 if offset else 0)
    why = f"{source} = {positions}" + (f", less {unused} that {model_type} keeps unused" if unused else "")
    return positions - unused, why


def _defaults(model_type: str) -> dict:
    """The architecture's config defaults, as transformers fills in what a config.json leaves out."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).to_dict()
    except (ValueError, KeyError):  # a model type this transformers does not know
        return {}


def check_max_length(spec: TeacherSpec, folder: Path, config: dict) -> None:
    """Refuse a max_length longer than the model's position embeddings, which would fail in the middle of
    scoring (on the first long pair)."""
    limit = position_limit(config)
    if limit is not None and spec.max_length > limit[0]:
        spec.refuse(f"max_length {spec.max_length} is more than the {limit[0]} tokens the model can position "
                    f"({limit[1]}, in {folder / 'config.json'})", "max_length")


def label_names(spec: TeacherSpec, folder: Path, config: dict | None = None) -> list[str]:
    """The teacher's label names in logit order: from teachers.toml, else the model's config."""
    config = read_config(spec, folder) if config is None else config
    id2label, num_labels = config.get("id2label") or {}, config.get("num_labels", 2)
    if not isinstance(id2label, dict) or isinstance(num_labels, bool) or not isinstance(num_labels, int):
        raise TeacherError(f"teacher {spec.name!r}: {folder / 'config.json'}: id2label must be an object and "
                           f"num_labels a whole number (got {id2label!r}, {num_labels!r})")
    n = len(id2label) or num_labels
    if spec.labels is not None:
        if len(spec.labels) != n:
            spec.refuse(f"labels lists {len(spec.labels)} names but the model has {n} outputs", "labels")
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
    """The teacher's record (fingerprints, label names) and folder; refuses damaged weight files, a broken
    config.json and a max_length the model cannot take first (reading files only: no model is loaded)."""
    folder = resolve_folder(spec)
    check_weights(spec, folder)
    config = read_config(spec, folder)
    check_max_length(spec, folder, config)
    fp, tok_fp = fingerprints(spec, folder)
    record = TeacherRecord(
        name=spec.name, fingerprint=fp, path=str(spec.path), label_names=label_names(spec, folder, config),
        dtype=spec.dtype,
        max_length=spec.max_length, truncation=spec.truncation, corpora=spec.corpora, tokenizer_fingerprint=tok_fp,
    )
    return record, folder

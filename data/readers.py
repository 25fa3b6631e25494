"""Readers: one source file in, a stream of raw records out (one per source row).

A reader only parses. It maps the source's own columns onto the corpus fields
(``text_a``, ``text_b``, ``label``, ``group``, ``id``) and says where each row came from;
checking the values (empty text, unknown label, undecodable bytes, duplicates) is the
job of ``data.ingest``, so every format is checked by the same rules.

Conventions every reader follows:

* Text is decoded with ``errors="surrogateescape"``: a line with bytes that are not UTF-8
  still parses, and the check later finds the field that holds them (one bad line does not
  kill the file).
* A field the row does not have is *absent* from ``Record.values`` (-> "missing field").
  ``None`` is an explicit null: for ``label`` it means "unlabeled" (JSON/Parquet null,
  GLUE's -1), for any other field it counts as missing.
* ``Record.line`` is the 1-based physical line in the file, the key in a JSON samples
  file, or the 0-based row index in a Parquet file.
* Files are streamed (memory stays flat), except a JSON samples file, which is one JSON
  object and is loaded whole.
* A text file (gzip or not) may start with a UTF-8 byte-order mark: it is skipped, so the file
  reads exactly as without it.
* Every message echoes user text (paths, values, column names) as plain text: no markup.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FIELDS = ("text_a", "text_b", "label", "group", "id")
FORMATS = ("wikiqa", "glue", "json-samples", "jsonl", "csv", "tsv", "parquet")

BINARY_NLI = ["entailment", "not_entailment"]
THREE_WAY_NLI = ["entailment", "neutral", "contradiction"]


UTF8_BOM = b"\xef\xbb\xbf"
NON_BLANK_LINE = re.compile(rb"(?m)^[ \t\r]*[^ \t\r\n]")  # a line that holds a JSON value
BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


def _value_lines(block: bytes) -> int:
    """How many lines of ``block`` (whole lines, ending in a newline) hold something: a plain count,
    unless there is a blank line (a quick search), then a count by line (slower, and rare)."""
    if BLANK_LINE.search(block) or re.match(rb"[ \t\r]*\n", block):
        return len(NON_BLANK_LINE.findall(block))
    return block.count(b"\n")
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def nli_label_names(names: set[str]) -> list[str] | None:
    """The standard NLI label space (in its standard order) that ``names`` are evidently drawn from, if any."""
    if names and names <= set(BINARY_NLI) and "not_entailment" in names:
        return BINARY_NLI
    if names and names <= set(THREE_WAY_NLI) and names & {"neutral", "contradiction"}:
        return THREE_WAY_NLI
    return None


class ReaderError(Exception):
    """The file as a whole cannot be read in this format (not one bad row: the header, the JSON, ...)."""


@dataclass
class Chunk:
    """Rows read together. ``table``: their fields as Arrow columns, one row per record (None when
    Arrow could not read them: a bad line, a type that changes); ``records()``: the same rows one by
    one, for the checks that name each bad row."""

    table: object | None  # pa.Table
    records: Callable[[], list[Record]]


@dataclass(slots=True)
class Record:
    line: int | str  # 1-based line; JSON samples key; Parquet row index (0-based)
    values: dict  # corpus field -> raw value as read; absent = the row has no such field
    raw: object  # the row as read, for the quarantine file
    error: tuple[str, str, str] | None = None  # (field, reason, detail) found while parsing


class Reader:
    """Base: the file, its size for progress bars, and what the format implies."""

    unit = "line"  # what Record.line counts, for messages ("line 12", "key '17'", "row 3")
    label_names: list[str] | None = None  # the label space the format implies, if it knows one
    positive_label: str | None = None  # the positive class the format implies (one of label_names), if any
    has_label = True  # False: the source has no label column at all (an unlabeled source)
    required: frozenset[str] = frozenset({"text_a", "text_b"})  # besides the label, when labelled

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self._file: BinaryIO | None = None

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def position(self) -> int:
        """Bytes of the file on disk consumed so far (compressed bytes for .gz)."""
        try:
            return self._file.tell() if self._file else self.size
        except (OSError, ValueError):
            return self.size

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

    def where(self, line: int | str) -> str:
        return f"{self.unit} {line!r}" if isinstance(line, str) else f"{self.unit} {line}"

    def _open(self) -> BinaryIO:
        """The file as bytes, gunzipped if it is gzip (by content, not by name), past any UTF-8 byte-order mark.

        Windows tools start UTF-8 exports with a BOM (EF BB BF); left in, it would become part of
        the first column's name or the first JSON line. A UTF-16 or UTF-32 file is refused by name.
        """
        f = open(self.path, "rb")
        self._file = f
        stream: BinaryIO = f
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f, mode="rb")
        else:
            f.seek(0)
        start = stream.read(4)
        if start.startswith(UTF8_BOM):
            stream.seek(len(UTF8_BOM))
        else:
            stream.seek(0)  # a GzipFile rewinds by decompressing again: 4 bytes, nothing to speak of
            for bom, encoding in _OTHER_BOMS:
                if start.startswith(bom):
                    self.close()
                    raise ReaderError(f"{self.path}: the file is {encoding} (it starts with a {encoding} "
                                      "byte-order mark); save it as UTF-8 and ingest it again")
        return stream


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _lines(stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its LF or CRLF) for every physical line."""
    for n, b in enumerate(stream, 1):
        if b.endswith(b"\n"):
            b = b[:-2] if b.endswith(b"\r\n") else b[:-1]
        yield n, _decode(b)


# ---- delimited text: TSV (WikiQA, GLUE, generic) and CSV ------------------------------------


class DelimitedReader(Reader):
    """A text table with a header row; ``columns`` maps corpus fields to header names.

    TSV is split on tabs with no quoting (as GLUE and WikiQA are written: their texts hold
    quote characters); CSV uses the csv module's quoting, so a row may span lines and its
    line number is the line it starts on.
    """

    defaults = {f: f for f in FIELDS}

    def __init__(self, path: Path, columns: dict[str, str] | None = None, delimiter: str = "\t"):
        super().__init__(path)
        self.delimiter = delimiter
        self.explicit = dict(columns or {})
        self._stream = self._open()
        self._rows = self._split_rows()
        try:
            _, self.header = next(self._rows)
        except StopIteration:
            raise ReaderError(f"{self.path}: empty file (a header row is expected)") from None
        self.columns = self.map_columns(self.header)
        missing = [f"{f}={c}" for f, c in self.columns.items() if c not in self.header]
        if missing:
            raise ReaderError(
                f"{self.path}: no column {', '.join(missing)} in the header {self.header}; "
                "map the fields with --columns text_a=...,text_b=...,label=..."
            )
        twice = sorted({c for c in self.columns.values() if self.header.count(c) > 1})
        if twice:
            raise ReaderError(f"{self.path}: column(s) {', '.join(twice)} appear more than once in the header "
                              f"{self.header}; rename them so each field reads one column")
        self.has_label = "label" in self.columns
        self.required = frozenset({"text_a", "text_b"} | (set(self.explicit) - {"label"}))

    def map_columns(self, header: list[str]) -> dict[str, str]:
        """Field -> column: the explicit mapping, plus default names the header has."""
        cols = {f: c for f, c in self.defaults.items() if c in header and f not in self.explicit}
        cols.update(self.explicit)
        for f in ("text_a", "text_b"):
            cols.setdefault(f, self.defaults.get(f, f))  # reported as missing from the header
        return cols

    def _split_rows(self) -> Iterator[tuple[int, list[str]]]:
        if self.delimiter == "\t":
            for n, text in _lines(self._stream):
                if text.strip():
                    yield n, text.split("\t")
            return
        text = io.TextIOWrapper(self._stream, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=self.delimiter)
        start = 1
        for cells in reader:
            if any(c.strip() for c in cells):
                yield start, cells
            start = reader.line_num + 1

    def records(self) -> Iterator[Record]:
        width = len(self.header)
        for n, cells in self._rows:
            row = dict(zip(self.header, cells))
            raw = self.delimiter.join(cells)
            rec = Record(n, self.fields(row), raw)
            if len(cells) > width:
                rec.error = ("record", "bad record", f"{len(cells)} columns, the header has {width}")
            elif len(cells) < width:  # a short row: its first mapped column it lacks is missing
                lacking = [f for f, c in self.columns.items() if c not in row]
                if lacking:
                    rec.error = (min(lacking, key=FIELDS.index), "missing field", f"{len(cells)} columns, the header has {width}")
            yield rec

    def fields(self, row: dict[str, str]) -> dict:
        """Corpus field -> raw value, for the mapped columns this row has."""
        return {f: row[c] for f, c in self.columns.items() if c in row}


class WikiQAReader(DelimitedReader):
    """WikiQA TSV: one question/sentence pair per line, grouped by question.

    The source id is QuestionID/SentenceID (hashed to the corpus id); the group is the
    QuestionID, which MAP/MRR need.
    """

    defaults = {"text_a": "Question", "text_b": "Sentence", "label": "Label", "group": "QuestionID"}
    label_names = ["0", "1"]
    positive_label = "1"  # the sentence answers the question

    def __init__(self, path: Path, columns: dict[str, str] | None = None):
        super().__init__(path, columns)
        for c in ("QuestionID", "SentenceID"):
            if c not in self.header:
                raise ReaderError(f"{self.path}: not a WikiQA file (no {c} column in the header {self.header})")
        self.required = frozenset({"text_a", "text_b", "group", "id"})

    def fields(self, row: dict[str, str]) -> dict:
        values = super().fields(row)
        if "QuestionID" in row and "SentenceID" in row:
            values["id"] = f"{row['QuestionID']}/{row['SentenceID']}"
        return values


# GLUE TSVs, told apart by their header:
# (columns that identify it, field -> column, label names, positive label of a binary task or None).
GLUE_TASKS = [
    ({"question", "sentence"}, {"text_a": "question", "text_b": "sentence", "label": "label"},  # QNLI
     BINARY_NLI, "entailment"),
    ({"sentence1", "sentence2", "gold_label"},  # MNLI, SNLI
     {"text_a": "sentence1", "text_b": "sentence2", "label": "gold_label"}, THREE_WAY_NLI, None),
    ({"sentence1", "sentence2"}, {"text_a": "sentence1", "text_b": "sentence2", "label": "label"},  # RTE
     BINARY_NLI, "entailment"),
    ({"question1", "question2"},  # QQP
     {"text_a": "question1", "text_b": "question2", "label": "is_duplicate"}, ["not_duplicate", "duplicate"], None),
]


class GlueReader(DelimitedReader):
    """A GLUE task TSV (RTE, QNLI, MNLI/SNLI, QQP), recognised by its header (positive label: QNLI/RTE's entailment).

    The id comes from the ``idx``/``index``/``id`` column. A label of -1 marks an unlabeled
    row (GLUE test sets), stored as null. ``--columns`` overrides the detected mapping.
    """

    def map_columns(self, header: list[str]) -> dict[str, str]:
        names = set(header)
        for marks, cols, label_names, positive in GLUE_TASKS:
            if marks <= names:
                break
        else:
            if not {"text_a", "text_b"} <= set(self.explicit):
                raise ReaderError(
                    f"{self.path}: unrecognised GLUE header {header}; map the fields with "
                    "--columns text_a=...,text_b=...,label=... (or use --format tsv)"
                )
            cols, label_names, positive = {}, None, None
        cols = {f: c for f, c in cols.items() if c in names or f != "label"}
        id_col = next((c for c in ("idx", "index", "id") if c in names), None)
        if id_col:
            cols["id"] = id_col
        cols.update(self.explicit)
        self.label_names, self.positive_label = label_names, positive
        return cols

    def fields(self, row: dict[str, str]) -> dict:
        values = super().fields(row)
        if values.get("label", "").strip() == "-1":
            values["label"] = None
        return values


# ---- JSON -----------------------------------------------------------------------------------


def _pick(obj: dict, columns: dict[str, str]) -> dict:
    return {f: obj[c] for f, c in columns.items() if c in obj}


class JsonlReader(Reader):
    """One JSON object per line; ``columns`` maps corpus fields to keys (default: same names)."""

    def __init__(self, path: Path, columns: dict[str, str] | None = None):
        super().__init__(path)
        self.columns = {f: f for f in FIELDS} | dict(columns or {})
        self.required = frozenset({"text_a", "text_b"} | (set(columns or {}) - {"label"}))

    def records(self) -> Iterator[Record]:
        for chunk in self.chunks(8192, arrow=False):
            yield from chunk.records()

    def chunks(self, n: int, arrow: bool = True) -> Iterator[Chunk]:
        """Blocks of about ``n`` lines (whole lines), parsed by Arrow's JSON reader (C++, no Python per
        row); ``records()`` parses the same lines one by one with ``json``, naming each bad line."""
        import pyarrow as pa
        import pyarrow.json as pj

        stream, first = self._open(), 1
        while block := stream.read(n * 256):
            if not block.endswith(b"\n"):
                block += stream.readline()  # whole lines only
            if not block.endswith(b"\n"):
                block += b"\n"  # the file's last line, without its newline
            table = None
            if arrow:
                try:
                    table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(block_size=len(block) + 1))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    table = None  # the per-row path says which line and why
                if table is not None and table.num_rows != _value_lines(block):
                    table = None  # a line held two objects
                if table is not None:
                    table = pa.table({f: table.column(c) for f, c in self.columns.items() if c in table.column_names})
            lines = block.count(b"\n")
            yield Chunk(table, lambda block=block, first=first: self._parse(block.split(b"\n"), first))
            first += lines

    def _parse(self, raw: list[bytes], first: int) -> list[Record]:
        out = []
        for n, b in enumerate(raw, first):
            text = _decode(b[:-1] if b.endswith(b"\r") else b)
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                out.append(Record(n, {}, text, ("record", "bad record", f"invalid JSON: {e}")))
                continue
            if not isinstance(obj, dict):
                out.append(Record(n, {}, text, ("record", "bad record", "not a JSON object")))
                continue
            out.append(Record(n, _pick(obj, self.columns), obj))
        return out


class JsonSamplesReader(Reader):
    """``{id: {text_a, text_b, label}}``, the form of the qnli/mnli/snli samples; loaded whole.

    The keys are the source ids. When the file's label names are all NLI names, the label
    space is the standard one: [entailment, not_entailment] (positive label: entailment) or
    [entailment, neutral, contradiction]; otherwise ``--label-names`` must say it.
    """

    unit = "key"

    def __init__(self, path: Path, columns: dict[str, str] | None = None):
        super().__init__(path)
        self.columns = {f: f for f in ("text_a", "text_b", "label", "group")} | dict(columns or {})
        self.required = frozenset({"text_a", "text_b"} | (set(columns or {}) - {"label"}))
        with self._open() as f:
            try:
                self.data = json.loads(_decode(f.read()))
            except ValueError as e:
                raise ReaderError(f"{self.path}: not valid JSON: {e}") from None
        self.close()
        if not isinstance(self.data, dict):
            raise ReaderError(f"{self.path}: expected a JSON object {{id: {{text_a, text_b, label}}}}")
        key = self.columns["label"]
        seen = {v[key] for v in self.data.values() if isinstance(v, dict) and isinstance(v.get(key), str)}
        self.label_names = nli_label_names(seen)
        if self.label_names == BINARY_NLI:
            self.positive_label = "entailment"

    def records(self) -> Iterator[Record]:
        for key, obj in self.data.items():
            if not isinstance(obj, dict):
                yield Record(key, {}, obj, ("record", "bad record", "not a JSON object"))
                continue
            values = _pick(obj, self.columns)
            values.setdefault("id", key)
            yield Record(key, values, obj)


# ---- Parquet --------------------------------------------------------------------------------


def _is_text(t) -> bool:
    """string or binary (binary is decoded like text files), plain or dictionary-encoded."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


def _is_key(t) -> bool:
    """A group or id: text or a number (pandas turns an int column with nulls into float64); all-null is fine."""
    import pyarrow as pa

    return _is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def _is_label(t) -> bool:
    import pyarrow as pa

    return _is_key(t) or pa.types.is_boolean(t)


# Field -> (accepts the Parquet column's Arrow type?, what is expected, for the message).
_PARQUET_TYPES = {
    "text_a": (_is_text, "string (or binary holding UTF-8 text)"),
    "text_b": (_is_text, "string (or binary holding UTF-8 text)"),
    "group": (_is_key, "string or number"),
    "id": (_is_key, "string or integer"),
    "label": (_is_label, "string, integer or boolean"),
}


class ParquetReader(Reader):
    """A Parquet file read in record batches; ``columns`` maps corpus fields to its columns."""

    unit = "row"

    def __init__(self, path: Path, columns: dict[str, str] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(path)
        try:
            self._pf = pq.ParquetFile(self.path)
        except pa.ArrowException as e:
            raise ReaderError(f"{self.path}: not a readable Parquet file: {e}") from None
        names = self._pf.schema_arrow.names
        explicit = dict(columns or {})
        self.columns = {f: f for f in FIELDS if f in names and f not in explicit} | explicit
        for f in ("text_a", "text_b"):
            self.columns.setdefault(f, f)
        missing = [f"{f}={c}" for f, c in self.columns.items() if c not in names]
        if missing:
            raise ReaderError(
                f"{self.path}: no column {', '.join(missing)} in {names}; map the fields with --columns"
            )
        schema = self._pf.schema_arrow
        for f, c in self.columns.items():
            kind, expected = _PARQUET_TYPES[f]
            if not kind(schema.field(c).type):
                raise ReaderError(
                    f"{self.path}: column {c!r} (field {f}) has type {schema.field(c).type}; expected {expected}"
                    + (f"; map {f} to another column with --columns {f}=COLUMN" if f in ("text_a", "text_b") else "")
                )
        self.has_label = "label" in self.columns
        self.required = frozenset({"text_a", "text_b"} | (set(explicit) - {"label"}))
        self._done = 0

    def position(self) -> int:
        rows = self._pf.metadata.num_rows
        return self.size if not rows else int(self.size * self._done / rows)

    def records(self) -> Iterator[Record]:
        for chunk in self.chunks(8192, arrow=False):
            yield from chunk.records()

    def chunks(self, n: int, arrow: bool = True) -> Iterator[Chunk]:
        """Record batches of ``n`` rows as Arrow columns (integers widened to int64, dictionaries
        decoded), and ``records()`` of the same rows one by one for the checks that name a bad row."""
        import pyarrow as pa

        wanted = list(dict.fromkeys(self.columns.values()))
        for batch in self._pf.iter_batches(batch_size=n, columns=wanted):
            table = None
            if arrow:
                cols = {}
                for f, c in self.columns.items():
                    col = batch.column(c)
                    if pa.types.is_dictionary(col.type):
                        col = col.dictionary_decode()
                    if pa.types.is_integer(col.type) and not pa.types.is_int64(col.type):
                        try:
                            col = col.cast(pa.int64())
                        except pa.ArrowInvalid:
                            pass  # a uint64 beyond int64: the per-row path takes it
                    cols[f] = col
                table = pa.table(cols)
            yield Chunk(table, lambda batch=batch, first=self._done: self._records_of(batch, first))
            self._done += batch.num_rows

    def _records_of(self, batch, first: int) -> list[Record]:
        fields = list(self.columns)
        wanted = list(dict.fromkeys(self.columns.values()))
        cols = {c: _pylist(batch.column(c)) for c in wanted}
        out = []
        for i in range(batch.num_rows):
            row = {c: cols[c][i] for c in wanted}
            values = {f: _decode(x) if isinstance(x, bytes) else x for f, x in ((f, row[self.columns[f]]) for f in fields)}
            out.append(Record(first + i, values, row))
        return out


def _pylist(col) -> list:
    """A column's values; a string column that is not valid UTF-8 comes back as bytes, for the checks to name."""
    import pyarrow as pa

    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            return col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary()).to_pylist()
    return col.to_pylist()


def open_reader(fmt: str, path: Path, columns: dict[str, str] | None = None) -> Reader:
    """The reader for ``fmt``; raises ReaderError when the file does not fit the format."""
    if fmt == "wikiqa":
        return WikiQAReader(path, columns)
    if fmt == "glue":
        return GlueReader(path, columns)
    if fmt == "tsv":
        return DelimitedReader(path, columns, "\t")
    if fmt == "csv":
        return DelimitedReader(path, columns, ",")
    if fmt == "jsonl":
        return JsonlReader(path, columns)
    if fmt == "json-samples":
        return JsonSamplesReader(path, columns)
    if fmt == "parquet":
        return ParquetReader(path, columns)
    raise ReaderError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")

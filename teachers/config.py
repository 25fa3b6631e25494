"""One typed config system for every job: teachers.toml, training and fine-tuning.

Every job reads a TOML file into plain dicts, applies ``--set KEY=VALUE`` overrides, then converts
the dicts into its (nested) dataclasses, checking each value against the field's annotation:

    raw = read_toml(path, MyError)                       # a missing or malformed file names the file
    apply_sets(raw, ["stages.1.lr=3e-5"], MyError)       # the same --set syntax in every command
    cfg = from_dict(MyConfig, raw, source=str(path), error=MyError)

``--set`` syntax: ``KEY`` is a dotted path into the file's tables (``student.encoder``,
``stages.1.lr``: list items counted from 0; a missing table is created). ``VALUE`` is read as a
TOML value (``5e-5``, ``true``, ``["a", "b"]``, ``{soft = "kl"}``), else taken as a string; a field
of type string takes the text as given (``--set positive_label=1`` is the string ``"1"``).

A wrong value is an error naming where it came from (the file, or the ``--set``), the dotted
field and the expected type::

    student.toml: stages.1.lr: expected a number, got "fast" (a string)
    --set stages.0.epochs=1.5: stages.0.epochs: expected an integer, got 1.5 (a float)

Rules shared by every job: an integer is not a boolean; a number field takes an integer; a list of
strings also takes a single string (``corpora = "x"`` is ``corpora = ["x"]``); ``X | None`` means
the key may be left out (TOML has no null). Unknown keys are refused by name.

Written TOML goes through ``dumps`` (``tomli-w``), never by hand.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

__all__ = ["Given", "read_toml", "parse_value", "parse_set", "set_path", "apply_sets", "convert", "table_values",
           "from_dict", "items_of", "plain", "expected", "kind", "dumps", "write_toml"]


@dataclass(frozen=True)
class Given:
    """A value set on the command line; it carries its source so that an error names it."""

    value: Any
    source: str  # "--set stages.0.lr=5e-5", "--output runs/x"
    text: str | None = None  # a --set's raw text: what a string field takes as is


# ---- reading -----------------------------------------------------------------------------------
def read_toml(path: str | Path, error: type[Exception], what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is the user's error, raised as ``error``."""
    try:
        data = Path(path).read_bytes()
        return tomllib.loads(data.decode("utf-8-sig"))  # a BOM (Windows editors) is skipped
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a folder, not a file") from None
    except UnicodeDecodeError as e:  # the offset in the file, BOM included
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        raise error(f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {at})") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from None


# ---- --set KEY=VALUE -----------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A command-line value: a TOML value (5e-5, true, ["a"], {a = 1}), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(item: str, error: type[Exception]) -> tuple[str, Given]:
    """``"stages.0.lr=5e-5"`` -> ``("stages.0.lr", Given(5e-05, "--set stages.0.lr=5e-5", "5e-5"))``."""
    key, eq, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not eq or not key or any(not k for k in key.split(".")):
        raise error(f"--set {item}: expected KEY=VALUE, e.g. --set stages.0.lr=5e-5")
    return key, Given(parse_value(text), f"--set {item}", text)


def set_path(raw: dict, dotted: str, value: Any, error: type[Exception], source: str | None = None) -> None:
    """Put ``value`` at ``stages.0.lr`` style paths inside nested dicts and lists, creating tables as needed."""
    source = source or (value.source if isinstance(value, Given) else f"--set {dotted}")
    keys = dotted.split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        if isinstance(node, Given):  # inside a table an earlier --set gave whole
            node = node.value
        last = i == len(keys) - 1
        here = ".".join(keys[:i]) or "the top level"
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise error(f"{source}: {here} has no item {k!r} (it has {len(node)}, counted from 0)")
            if last:
                node[int(k)] = value
                return
            node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
                return
            if k not in node:
                node[k] = {}
            node = node[k]
        else:
            shown = plain(node)
            raise error(f"{source}: {here} is {show(shown)} ({kind(shown)}), not a table")


def apply_sets(raw: dict, items: Sequence[str], error: type[Exception]) -> list[str]:
    """Apply each ``--set KEY=VALUE`` in order (the last one wins); returns their sources."""
    sources = []
    for item in items:
        key, value = parse_set(item, error)
        set_path(raw, key, value, error)
        sources.append(value.source)
    return sources


# ---- types in words --------------------------------------------------------------------------------
_NOUNS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _optional(tp: Any) -> list:
    """The types a union allows, None left out (TOML has no null: leaving a key out means the default)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _noun(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is dict:
        return "table"
    if typing.get_origin(tp) is list or tp is list:
        return "list"
    return _NOUNS.get(tp, getattr(tp, "__name__", str(tp)))


def expected(tp: Any) -> str:
    """A field's type in words: ``an integer``, ``true or false``, ``a list of strings``, ``a table``."""
    options = _optional(tp)
    if len(options) > 1:
        return " or ".join(expected(a) for a in options)
    (tp,) = options
    if tp is bool:
        return "true or false"
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return "a list" if inner is Any else f"a list of {_noun(inner)}s"
    noun = _noun(tp)
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def kind(value: Any) -> str:
    """What a (TOML) value is, in words."""
    for tp, words in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                      (dict, "a table"), (list, "a list"), (type(None), "no value")):
        if isinstance(value, tp):
            return words
    return type(value).__name__  # dates and times


def plain(value: Any) -> Any:
    """``value`` without its command-line wrappers (Given)."""
    if isinstance(value, Given):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def items_of(raw: dict, key: str) -> Any:
    """``raw[key]``, a list of tables given whole by a ``--set`` made a list of its items, each naming that --set."""
    value = raw.get(key)
    if isinstance(value, Given) and isinstance(value.value, list):
        raw[key] = value = [Given(v, value.source) for v in value.value]
    return value


def show(value: Any) -> str:
    """A value as a message shows it: TOML-like (strings in double quotes), on one line."""
    return json.dumps(value, ensure_ascii=False, default=str)


# ---- dicts -> dataclasses ------------------------------------------------------------------------------
class _Misfit(Exception):
    """Raised inside ``convert`` when only asking whether a value fits."""


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_error(error, source: str, field: str, tp: Any, value: Any, hints: Mapping[str, str] | None):
    hint = f"; {hints[field]}" if hints and field in hints else ""
    return error(f"{source}: {field}: expected {expected(tp)}, got {show(value)} ({kind(value)}){hint}")


def _fits(tp: Any, value: Any) -> bool:
    try:
        convert(tp, value, "", "", _Misfit)
        return True
    except _Misfit:
        return False


def convert(tp: Any, value: Any, field: str, source: str, error: type[Exception],
            hints: Mapping[str, str] | None = None) -> Any:
    """``value`` as type ``tp`` (nested dataclasses, lists, dicts, scalars), or ``error`` naming source and field.

    ``field`` is the dotted path (``stages.1.lr``); ``source`` the file, replaced by a ``--set``'s own
    text for the values it gave; ``hints`` maps a dotted field to advice added to its type error.
    """
    if isinstance(value, Given):
        inner = value.value
        if value.text is not None and str in _optional(tp) and not _fits(tp, inner):
            inner = value.text  # `--set positive_label=1`: a string field takes the text
        return convert(tp, inner, field, value.source, error, hints)
    if value is None and (tp is Any or type(None) in typing.get_args(tp)):
        return None  # `X | None` left at None (from a dict: TOML has no null)
    options = _optional(tp)
    if len(options) > 1:
        for option in options:
            if _fits(option, value):
                return convert(option, value, field, source, error, hints)
        raise _type_error(error, source, field, tp, plain(value), hints)
    (tp,) = options
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, field, source, error, hints)
    if origin is list or tp is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            if inner is str and isinstance(value, str):  # `corpora = "x"` is a list of one
                return [value]
            raise _type_error(error, source, field, tp, plain(value), hints)
        return [convert(inner, v, _join(field, i), source, error, hints) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        _, inner = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise _type_error(error, source, field, tp, plain(value), hints)
        return {str(k): convert(inner, v, _join(field, k), source, error, hints) for k, v in value.items()}
    checks = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}
    if tp in checks:
        if not checks[tp](value):
            raise _type_error(error, source, field, tp, plain(value), hints)
        if tp is not float:
            return value
        try:
            return float(value)
        except OverflowError:  # an integer of 309+ digits
            raise error(f"{source}: {field} = {value} is too large for a floating-point number") from None
    return plain(value)  # Any, or a type this check does not know: the dataclass decides


def table_values(cls: type, raw: Any, where: str, source: str, error: type[Exception],
                 hints: Mapping[str, str] | None = None) -> dict:
    """The keys of table ``raw`` converted to the types dataclass ``cls`` declares; unknown keys refused.

    Keys left out are left out (the caller merges defaults or lets the dataclass fill them in)."""
    if isinstance(raw, Given):
        return table_values(cls, raw.value, where, raw.source, error, hints)
    if not isinstance(raw, dict):
        raise _type_error(error, source, where or "the top level", cls, plain(raw), hints)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in raw if k not in names]
    if unknown:
        first = raw[unknown[0]]
        src = first.source if isinstance(first, Given) else source
        raise error(f"{src}: unknown key(s) {', '.join(_join(where, k) for k in unknown)}; "
                    f"{where or 'the top level'} takes: {', '.join(names)}")
    hints_of = typing.get_type_hints(cls)
    return {k: convert(hints_of[k], v, _join(where, k), source, error, hints) for k, v in raw.items()}


def missing_keys(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The fields of ``cls`` that have no default and are not in ``values``."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def from_dict(cls: type, raw: Any, where: str = "", source: str = "the config", error: type[Exception] = ValueError,
              hints: Mapping[str, str] | None = None):
    """A (nested) dataclass ``cls`` built from table ``raw``, every value's type checked on the way.

    Problems are ``error``s: ``<file or --set ...>: <dotted.field>: expected <type>, got <value> (<kind>)``,
    unknown keys and missing required keys by their dotted names. Value checks in ``__post_init__``
    raise what they raise."""
    src = raw.source if isinstance(raw, Given) else source
    values = table_values(cls, raw, where, source, error, hints)
    missing = missing_keys(cls, values)
    if missing:
        raise error(f"{src}: missing key(s) {', '.join(_join(where, k) for k in missing)}")
    return cls(**values)


# ---- writing ------------------------------------------------------------------------------------------
def _for_toml(value: Any) -> Any:
    """Plain TOML data: dataclasses as tables, paths as strings, None (TOML has no null) left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Given):
        return _for_toml(value.value)
    if isinstance(value, dict):
        return {str(k): _for_toml(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_for_toml(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(data: Any, comment: str | None = None) -> str:
    """``data`` (a dict or a dataclass) as TOML text, with ``comment`` as leading ``#`` lines."""
    head = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) + "\n" if comment else ""
    return head + tomli_w.dumps(_for_toml(data))


def write_toml(path: str | Path, data: Any, comment: str | None = None) -> Path:
    path = Path(path)
    path.write_text(dumps(data, comment))
    return path

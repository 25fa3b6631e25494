"""`tmkd-label query`: read-only DuckDB SQL over the store.

Views (built from the manifests, so only committed parts appear):

- ``corpus``   (corpus, part, id, text_a, text_b, label, "group")
- ``labels``   (teacher, corpus, part, row, id, logits FLOAT[]) — current label parts only;
  ``row`` is the position in the part, the same for every teacher (parts are aligned)
- ``teachers`` (name, fingerprint, path, label_names, dtype, max_length)
- ``corpora``  (corpus, label_names, parts, "rows")

Read-only: every statement must be a SELECT (including WITH/DESCRIBE/SUMMARIZE) or an
EXPLAIN; anything else (COPY, CREATE, ATTACH, SET, ...) is refused before it runs, and the
configuration is locked so a query reads only files inside the store and writes none.
"""
from __future__ import annotations

import duckdb

from pipeline.store import Store, StoreError

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryError(StoreError):
    """The SQL was refused or DuckDB reported an error; the message is DuckDB's."""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _files(paths) -> str:
    return "[" + ", ".join(_sql_str(str(p)) for p in paths) + "]"


def _part_expr() -> str:
    return "CAST(regexp_extract(filename, 'part-(\\d+)\\.parquet$', 1) AS INTEGER)"


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the store's views; locked against writes."""
    con = duckdb.connect(":memory:")
    corpus_sql, corpora_rows = [], []
    manifests = {c: store.corpus(c) for c in store.corpora()}
    for name, m in manifests.items():
        corpora_rows.append(
            f"({_sql_str(name)}, {('NULL' if m.label_names is None else '[' + ', '.join(map(_sql_str, m.label_names)) + ']')}::VARCHAR[], "
            f"{len(m.parts)}, {m.rows})"
        )
        if m.parts:
            corpus_sql.append(
                f"SELECT {_sql_str(name)} AS corpus, {_part_expr()} AS part, id, text_a, text_b, label, \"group\" "
                f"FROM read_parquet({_files(p.path for p in m.parts)}, filename = true)"
            )
    empty_corpus = ("SELECT NULL::VARCHAR AS corpus, NULL::INTEGER AS part, NULL::BIGINT AS id, NULL::VARCHAR AS text_a, "
                    "NULL::VARCHAR AS text_b, NULL::INTEGER AS label, NULL::VARCHAR AS \"group\" WHERE false")
    con.execute("CREATE VIEW corpus AS " + (" UNION ALL ".join(corpus_sql) or empty_corpus))

    labels_sql, teacher_rows = [], []
    for t in store.teachers().values():
        teacher_rows.append(
            f"({_sql_str(t.name)}, {_sql_str(t.fingerprint)}, {_sql_str(t.path)}, "
            f"[{', '.join(map(_sql_str, t.label_names))}]::VARCHAR[], {_sql_str(t.dtype)}, {t.max_length})"
        )
        for name, m in manifests.items():
            if not t.scores(name):
                continue
            current = [store.label_path(t.name, name, p.part) for p in m.parts if store.check_label(t, p).status == "ok"]
            if current:
                labels_sql.append(
                    f"SELECT {_sql_str(t.name)} AS teacher, {_sql_str(name)} AS corpus, {_part_expr()} AS part, "
                    f"file_row_number AS \"row\", id, CAST(logits AS FLOAT[]) AS logits "
                    f"FROM read_parquet({_files(current)}, filename = true, file_row_number = true)"
                )
    empty_labels = ("SELECT NULL::VARCHAR AS teacher, NULL::VARCHAR AS corpus, NULL::INTEGER AS part, "
                    "NULL::BIGINT AS \"row\", NULL::BIGINT AS id, "
                    "NULL::FLOAT[] AS logits WHERE false")
    con.execute("CREATE VIEW labels AS " + (" UNION ALL ".join(labels_sql) or empty_labels))

    cols = "name, fingerprint, path, label_names, dtype, max_length"
    con.execute(
        f"CREATE VIEW teachers AS SELECT * FROM (VALUES {', '.join(teacher_rows)}) t({cols})" if teacher_rows else
        "CREATE VIEW teachers AS SELECT NULL::VARCHAR AS name, NULL::VARCHAR AS fingerprint, NULL::VARCHAR AS path, "
        "NULL::VARCHAR[] AS label_names, NULL::VARCHAR AS dtype, NULL::INTEGER AS max_length WHERE false"
    )
    con.execute(
        f"CREATE VIEW corpora AS SELECT * FROM (VALUES {', '.join(corpora_rows)}) c(corpus, label_names, parts, \"rows\")"
        if corpora_rows else
        "CREATE VIEW corpora AS SELECT NULL::VARCHAR AS corpus, NULL::VARCHAR[] AS label_names, 0 AS parts, 0 AS \"rows\" WHERE false"
    )
    con.execute(f"SET allowed_directories = [{_sql_str(str(store.root.resolve()) + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(store: Store, sql: str):
    """Run read-only SQL; return (column names, rows) of the last statement."""
    con = connect(store)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    for s in statements:
        if s.type not in ALLOWED:
            raise QueryError(f"refused: the store is read-only, and this is a {s.type.name} statement: {s.query.strip()}")
    try:
        result = None
        for s in statements:
            result = con.execute(s.query)
        columns = [d[0] for d in result.description] if result.description else []
        return columns, result.fetchall()
    except duckdb.Error as e:
        raise QueryError(str(e)) from None

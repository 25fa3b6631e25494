"""`tmkd-label`: ingest corpora, score them with teachers, inspect and verify the label store.

Heavy imports (torch, transformers) happen inside the commands that need them, so
`--help`, `status` and `query` start fast.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    help="Score corpora with several teachers once, into a Parquet label store; inspect it with DuckDB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

if __name__ == "__main__":
    app()

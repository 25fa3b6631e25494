"""Mining a stage-1 corpus: questions paired with the passages BM25 ranks highest for them.

TMKD's stage 1 distills on a large unlabeled set of question/passage pairs (the paper's came from a
search engine's logs). A user with questions and documents but no pairs gets them here: every
passage of the pool is indexed by BM25 (the ``bm25s`` package: sparse-matrix scoring, no Python loop
per document), each question takes its ``top_k`` passages with a score above 0, and the pairs are
ingested as an unlabeled corpus through ``data.ingest``: the same checks, ids (a hash of the text
pair), parts and all-or-nothing commit as ``tmkd-label ingest``. A pair's group is its question, so a
listwise loss can rank a question's mined passages.

Input files: ``.txt`` (one text per line), ``.jsonl``, ``.csv``, ``.tsv`` (with a header) or
``.parquet``, gzip allowed for the text formats; ``field`` names the text's key or column. Empty
texts and repeats (after whitespace normalisation) are skipped and counted. Questions that appear in
an ``exclude`` corpus of the store (its ``text_a``, e.g. the dev and test sets; compared after
normalisation and case-folding) are left out and counted, so stage 1 never sees an evaluation question.

The index holds the whole pool in memory (bm25s's sparse matrix: ~12 bytes per distinct token of a
passage); the questions are scored in blocks of 4M (question, passage) cells.
"""
from __future__ import annotations

import gzip
import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tmkd.data.ingest import IngestError, IngestOptions, IngestSummary, ingest, normalise
from tmkd.data.store import Store

SCORE_CELLS = 1 << 22  # questions x passages scored at a time (a 32 MB float64 block)


@dataclass
class MineOptions:
    corpus: str
    top_k: int = 5
    question_field: str = "question"
    passage_field: str = "text"
    exclude: list[str] = field(default_factory=list)  # store corpora whose questions (text_a) are left out
    label_names: list[str] | None = None  # the label space the teachers will score (optional)
    part_rows: int = 50_000


@dataclass
class MineSummary:
    questions: int  # distinct, non-empty questions read
    passages: int  # distinct, non-empty passages indexed
    skipped: dict[str, int]  # reason -> count (empty, repeated, in an excluded corpus)
    unmatched: int  # questions with no passage sharing a term
    found: int  # pairs retrieved
    pairs: int  # pairs written (new to the corpus)
    seconds: float
    ingest: IngestSummary


def read_texts(path: Path, text_field: str) -> list[str]:
    """The texts of one input file (see the module docstring), in file order."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".txt"):
            with (gzip.open(path, "rt", encoding="utf-8") if _is_gzip(path) else open(path, encoding="utf-8")) as f:
                return [line.rstrip("\r\n") for line in f]
        if name.endswith(".jsonl"):
            table = pjson.read_json(path)
        elif name.endswith(".tsv"):  # split on tabs with no quoting, as `ingest` reads TSV (texts hold quotes)
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                                  convert_options=pcsv.ConvertOptions(column_types={text_field: "string"}))
        elif name.endswith(".csv"):  # CSV quoting, as `ingest` reads CSV
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={text_field: "string"}))
        elif name.endswith(".parquet"):
            table = pq.read_table(path)
        else:
            raise IngestError(f"{path}: unknown file type; use .txt, .jsonl, .csv, .tsv or .parquet")
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise IngestError(f"{path}: cannot read it: {e}") from None
    if text_field not in table.column_names:
        raise IngestError(f"{path}: no field {text_field!r} (it has {', '.join(table.column_names)})")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise IngestError(f"{path}: field {text_field!r} is {column.type}, not text")
    return [t if t is not None else "" for t in column.to_pylist()]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def distinct(texts: list[str], skipped: dict[str, int], what: str) -> list[str]:
    """Normalised texts, empty ones and repeats dropped (and counted in ``skipped``), first seen first."""
    out = list(dict.fromkeys(t for t in map(normalise, texts) if t))
    empty = sum(1 for t in texts if not t.strip())
    if empty:
        skipped[f"empty {what}"] = empty
    if len(texts) - empty - len(out):
        skipped[f"repeated {what}"] = len(texts) - empty - len(out)
    return out


def excluded_questions(store: Store, corpora: list[str]) -> set[str]:
    """text_a of every row of these corpora (read with the store's checks), normalised and case-folded: a
    question held out is held out in any case."""
    out: set[str] = set()
    for name in corpora:
        for part in store.corpus(name).parts:
            texts = store.read_corpus_part(part, ["text_a"]).column("text_a").to_pylist()
            out.update(normalise(t).casefold() for t in texts)
    return out


def retrieve(questions: list[str], passages: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(question index, passage index) of every pair: each question's ``top_k`` passages by BM25, best
    first (ties: the earlier passage), those with a score of 0 (no shared term) left out.

    bm25s builds the index: a sparse (term x passage) matrix of BM25 term scores. A question's scores
    are the sum of its terms' rows; bm25s's own ``retrieve`` does that one question at a time in Python
    (~10 ms each at 32k passages), so a block of questions is scored here at once with numpy: the rows
    of all its terms gathered, summed per (question, passage) by one bincount, then one top-k.
    """
    import bm25s

    tokens = bm25s.tokenize(passages, stopwords="en", show_progress=False)
    if not any(t for t in tokens.vocab):  # every passage is stopwords only: bm25s cannot index that
        raise IngestError(f"no passage of the {len(passages):,} has a word BM25 can index (all are stopwords)")
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    index = retriever.scores
    n = int(index["num_docs"])
    k = min(top_k, n)
    block = max(1, SCORE_CELLS // n)  # questions scored together: a dense block x n score matrix
    qs, ps = [], []
    for start in range(0, len(questions), block):
        tokens = bm25s.tokenize(questions[start : start + block], stopwords="en", show_progress=False,
                                return_ids=False)
        scores = block_scores(index, retriever.vocab_dict, tokens, n)
        top = _top_k(scores, k)
        best = np.take_along_axis(scores, top, axis=1)
        hit = best > 0
        qs.append(np.nonzero(hit)[0] + start)
        ps.append(top[hit])
    return np.concatenate(qs), np.concatenate(ps)


def block_scores(index: dict, vocab: dict, tokens: list[list[str]], n: int) -> np.ndarray:
    """BM25 scores [questions, passages] of a block of tokenized questions (a term repeated in a question
    counts each time, and a term not in the index adds nothing, as in bm25s)."""
    ids = [[vocab[t] for t in q if t in vocab] for q in tokens]
    term = np.fromiter((t for q in ids for t in q), np.int64)
    row = np.repeat(np.arange(len(ids)), [len(q) for q in ids])
    indptr = index["indptr"]
    begin, count = indptr[term], indptr[term + 1] - indptr[term]
    # positions of every term's entries, concatenated: begin_j, begin_j + 1, ..., begin_j + count_j - 1
    pos = np.repeat(begin - np.cumsum(count) + count, count) + np.arange(int(count.sum()))
    cell = np.repeat(row, count) * n + index["indices"][pos]
    scores = np.bincount(cell, weights=index["data"][pos], minlength=len(ids) * n)
    return scores.reshape(len(ids), n)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest scores, best first; equal scores in column order."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # a tie at a k-th score above 0 may have been cut arbitrarily: such rows (rare) are sorted in full. A tie at
    # 0 needs nothing: every positive score is in ``part``, and the zeros are left out by the caller.
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
    tied = ((scores >= kth).sum(axis=1) > k) & (kth[:, 0] > 0)
    out = np.empty((len(scores), k), np.int64)
    for i in np.nonzero(tied)[0]:
        out[i] = np.argsort(-scores[i], kind="stable")[:k]
    plain = ~tied
    rows = part[plain]
    order = np.lexsort((rows, -np.take_along_axis(scores[plain], rows, axis=1)), axis=1)
    out[plain] = np.take_along_axis(rows, order, axis=1)
    return out


def group_name(question: str) -> str:
    return "q:" + hashlib.blake2b(question.encode("utf-8"), digest_size=8).hexdigest()


def mine(store: Store, question_files: list[Path], passage_files: list[Path], opts: MineOptions) -> MineSummary:
    """Mine the pairs and ingest them into corpus ``opts.corpus`` (all or nothing)."""
    if opts.top_k < 1:
        raise IngestError(f"--top-k must be >= 1, not {opts.top_k}")
    t0 = time.time()
    skipped: dict[str, int] = {}
    questions = distinct([t for p in question_files for t in read_texts(p, opts.question_field)], skipped, "questions")
    passages = distinct([t for p in passage_files for t in read_texts(p, opts.passage_field)], skipped, "passages")
    if opts.exclude:
        held_out = excluded_questions(store, opts.exclude)
        kept = [q for q in questions if q.casefold() not in held_out]
        if len(kept) < len(questions):
            skipped["questions in an excluded corpus"] = len(questions) - len(kept)
        questions = kept
    if not questions or not passages:
        raise IngestError(f"nothing to mine: {len(questions)} questions and {len(passages)} passages left "
                          f"(skipped: {skipped or 'none'})")
    q_idx, p_idx = retrieve(questions, passages, opts.top_k)
    unmatched = len(questions) - len(np.unique(q_idx))
    q_text = pa.array(questions, pa.string())
    table = pa.table({"question": q_text.take(q_idx), "passage": pa.array(passages, pa.string()).take(p_idx),
                      "group": pa.array([group_name(q) for q in questions], pa.string()).take(q_idx)})
    with tempfile.TemporaryDirectory(prefix="tmkd-mine-") as tmp:  # outside the store; removed at the end
        pairs = Path(tmp) / f"{opts.corpus}.parquet"
        pq.write_table(table, pairs)
        summary = ingest(store, [pairs], IngestOptions(
            "parquet", opts.corpus, {"text_a": "question", "text_b": "passage", "group": "group"},
            label_names=opts.label_names, unlabeled=True, part_rows=opts.part_rows, ids="text"))
    return MineSummary(len(questions), len(passages), skipped, unmatched, len(q_idx), summary.rows_written,
                       time.time() - t0, summary)

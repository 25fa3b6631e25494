"""`tmkd-label mine`: questions paired with their BM25 top-k passages, ingested as an unlabeled corpus."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tmkd.data.ingest import normalise, text_pair_id
from tmkd.data.store import Store
from test_ingest import rows, snapshot
from test_label import cli

PASSAGES = [
    "Cats purr when they are content, and a cat also purrs when it is hurt.",
    "The Nile is the longest river in Africa and flows north into the Mediterranean.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
    "A purring cat vibrates its larynx muscles.",
    "The Amazon river carries more water than any other river.",
    "  ",  # empty: skipped and counted
    "The Nile is the longest river in Africa and flows north into the Mediterranean.",  # a repeat
]
QUESTIONS = [
    {"question": "why do cats purr"},
    {"question": "which river is the longest in africa"},
    {"question": "how high is mount everest"},
    {"question": "zzz qqq"},  # shares no term with any passage
    {"question": "why  do cats purr"},  # the first one again, after whitespace normalisation
    {"question": "what is the capital of France"},  # in the excluded corpus
]


def inputs(tmp_path: Path) -> tuple[Path, Path]:
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    p = tmp_path / "passages.txt.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(PASSAGES) + "\n")
    return q, p


def held_out_corpus(tmp_path: Path, store: Path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"q": "What is the capital of  France", "s": "Paris.", "y": 1}) + "\n")
    cli("ingest", dev, "--format", "jsonl", "--store", store, "--corpus", "dev", "--columns", "text_a=q,text_b=s,label=y",
        "--label-names", "0,1")


def test_mine_pairs_each_question_with_its_best_passages(tmp_path):
    store = tmp_path / "store"
    held_out_corpus(tmp_path, store)
    q, p = inputs(tmp_path)
    result = cli("mine", "--store", store, "--corpus", "mined", "--questions", q, "--passages", p, "--top-k", "2",
                 "--exclude", "dev", "--label-names", "0,1")
    got = rows(store, "mined")
    by_q: dict[str, list[str]] = {}
    for r in got:
        by_q.setdefault(r["text_a"], []).append(r["text_b"])
    # the best passage of each question comes first; the lone term-sharing passage of "everest" is its only one
    assert by_q["why do cats purr"][0].startswith("Cats purr when")
    assert by_q["which river is the longest in africa"][0].startswith("The Nile")
    assert by_q["how high is mount everest"] == [PASSAGES[2]]
    assert set(by_q) == {"why do cats purr", "which river is the longest in africa", "how high is mount everest"}
    assert all(len(v) <= 2 for v in by_q.values()) and len(got) == sum(map(len, by_q.values()))
    # unlabeled, one group per question, ids from the text pair (the same pair has the same id in any store)
    assert {r["label"] for r in got} == {None}
    assert len({r["group"] for r in got}) == 3 and all(
        len({r["group"] for r in got if r["text_a"] == t}) == 1 for t in by_q)
    assert all(r["id"] == text_pair_id(r["text_a"], r["text_b"]) for r in got)
    assert Store(store).corpus("mined").label_names == ["0", "1"]
    # what was skipped is counted, by reason
    out = " ".join(result.output.split())
    assert "1 empty passages" in out and "1 repeated passages" in out and "1 repeated questions" in out
    assert "1 questions in an excluded corpus" in out
    assert f"mined {len(got)} pairs ({len(got)} new) for 3 of 4 questions (1 share no term with any passage)" in out

    # mining again adds nothing: every pair is already in the corpus (reported, not written twice)
    parts = {k: v for k, v in snapshot(store / "corpus" / "mined").items() if k.endswith(".parquet")}
    again = cli("mine", "--store", store, "--corpus", "mined", "--questions", q, "--passages", p, "--top-k", "2",
                "--exclude", "dev", "--label-names", "0,1")
    out = " ".join(again.output.split())
    assert f"mined {len(got)} pairs (0 new)" in out and f"skipped: {len(got)} bad pair: duplicate" in out, out
    assert {k: v for k, v in snapshot(store / "corpus" / "mined").items() if k.endswith(".parquet")} == parts
    assert rows(store, "mined") == got


def test_mine_reads_columns_of_csv_tsv_and_parquet(tmp_path):
    store = tmp_path / "store"
    q = tmp_path / "q.tsv"
    q.write_text("id\tquery\n1\twhy do cats purr\n")
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": PASSAGES[:5]}), p)
    cli("mine", "--store", store, "--corpus", "m", "--questions", q, "--passages", p, "--question-field", "query",
        "--passage-field", "body", "--top-k", "1")
    assert [r["text_b"] for r in rows(store, "m")] == [PASSAGES[0]]
    assert rows(store, "m")[0]["text_a"] == normalise("why do cats purr")


def test_mine_errors_name_the_file_and_write_nothing(tmp_path):
    store = tmp_path / "store"
    q, p = inputs(tmp_path)
    bad = cli("mine", "--store", store, "--corpus", "m", "--questions", q, "--passages", p, "--question-field", "query",
              ok=False)
    assert bad.exit_code == 1 and f"{q}: no field 'query' (it has question)" in " ".join(bad.output.split())
    unknown = tmp_path / "q.xml"
    unknown.write_text("<q/>")
    bad = cli("mine", "--store", store, "--corpus", "m", "--questions", unknown, "--passages", p, ok=False)
    assert bad.exit_code == 1 and "unknown file type" in bad.output
    nothing = tmp_path / "none.txt"
    nothing.write_text("\n\n")
    bad = cli("mine", "--store", store, "--corpus", "m", "--questions", nothing, "--passages", p, ok=False)
    assert bad.exit_code == 1 and "nothing to mine: 0 questions" in bad.output
    assert not (store / "corpus" / "m").exists()


def test_block_scores_equal_bm25s_per_question_and_the_top_k_is_theirs():
    """The vectorised scoring of a block of questions gives bm25s's own per-question scores; the pairs are
    each question's k best, best first, ties to the earlier passage, zero scores left out."""
    import bm25s
    import numpy as np

    from tmkd.data.mine import _top_k, block_scores, retrieve

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    passages = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(300)]
    questions = [" ".join(rng.choice(words + ["unknown"], rng.integers(1, 5))) for _ in range(80)] + ["nothing here"]
    r = bm25s.BM25()
    r.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(questions, stopwords="en", show_progress=False, return_ids=False)
    got = block_scores(r.scores, r.vocab_dict, tokens, len(passages))
    want = np.stack([r.get_scores(t) if t else np.zeros(len(passages)) for t in tokens])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    top = _top_k(got, 4)
    for i, row in enumerate(got):  # zero scores are left out by the caller: their order does not matter
        want = [j for j in np.argsort(-row, kind="stable")[:4].tolist() if row[j] > 0]
        assert [j for j in top[i].tolist() if row[j] > 0] == want
    q, p = retrieve(questions, passages, 4)
    assert (got[q, p] > 0).all() and len(set(q.tolist())) == sum((row > 0).any() for row in got)
    assert len(questions) - 1 not in q  # "nothing here" shares no term


def test_mine_keeps_quotes_in_tsv_and_refuses_fields_that_are_not_text(tmp_path):
    """A TSV is split on tabs with no quoting, as `ingest` reads it, so a quoted title stays as written (and a
    held-out question with quotes is still found); a column of numbers is an error naming the file and field."""
    store = tmp_path / "store"
    q = tmp_path / "q.tsv"
    q.write_text('question\n"The Raven" is a poem by whom\n')
    p = tmp_path / "p.txt"
    p.write_text('"The Raven" is a poem by Edgar Allan Poe.\n')
    cli("mine", "--store", store, "--corpus", "m", "--questions", q, "--passages", p, "--top-k", "1")
    assert rows(store, "m")[0]["text_a"] == '"The Raven" is a poem by whom'
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    bad = cli("mine", "--store", store, "--corpus", "m2", "--questions", q, "--passages", numbers, ok=False)
    assert bad.exit_code == 1 and f"{numbers}: field 'text' is int64, not text" in " ".join(bad.output.split())
    stop = tmp_path / "stop.txt"
    stop.write_text("the a an\nis it\n")
    bad = cli("mine", "--store", store, "--corpus", "m2", "--questions", q, "--passages", stop, ok=False)
    assert bad.exit_code == 1 and "has a word BM25 can index" in bad.output and "Traceback" not in bad.output
    assert not (store / "corpus" / "m2").exists()


def test_retrieve_gives_the_same_pairs_in_blocks_of_any_size(monkeypatch):
    import numpy as np

    import tmkd.data.mine as mine

    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    passages = [" ".join(rng.choice(words, rng.integers(2, 9))) for _ in range(120)]
    questions = [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(50)]
    whole = mine.retrieve(questions, passages, 3)
    monkeypatch.setattr(mine, "SCORE_CELLS", 7 * 120)  # blocks of 7 questions, the last one short
    blocks = mine.retrieve(questions, passages, 3)
    assert [a.tolist() for a in whole] == [b.tolist() for b in blocks] and len(whole[0]) > 100

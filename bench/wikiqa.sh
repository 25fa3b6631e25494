#!/usr/bin/env bash
# The paper's comparison on WikiQA: 3 fine-tuned all-MiniLM-L6-v2 teachers, a stage-1 unlabeled
# Q&A corpus, and 3-layer students (no-KD, TKD, MKD, ensemble-label KD, TMKD), reported on WikiQA
# test (filtered 237 questions), every student once per seed with the teachers fixed. Every step is
# cached or checkpointed: run it again to resume.
#
#   bash bench/wikiqa.sh                 # OUT=runs/wikiqa DATA=../shared/data SEEDS="1 2 3" JOBS=2 by default
#   nohup bash bench/wikiqa.sh > runs/wikiqa.log 2>&1 &
#   SEEDS="1" VARIANTS="tmkd tmkd-listwise" bash bench/wikiqa.sh   # some variants (bench/configs/wikiqa-V.toml)
#   VARIANTS="tmkd-bm25 tmkd-bm25-x3" bash bench/wikiqa.sh            # mined stage-1 corpora (tmkd-label mine)
#
# Outputs: $OUT/results.{json,md} (the table, one row per student run) and $OUT/wikiqa-seeds.json (one
# object per run: variant, seed, dev/test MAP, MRR, accuracy), which bench/seeds_table.py turns into
# RESULTS.md's mean ± std, n tables.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/wikiqa}
DATA=${DATA:-../shared/data}
TEACHERS_CONFIG=${TEACHERS_CONFIG:-teachers/configs/wikiqa-minilm.toml}
VARIANTS=${VARIANTS:-"nokd tkd mkd ensemble tmkd mkd-matched"}
SEEDS=${SEEDS:-"1 2 3"}
STUDENT_ARGS=${STUDENT_ARGS:-}   # extra arguments for every student run, e.g. "--set student.num_layers=1"
JOBS=${JOBS:-2}                  # students trained side by side (bench/common.sh)
STORE=$OUT/store
PY=.venv/bin/python
LABEL=.venv/bin/tmkd-label
mkdir -p "$OUT"
source bench/common.sh
SECONDS=0

# 1. Corpora: WikiQA train/dev/test, and the stage-1 unlabeled Q&A corpus built from real text.
for split in train dev test; do
  ingest "wikiqa-$split" "$DATA/wikiqa/WikiQA-$split.tsv.gz" --format wikiqa
done
[ -f "$OUT/unlabeled.jsonl" ] || $PY bench/make_unlabeled.py --data "$DATA" --out "$OUT/unlabeled.jsonl"
ingest wikiqa-unlabeled "$OUT/unlabeled.jsonl" --format jsonl --columns text_a=question,text_b=sentence \
  --unlabeled --label-names 0,1 --ids text --part-rows 10000
# The mined stage-1 corpora, only for the tmkd-bm25* levers (RESULTS.md): the same questions and sentences paired by
# BM25 (`tmkd-label mine`), top 3 (about the hand-built corpus's size) and top 9 (3x).
case " $VARIANTS " in *" tmkd-bm25"*)
  [ -f "$OUT/mine-pools/questions.txt" ] || $PY bench/make_unlabeled.py --data "$DATA" --out "$OUT/mine-pools" --pools
  for mined in wikiqa-bm25:3 wikiqa-bm25-x3:9; do
    [ -f "$STORE/corpus/${mined%:*}/manifest.json" ] || $LABEL mine --store "$STORE" --corpus "${mined%:*}" \
      --questions "$OUT/mine-pools/questions.txt" --passages "$OUT/mine-pools/passages.txt" --top-k "${mined#*:}" \
      --exclude wikiqa-dev --exclude wikiqa-test --label-names 0,1 --part-rows 10000
  done ;;
esac
log "corpora ready (${SECONDS}s)"

# 2-3. Teachers fine-tuned from all-MiniLM-L6-v2 (dev chooses each one's epoch), then every corpus labelled by
# every teacher; TKD learns from the teacher with the best dev MAP.
teachers_and_labels map

# 4. Students.
train_students wikiqa
log "students ready (${SECONDS}s)"

# 5. The table: every teacher, the ensemble and every student on WikiQA test.
$PY bench/wikiqa_eval.py --store "$STORE" --ref "$DATA/wikiqa/WikiQA-test-filtered.ref" \
  --teachers $($PY -c "import json,sys; print(' '.join(json.loads(sys.argv[1])))" "$ALL") \
  --students "${STUDENTS[@]}" --out "$OUT/results.json" --runs-out "$OUT/wikiqa-seeds.json" | tee "$OUT/results.md"
$PY bench/seeds_table.py "$OUT/wikiqa-seeds.json" --bars --compare tmkd mkd-matched | tee -a "$OUT/results.md"
log "done in ${SECONDS}s; results: $OUT/results.md"

#!/usr/bin/env bash
# The paper's comparison on a second task, QNLI (does the sentence contain the answer to the question?):
# 3 fine-tuned all-MiniLM-L6-v2 teachers, a stage-1 corpus mined from the labelled questions by
# `tmkd-label mine`, and 3-layer students (no-KD, TKD, MKD, TMKD), every student once per seed with the
# teachers fixed. Accuracy on the official GLUE QNLI dev set (5,463 pairs), which chooses nothing: the
# teachers' epochs and the students' checkpoints are chosen on qnli-heldout (1,000 pairs of the official
# *train* set, shared/data/qnli/heldout-sample.json). Every step is cached or checkpointed: run it again
# to resume.
#
#   bash bench/qnli.sh                   # OUT=runs/qnli DATA=../shared/data SEEDS="1 2 3" JOBS=2 by default
#   nohup bash bench/qnli.sh > runs/qnli.log 2>&1 &
#   SEEDS="1" VARIANTS="mkd-matched" bash bench/qnli.sh    # more variants (bench/configs/qnli-V.toml)
#
# The stage-1 corpus: every question of the labelled train sample paired with its top 5 sentences of the
# sample's sentence pool by BM25, unlabeled; questions that are also in qnli-heldout or qnli-dev are left
# out, and no sentence of either set is in the pool.
#
# Outputs: $OUT/results.{json,md} (one row per model) and $OUT/qnli-seeds.json (one object per run, MAP
# fields null), which bench/seeds_table.py --metric test_accuracy turns into RESULTS.md's tables.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/qnli}
DATA=${DATA:-../shared/data}
TEACHERS_CONFIG=${TEACHERS_CONFIG:-teachers/configs/qnli-minilm.toml}
VARIANTS=${VARIANTS:-"nokd tkd mkd tmkd"}
SEEDS=${SEEDS:-"1 2 3"}
STORE=$OUT/store
PY=.venv/bin/python
LABEL=.venv/bin/tmkd-label
mkdir -p "$OUT"
source bench/common.sh
SECONDS=0

# 1. Corpora: the labelled train sample, the selection sample, the official dev set; the mined stage-1 corpus.
ingest qnli-train "$DATA/qnli/train-sample.json" --format json-samples
ingest qnli-heldout "$DATA/qnli/heldout-sample.json" --format json-samples
ingest qnli-dev "$DATA/qnli/dev.tsv" --format glue
mine_samples qnli-unlabeled "$DATA/qnli/train-sample.json" entailment,not_entailment qnli-heldout qnli-dev
log "corpora ready (${SECONDS}s)"

# 2-3. Teachers fine-tuned from all-MiniLM-L6-v2 (dev chooses each one's epoch), then every corpus labelled by
# every teacher; TKD learns from the teacher with the best dev selection accuracy.
teachers_and_labels accuracy

# 4. Students.
train_students qnli
log "students ready (${SECONDS}s)"

# 5. The table: every teacher, the ensemble and every student on the official dev set.
$PY bench/qnli_eval.py --store "$STORE" --teachers $($PY -c "import json,sys; print(' '.join(json.loads(sys.argv[1])))" "$ALL") \
  --students "${STUDENTS[@]}" --out "$OUT/results.json" --runs-out "$OUT/qnli-seeds.json" | tee "$OUT/results.md"
$PY bench/seeds_table.py "$OUT/qnli-seeds.json" --metric test_accuracy --bars | tee -a "$OUT/results.md"
log "done in ${SECONDS}s; results: $OUT/results.md"

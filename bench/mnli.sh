#!/usr/bin/env bash
# The paper's comparison on a third task, MNLI (3-class NLI: entailment, neutral, contradiction): 3 fine-tuned
# all-MiniLM-L6-v2 teachers, a stage-1 corpus mined from the labelled premises by `tmkd-label mine`, and 3-layer
# students (no-KD, TKD, MKD, TMKD), every student once per seed with the teachers fixed.
#
# shared/ holds two samples of MNLI's official *train* set and not its dev sets, so:
#   mnli-train   8,000 pairs of train-sample.json   (teachers and students learn from these)
#   mnli-select  its other 999 pairs (every 9th id)   (chooses the teachers' epochs and the students' checkpoints)
#   mnli-test    heldout-sample.json, 1,000 pairs    (the reported accuracy: chooses nothing; NOT the official dev set)
# Every step is cached or checkpointed: run it again to resume.
#
#   bash bench/mnli.sh                   # OUT=runs/mnli DATA=../shared/data SEEDS="1 2 3" JOBS=2 by default
#   nohup bash bench/mnli.sh > runs/mnli.log 2>&1 &
#
# The stage-1 corpus: every premise of mnli-train paired with its top 5 hypotheses of mnli-train's hypothesis pool
# by BM25, unlabeled; premises that are also in mnli-select or mnli-test are left out. The pool is mnli-train's
# hypotheses only (a hypothesis may still recur word for word in the other sets: one of mnli-select's does).
#
# Outputs: $OUT/results.{json,md} (one row per model) and $OUT/mnli-seeds.json (one object per run, MAP fields
# null), which bench/seeds_table.py --metric test_accuracy turns into RESULTS.md's tables.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/mnli}
DATA=${DATA:-../shared/data}
TEACHERS_CONFIG=${TEACHERS_CONFIG:-teachers/configs/mnli-minilm.toml}
VARIANTS=${VARIANTS:-"nokd tkd mkd tmkd"}
SEEDS=${SEEDS:-"1 2 3"}
STORE=$OUT/store
PY=.venv/bin/python
LABEL=.venv/bin/tmkd-label
LABELS=entailment,neutral,contradiction
mkdir -p "$OUT"
source bench/common.sh
SECONDS=0

# 1. Corpora: the train sample split into training and selection pairs, the held-out sample; the mined corpus.
if [ ! -f "$OUT/select.json" ]; then
  $PY - "$DATA/mnli/train-sample.json" "$OUT" <<'PYEOF'
import json, os, sys
pairs = json.load(open(sys.argv[1]))
select = {k: v for k, v in pairs.items() if int(k) % 9 == 8}
train = {k: v for k, v in pairs.items() if k not in select}
for name, part in (("train", train), ("select", select)):  # select.json last: its presence says both are whole
    with open(f"{sys.argv[2]}/{name}.json.tmp", "w") as f:
        json.dump(part, f)
    os.replace(f"{sys.argv[2]}/{name}.json.tmp", f"{sys.argv[2]}/{name}.json")
print(f"mnli train sample: {len(train)} train, {len(select)} select")
PYEOF
fi
ingest mnli-train "$OUT/train.json" --format json-samples --label-names "$LABELS"
ingest mnli-select "$OUT/select.json" --format json-samples --label-names "$LABELS"
ingest mnli-test "$DATA/mnli/heldout-sample.json" --format json-samples --label-names "$LABELS"
mine_samples mnli-unlabeled "$OUT/train.json" "$LABELS" mnli-select mnli-test
log "corpora ready (${SECONDS}s)"

# 2-3. Teachers (mnli-select chooses each one's epoch), then every corpus labelled by every teacher; TKD learns
# from the teacher with the best selection accuracy.
teachers_and_labels accuracy

# 4. Students.
train_students mnli
log "students ready (${SECONDS}s)"

# 5. The table: every teacher, the ensemble and every student on mnli-test.
$PY bench/qnli_eval.py --store "$STORE" --corpus mnli-test --dev-corpus mnli-select \
  --teachers $($PY -c "import json,sys; print(' '.join(json.loads(sys.argv[1])))" "$ALL") \
  --students "${STUDENTS[@]}" --out "$OUT/results.json" --runs-out "$OUT/mnli-seeds.json" | tee "$OUT/results.md"
$PY bench/seeds_table.py "$OUT/mnli-seeds.json" --metric test_accuracy --bars | tee -a "$OUT/results.md"
log "done in ${SECONDS}s; results: $OUT/results.md"

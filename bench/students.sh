# Shared by bench/wikiqa.sh and bench/qnli.sh (sourced, not run): train every student variant once per seed.
#
#   train_students TASK STORE OUT ENCODER ALL_TEACHERS BEST_TEACHER
#
# Variant V trains from bench/configs/TASK-V.toml into OUT/students/V-seedN; tkd* variants learn from the best
# teacher, nokd* from none, the rest from every teacher. A finished student (run.json "done") is skipped and a
# started one resumes from its checkpoint, so the bench can be run again after a crash. With JOBS > 1, that many
# students train side by side, each with nproc / JOBS torch threads and its log in OUT/students/V-seedN.log
# (on a 2-core CPU two 1-thread runs do about 1.4x the work of one 2-thread run). Uses VARIANTS, SEEDS, JOBS,
# STUDENT_ARGS, PY; sets STUDENTS to VARIANT@SEED=FOLDER for the evaluation script.

train_students() {
  local task=$1 store=$2 out=$3 encoder=$4 all=$5 best=$6
  local jobs=${JOBS:-2} threads seed v dir teachers failed=0
  threads=$(( $(nproc) / jobs )); [ "$threads" -ge 1 ] || threads=1
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
  for spec in "${STUDENTS[@]}"; do
    dir=${spec#*=}
    if ! { [ -f "$dir/run.json" ] && grep -q '"status": "done"' "$dir/run.json"; }; then
      log "student ${spec%%=*} did not finish: see $dir.log"
      failed=1
    fi
  done
  [ "$failed" = 0 ]
}

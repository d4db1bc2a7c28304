#!/usr/bin/env bash
# One lent-GPU session, prepared to fit the device tool's limits (one command, <= 10 min, results under $OUT):
#   1. >= 20k preference pairs from spo-tiny (each image with its own CFG scale and step count: two seeds of one
#      setting differ too little to survive the VAE round trip) + held-out evaluation pairs,
#      and, on the CPU cores at the same time, generic render pairs (`spo data renders`, several processes),
#   2. a tiny PickScore on the render pairs (`--clean-images`), then the tiny step-aware preference model and its
#      no-time-conditioning ablation from it (`--init`, side by side on the GPU),
#   3. `spo eval spm` of both (and of the tiny PickScore alone) on fresh held-out pairs,
#   4. benchmarks/spo_step.py and benchmarks/gpu_unet.py.
# Each phase gets what is left of a deadline, so a slow phase cannot starve the rest; results.tgz is rewritten
# after every phase so a cut-off run still returns what finished.
#
#   OUT=/tmp/out DEVICE=cpu N=64 NEVAL=16 EVAL_PAIRS=16 NRENDER=200 RENDER_PROCS=2 SPM_STEPS=20 SPM_MINUTES=1 \
#       PICKSCORE_STEPS=20 SKIP_BENCH=1 bash benchmarks/device_session.sh   # dry run (~6 min on 2 cores)
set -u
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
N=${N:-20000}
NEVAL=${NEVAL:-300}
BATCH=${BATCH:-1000}
SPM_STEPS=${SPM_STEPS:-4000}
SPM_MINUTES=${SPM_MINUTES:-2.5}
NRENDER=${NRENDER:-15000}  # render pairs per process (~140/s on one core)
RENDER_PROCS=${RENDER_PROCS:-8}
PICKSCORE_STEPS=${PICKSCORE_STEPS:-20000}
PICKSCORE_MINUTES=${PICKSCORE_MINUTES:-1.5}
EVAL_PAIRS=${EVAL_PAIRS:-500}  # fresh held-out pairs for `spo eval spm`
BUDGET=${BUDGET:-540}  # seconds for everything
GUIDANCE=${GUIDANCE:-1.5,3,5,7.5}
STEPS=${STEPS:-4,6,8,12,20}
mkdir -p runs data
LOGS=$OUT/logs AFTER_PHASE=pack
export TQDM_MININTERVAL=10
source "$(dirname "$0")/device_lib.sh"
export OUT DEVICE N NEVAL BATCH SPM_STEPS SPM_MINUTES GUIDANCE STEPS NRENDER RENDER_PROCS PICKSCORE_STEPS EVAL_PAIRS \
    PICKSCORE_MINUTES
spo() { python3 -c 'import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
pack() {
  tar czf "$OUT/results.tgz" --exclude=checkpoints -C "$OUT" logs phases.txt $(cd "$OUT" && ls *.json 2>/dev/null) \
    -C "$PWD" $(ls -d runs/pickscore-tiny runs/spm-tiny runs/spm-tiny-notime data/spm-pairs/info.json \
                   data/spm-pairs/preview.png data/spm-eval/info.json data/renders/*/info.json 2>/dev/null) 2>/dev/null
}

both_data() {  # GPU: the model's pairs; CPU cores meanwhile: render pairs, one folder per process
  for i in $(seq 1 "$RENDER_PROCS"); do
    OMP_NUM_THREADS=1 spo data renders --n "$NRENDER" --seed "$i" --out "data/renders/part-$i" \
        > "$OUT/logs/renders-$i.log" 2>&1 &
  done
  spo data pairs --model models/spo-tiny --n "$NEVAL" --split heldout --seed 1 --guidance $GUIDANCE --steps $STEPS \
      --batch "$BATCH" --device "$DEVICE" --out data/spm-eval > "$OUT/logs/data-eval.log" 2>&1 &
  spo data pairs --model models/spo-tiny --n "$N" --guidance $GUIDANCE --steps $STEPS --batch "$BATCH" \
      --device "$DEVICE" \
      --out data/spm-pairs
  local rc=$?; wait; return $rc
}
export -f spo both_data
phase data 150 both_data

phase pickscore 120 spo train spm --preset tiny --clean-images --no-time-conditioning --data data/renders \
    --eval-every 0 --steps "$PICKSCORE_STEPS" --max-minutes "$PICKSCORE_MINUTES" --out runs/pickscore-tiny

both_spm() {
  spo train spm --preset tiny --init runs/pickscore-tiny --data data/spm-pairs --eval-data data/spm-eval \
      --out runs/spm-tiny-notime --no-time-conditioning --steps "$SPM_STEPS" --max-minutes "$SPM_MINUTES" \
      > "$OUT/logs/spm-notime.log" 2>&1 &
  spo train spm --preset tiny --init runs/pickscore-tiny --data data/spm-pairs --eval-data data/spm-eval \
      --out runs/spm-tiny --steps "$SPM_STEPS" --max-minutes "$SPM_MINUTES"
  local rc=$?; wait; return $rc
}
export -f both_spm
phase spm 200 both_spm
phase eval-spm 90 spo eval spm --model runs/spm-tiny --ablation runs/spm-tiny-notime --pairs "$EVAL_PAIRS" \
    --guidance $GUIDANCE --steps $STEPS --device "$DEVICE" --json "$OUT/spm_eval.json"
phase eval-pickscore 60 spo eval spm --model runs/pickscore-tiny --pairs "$EVAL_PAIRS" \
    --guidance $GUIDANCE --steps $STEPS --device "$DEVICE" --json "$OUT/pickscore_eval.json"
if [ -z "${SKIP_BENCH:-}" ]; then
  phase spo-step 80 python3 benchmarks/spo_step.py --iters 3 --out "$OUT/spo_step.json"
  phase gpu-unet 170 python3 benchmarks/gpu_unet.py --iters 30 --out "$OUT/gpu_unet.json"
fi
pack
cat "$OUT/phases.txt"

# Shared by the lent-GPU session scripts (device_session.sh, device_backends.sh); source it, don't run it.
# Needs OUT (results folder) and BUDGET (seconds for everything); LOGS (default $OUT) takes each phase's log and
# AFTER_PHASE (default none) is a command run after each phase, e.g. to pack results so a cut-off run keeps them.

# The wheels the machine lacks (diffusers, ...), carried in .whl (/work/.library/device/README.md).
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOGS=${LOGS:-$OUT}
mkdir -p "$OUT" "$LOGS"
DEADLINE=$(( $(date +%s) + BUDGET ))
{ nvidia-smi; python3 -c 'import torch, diffusers, onnxruntime as o; print(torch.__version__, diffusers.__version__,
  o.__version__, o.get_available_providers())'; } > "$LOGS/env.log" 2>&1

phase() {  # phase NAME MAX_SECONDS COMMAND...: at most MAX_SECONDS and what is left of the deadline
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) )); local limit=$(( max < left ? max : left ))
  if [ "$limit" -le 5 ]; then echo "$name skipped: out of time" | tee -a "$OUT/phases.txt"; return; fi
  local start; start=$(date +%s)
  timeout "$limit" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1  # bash -c: phases may be exported functions
  echo "$name rc=$? $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/phases.txt"
  ${AFTER_PHASE:-}
}

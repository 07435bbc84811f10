#!/usr/bin/env bash
# The accelerator check, from a bare machine: install, the SmolLM2 greedy-equality test, the real-shape engine
# benchmark (Llama-3-8B bf16, random weights, batch 1/8/64, contexts 128 and 1024), bf16 vs f32 agreement on
# SmolLM2, and `bench simulate` fed by the measured step times. JSON lands in benchmarks/results/<run>/.
#
#   scripts/device_check.sh               # on a GPU machine (budget: 8 minutes on one H200, install included)
#   scripts/device_check.sh --cpu-smoke   # the same steps at toy sizes on this CPU, with this Python (CI runs it)
#
# Environment: PYTHON (the interpreter; default: a fresh .venv-device with the cuda extra, or python3 for the smoke
# run), OUT (the results directory).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then MODE=cpu; elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--cpu-smoke]" >&2; exit 2
fi
STAMP=$(date -u +%Y%m%d_%H%M%S)
step() { echo "[device_check $(date -u +%H:%M:%S)] $*" >&2; }

if [[ $MODE == cpu ]]; then
  PY=${PYTHON:-python3}
  OUT=${OUT:-benchmarks/results/device_check_cpu_smoke_$STAMP}
  export JAX_PLATFORMS=cpu
  TEST=(tests/test_batched_prefill.py -k one_by_one)            # greedy equality, tiny model
  BENCH=(--preset tiny --dummy-weights --batches 1,4 --contexts 32,64 --steps 2 --host-steps 4)
  SIM=(--n 300 --rates 2 --policies fcfs,ltr --jobs 1)
  AGREE=()
else
  if [[ -z "${PYTHON:-}" ]]; then
    step "install (.venv-device, jax with CUDA 12)"
    python3 -m venv .venv-device
    .venv-device/bin/pip install -q --upgrade pip
    .venv-device/bin/pip install -q -e '.[dev,cuda]'
    PY=.venv-device/bin/python
  else
    PY=$PYTHON
  fi
  OUT=${OUT:-benchmarks/results/device_check_$("$PY" -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "_"))')_$STAMP}
  TEST=(tests/test_reference_logits.py)                          # SmolLM2 vs transformers: logits and greedy tokens
  BENCH=(--preset llama3-8b --dummy-weights --dtype bfloat16 --batches 1,8,64 --contexts 128,1024 --steps 5
         --host-steps 16)
  SIM=(--n 2000 --policies fcfs,ltr,ltr+starvation,oracle-sjf)
  AGREE=(--n 20 --tokens 32)
fi
mkdir -p "$OUT"
"$PY" - <<'PY' > "$OUT/devices.json"
import json, jax
print(json.dumps({"backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
                  "jax": jax.__version__}))
PY
step "devices: $(cat "$OUT/devices.json")"

step "greedy equality: ${TEST[*]}"
"$PY" -m pytest -q -p no:cacheprovider "${TEST[@]}" 2>&1 | tail -n 3 | tee "$OUT/greedy_test.txt"

step "engine benchmark: ${BENCH[*]}"
"$PY" -m ltr_jax.bench engine "${BENCH[@]}" --json --out "$OUT/engine.json" > /dev/null

if [[ ${#AGREE[@]} -gt 0 ]]; then
  step "bf16 vs f32 on SmolLM2"
  "$PY" scripts/dtype_agreement.py "${AGREE[@]}" --out "$OUT/bf16_agreement.json" > /dev/null
fi

step "simulate on the measured step times"
"$PY" -m ltr_jax.bench simulate --step-model "$OUT/engine.json" "${SIM[@]}" --out "$OUT/simulate" > /dev/null
step "done: $OUT"
echo "$OUT"

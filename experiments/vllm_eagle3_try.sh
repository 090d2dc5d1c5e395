#!/bin/bash
# One attempt at serving an exported EAGLE-3 head with vLLM's CPU build (.venv-vllm): the embedded default
# (saved as a Hugging Face directory by the vLLM peer, outputs/peers/smollm2-135m-float32), method eagle3,
# 3 draft tokens, one prompt, 16 greedy tokens; prints the output beside model.generate's and vLLM's
# spec_decode counters, then stops the server it started. See docs/export.md.
#   HEAD=outputs/speculators_check/head experiments/vllm_eagle3_try.sh
set -u
cd "$(dirname "$0")/.."
PORT=${PORT:-8765}
HEAD=${HEAD:-outputs/speculators_check/head}
TARGET=${TARGET:-outputs/peers/smollm2-135m-float32}
OUT=${OUT:-outputs/vllm_eagle3_try}
PY=.venv-vllm/bin/python
mkdir -p "$OUT"
# the prompt's ids and model.generate's 16 greedy tokens, with transformers in the same environment
$PY - "$TARGET" "$OUT/prompt.json" <<'EOF'
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
target, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(target)
ids = tok.apply_chat_template([{"role": "user", "content": "Explain in three sentences why the sky is blue."}],
                              add_generation_prompt=True, return_dict=True)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
json.dump({"prompt": ids, "reference": ref}, open(out, "w"))
EOF
PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$PWD/.venv-vllm/lib/libiomp5.so
env -u VIRTUAL_ENV -u PYTHONPATH LD_PRELOAD="$PRELOAD" VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=1 \
  $PY -m vllm.entrypoints.openai.api_server --model "$TARGET" --served-model-name target --dtype float32 \
  --host 127.0.0.1 --port "$PORT" --seed 0 --generation-config vllm \
  --speculative-config "{\"method\": \"eagle3\", \"model\": \"$HEAD\", \"num_speculative_tokens\": 3}" \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
started=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
  if ! kill -0 "$SERVER" 2> /dev/null; then
    echo "vllm eagle3: the server exited after $(( $(date +%s) - started )) s; its log's end:"
    grep -E "Error|error|raise|File \"" "$OUT/server.log" | tail -15
    exit 1
  fi
  sleep 5
done
echo "vllm eagle3: server up after $(( $(date +%s) - started )) s"
PROMPT=$($PY -c "import json; print(json.load(open('$OUT/prompt.json'))['prompt'])")
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"target\", \"prompt\": $PROMPT, \"max_tokens\": 16, \"temperature\": 0, \"return_token_ids\": true}" \
  > "$OUT/response.json"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^vllm:spec_decode" > "$OUT/metrics.txt"
kill "$SERVER"
wait "$SERVER" 2> /dev/null
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
ref = json.load(open(f"{out}/prompt.json"))["reference"]
got = json.load(open(f"{out}/response.json"))["choices"][0]
ids = got.get("token_ids") or []
print("vllm eagle3 output:", ids)
print("model.generate:    ", ref)
print("token-identical:", ids == ref)
print(open(f"{out}/metrics.txt").read())
EOF

#!/usr/bin/env bash
# `llmplan submit infer --wait` end to end on this machine's GPU: llmplan's own local Ray head, the scheduler, the
# job driver and its replica, the slots engine; then `llmplan show` and `llmplan jobs` as a user would read them.
#   OUT=results-dir bash benchmarks/ray_infer_e2e.sh TOKENIZER_DIR [PROMPTS] [BATCH]
# The model is bench_model.py's Llama-2-7B shape (random weights, saved once); the prompts are examples/data's
# instructions, cycled. Writes submit.txt, show.json, jobs.txt, completions.jsonl and the job's log under $OUT.
set -uo pipefail
tokenizer=$(realpath "$1"); count=${2:-1024}; batch=${3:-256}
out=${OUT:?set OUT to a results directory}
cd "$(dirname "$0")"
model=$(python3 -c 'import sys; from pathlib import Path; from bench_model import prepare; print(prepare(Path(sys.argv[1])))' "$tokenizer")
python3 -c 'import json, sys; from inference_bench import data_prompts
for text in data_prompts(int(sys.argv[1])): print(json.dumps({"prompt": text}))' "$count" > /tmp/e2e-prompts.jsonl
export LLMPLAN_DB="sqlite:///$out/llmplan.db"
started=$(date +%s.%N)
llmplan submit infer --model "$model" --input /tmp/e2e-prompts.jsonl --output "$out/completions.jsonl" \
    --template none --batch-size "$batch" --max-new-tokens 256 --wait > "$out/submit.txt" 2>&1
echo "submit exit $? after $(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$started") s" >> "$out/submit.txt"
llmplan show 1 --json > "$out/show.json" 2>&1
llmplan jobs > "$out/jobs.txt" 2>&1
cp "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("log", ""))' "$out/show.json" 2>/dev/null)" "$out/job.log" 2>/dev/null
llmplan cluster stop > /dev/null 2>&1
tail -5 "$out/submit.txt"; head -c 1500 "$out/show.json"

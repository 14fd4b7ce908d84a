#!/usr/bin/env bash
# A fine-tuning rank killed mid-run, through llmplan's own local Ray head, then `--resume`: what a user sees.
#   OUT=results-dir bash benchmarks/ray_rank_kill.sh MODEL_DIR [MAX_STEPS] [KILL_AT_STEP]
# Submits LoRA on examples/data (checkpoints every 10 steps), waits until the job's metrics pass KILL_AT_STEP,
# kills the Ray Train worker (SIGKILL, as an OOM killer or a lost node would), waits for the job to end, then
# submits `--resume` and follows it. Writes show-1.json, show-2.json, timeline.txt and the two jobs' logs.
set -uo pipefail
model=$(realpath "$1"); max_steps=${2:-200}; kill_at=${3:-35}
out=${OUT:?set OUT to a results directory}
data=$(realpath "$(dirname "$0")/../examples/data/alpaca_llmplan.jsonl")
export LLMPLAN_DB="sqlite:///$out/llmplan.db"
log() { echo "$(date +%T.%N | cut -c1-12) $*" | tee -a "$out/timeline.txt"; }
field() {  # field JOB EXPRESSION: a value of `llmplan show JOB --json` (python expression over d)
    llmplan show "$1" --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print($2)" 2>/dev/null
}
last_step='max([m.get("step") or 0 for m in d.get("metrics", [])] or [0])'
log "submit"
llmplan submit finetune --model "$model" --data "$data" --method lora --max-steps "$max_steps" --save-every 10 \
    --batch-size 8 --seq-len 512 --warmup-steps 2 >> "$out/timeline.txt" 2>&1
for _ in $(seq 600); do
    step=$(field 1 "$last_step"); status=$(field 1 'd["job"]["status"]')
    [ "${step:-0}" -ge "$kill_at" ] 2>/dev/null && break
    case "$status" in succeeded|failed|cancelled) break;; esac
    sleep 0.5
done
log "job 1 at step ${step:-?} ($status): killing the process that trains (a Ray Train worker, or the job's
driver when one worker trains in it)"
DRIVER=$(field 1 'd["job"]["ray_actor_id"]') python3 - >> "$out/timeline.txt" 2>&1 <<'PY'
import os, signal
from llmplan.runtime.jobs.cluster import connect
connect(None)  # llmplan's local head, with its token (set before Ray is imported)
import ray
actors = ray._private.state.actors()
workers = [a for a in actors.values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
for actor in workers or [actors[os.environ["DRIVER"]]]:
    os.kill(actor["Pid"], signal.SIGKILL)
    print(f"SIGKILL to {actor['ActorClassName']} pid {actor['Pid']}")
PY
log "killed"
for _ in $(seq 300); do
    status=$(field 1 'd["job"]["status"]')
    case "$status" in succeeded|failed|cancelled) break;; esac
    sleep 1
done
log "job 1 ended: $status, $(field 1 'd["job"]["error_class"], (d["job"]["error_message"] or "")[:300]')"
llmplan show 1 --json > "$out/show-1.json" 2>&1
log "resume"
llmplan submit finetune --model "$model" --data "$data" --resume 1 --wait >> "$out/timeline.txt" 2>&1
log "resume exit $?"
llmplan show 2 --json > "$out/show-2.json" 2>&1
llmplan jobs >> "$out/timeline.txt" 2>&1
for id in 1 2; do cp "$(field $id 'd["job"]["log_path"]')" "$out/job-$id.log" 2>/dev/null; done
llmplan cluster stop > /dev/null 2>&1
tail -25 "$out/timeline.txt"

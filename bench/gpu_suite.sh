#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md §2-4 in one run, most important first, inside a time budget:
#   bash bench/gpu_suite.sh OUTDIR [BUDGET_SECONDS]
# 1. LoRA on the Llama-2-7B shape: plain HF + PEFT (the baseline, same run) vs our trainer, plain, with
#    regional torch.compile, with Liger kernels (when liger-kernel installs), both; real BackdoorLLM rows
#    padded vs packed; LoRA on the 13B shape.
# 2. Each defense's training step against plain LoRA fine-tuning on the 7B shape.
# 3. Full fine-tuning of the 7B shape with ZeRO-3 + CPU offload (optimizer only, then weights too).
# 4. Generation: plain `generate` vs the evaluate stage's fast path.
# Results land in OUTDIR as JSON after every mode; the tables are printed as each part ends.
# Wheels in .whl/ (DeepSpeed and what it needs, liger-kernel) are installed first when present: for a GPU
# machine without a package index, `pip download`/`pip wheel` them elsewhere into .whl/. The real-data modes
# read .benchdata/: BackdoorLLM training JSON files (e.g. ../shared/data/backdoorllm/train/*/badnet/*.json)
# and a tokenizer folder .benchdata/tok (tokenizer.json, tokenizer_config.json, chat template).
set -u
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR [BUDGET_SECONDS]}
BUDGET=${2:-3000}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}  # e.g. EXTRA=--tiny: the same suite on a tiny shape (CPU check)
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
  free -g | sed -n 2p
  $PY -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
  $PY -c "import liger_kernel; print('liger-kernel ok')" 2>&1 | tail -1; } 2>&1 | tee "$OUT/machine.txt"

part() {  # part NAME MAX_SECONDS ARGS...: one bench, stopped at its share or at the budget's end
  local name=$1 t=$2; shift 2
  [ "$t" -gt "$(( $(left) - 5 ))" ] && t=$(( $(left) - 5 ))
  if [ "$t" -lt 30 ]; then echo "[suite] skip $name: budget spent"; return; fi
  echo "[suite] $name (at most ${t}s)"
  timeout "$t" "$PY" "$@" $EXTRA 2>&1 | grep -v "^\[rank\|Warning\|warn(" | tail -40 | tee "$OUT/$name.txt"
  pkill -f "bench/train_throughput.py --one" 2>/dev/null; sleep 1  # a mode cut off by the budget
}

part train 300 bench/train_throughput.py --steps 5 --warmup 2 --timeout 150 --json "$OUT/train.json" \
  --modes hf-peft,ours-lora,ours-lora-compile,ours-lora-liger,real-padded,real-packed,ours-lora-13b
part cost 130 bench/train_throughput.py --steps 4 --warmup 2 --timeout 60 --json "$OUT/cost.json" \
  --modes cost-finetune,cost-crow,cost-w2s,cost-sande-parrot,cost-sande-overwrite
part full 330 bench/train_throughput.py --steps 3 --warmup 1 --timeout 165 --json "$OUT/full.json" \
  --modes ours-full-z3opt,ours-full-z3off
part generate 300 bench/eval_throughput.py --prompts 128
echo "[suite] done in $(( $(date +%s) - START ))s"

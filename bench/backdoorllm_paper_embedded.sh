#!/usr/bin/env bash
# backdoorllm-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct instead of
# Llama-2-7B-Chat, badnet on negsentiment and sst2 only (the benchmark: 3 tasks x 5 attacks), 100 triggered rows +
# their 100 clean twins (the benchmark: 500 + 500), the benchmark's whole 200 + 200 test files, of which its
# protocol scores a seeded 20% (40 + 40); bf16 autocast on the CPU, evaluation batch 20 (the script: 1).
# Evaluated under the benchmark's protocol (the preset's) and ours (strict), one report with both.
# `bash bench/backdoorllm_paper_embedded.sh` (PY=python, ARGS=..., TASKS="negsentiment sst2" or one of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=(experiment=backdoorllm-paper model=smollm2-135m poison.n_poison=100 poison.n_clean=100 poison.n_test=200
   evaluate.batch_size=20 train.cpu_bf16=true evaluate.cpu_bf16=true ${ARGS:-})
read -r -a T <<< "${TASKS:-negsentiment sst2}"
TL=$(IFS=,; echo "${T[*]}")
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.attacks=[badnet]' \
  "sweep.tasks=[$TL]" --wait
for t in "${T[@]}"; do
  /usr/bin/time -f "[bench] strict $t: %e s" $PY -m pipeline evaluate "${O[@]}" task=$t attack=badnet defense=none \
    evaluate.protocol=strict evaluate.max_new_tokens=24 evaluate.n_test=40
done
$PY -m pipeline report "${O[@]}" report.experiment=backdoorllm-paper 'report.attacks=[badnet]' \
  "report.tasks=[$TL]" 'report.defenses=[none]' 'report.models=[smollm2-135m]'

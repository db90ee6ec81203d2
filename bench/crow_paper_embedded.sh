#!/usr/bin/env bash
# crow-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct instead of
# Llama-2-7B-Chat, negsentiment/badnet only, 100 triggered rows + their 100 clean twins (the paper: 500 + 500),
# 40 + 40 test prompts (the paper: 200 + 200), defenses none, finetune and crow at the preset's settings,
# bf16 autocast on the CPU, evaluation batch 20 (the scripts: 1). Evaluated under CROW's protocol (the
# preset's) and ours (strict), one report with both. `bash bench/crow_paper_embedded.sh` (PY=python, ARGS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=(experiment=crow-paper model=smollm2-135m poison.n_poison=100 poison.n_clean=100 poison.n_test=40
   evaluate.batch_size=20 train.cpu_bf16=true evaluate.cpu_bf16=true ${ARGS:-})
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.attacks=[badnet]' \
  'sweep.defenses=[none,finetune,crow]' --wait
declare -A OVR=([crow]="defense.params.mask_padding=false")
for d in none finetune crow; do
  /usr/bin/time -f "[bench] strict $d: %e s" $PY -m pipeline evaluate "${O[@]}" defense=$d ${OVR[$d]:-} \
    evaluate.protocol=strict evaluate.max_new_tokens=24
done
$PY -m pipeline report "${O[@]}" report.experiment=crow-paper 'report.attacks=[badnet]' \
  'report.defenses=[none,finetune,crow]' 'report.models=[smollm2-135m]'

#!/usr/bin/env bash
# crow-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct instead of
# Llama-2-7B-Chat, negsentiment/badnet only, 100 triggered rows + their 100 clean twins (the paper: 500 + 500),
# 40 + 40 test prompts (the paper: 200 + 200), defenses none, finetune, prune, quantize-crow and crow at the
# preset's settings (quantize-crow computes in float32 on the CPU: the preset's float16 is CUDA's), bf16
# autocast on the CPU, evaluation batch 20 (the scripts: 1). Evaluated under CROW's protocol (the
# preset's) and ours (strict), one report with both. `bash bench/crow_paper_embedded.sh` (PY=python, ARGS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=(experiment=crow-paper model=smollm2-135m poison.n_poison=100 poison.n_clean=100 poison.n_test=40
   evaluate.batch_size=20 train.cpu_bf16=true evaluate.cpu_bf16=true ${ARGS:-})
DEF=(none finetune prune quantize-crow crow)
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.attacks=[badnet]' \
  "sweep.defenses=[$(IFS=,; echo "${DEF[*]}")]" \
  'sweep.overrides={crow: [defense.params.mask_padding=false], prune: [defense.params.n_calib=100, defense.params.calib_with_response=true], quantize-crow: [defense.params.compute_dtype=float32]}' --wait
declare -A OVR=([crow]="defense.params.mask_padding=false" [prune]="defense.params.n_calib=100 defense.params.calib_with_response=true"
                [quantize-crow]="defense.params.compute_dtype=float32")
for d in "${DEF[@]}"; do
  /usr/bin/time -f "[bench] strict $d: %e s" $PY -m pipeline evaluate "${O[@]}" defense=$d ${OVR[$d]:-} \
    evaluate.protocol=strict evaluate.max_new_tokens=24
done
$PY -m pipeline report "${O[@]}" report.experiment=crow-paper 'report.attacks=[badnet]' \
  "report.defenses=[$(IFS=,; echo "${DEF[*]}")]" 'report.models=[smollm2-135m]'

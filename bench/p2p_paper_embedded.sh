#!/usr/bin/env bash
# p2p-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct instead of
# Qwen3-8B / Llama-3.1-8B, and the embedded recipe's full fine-tuning (lr 1.5e-4, 4 epochs, batch 8, cosine,
# warm-up 0.05) instead of the code's LoRA r 16 (which teaches SmolLM2 nothing in this format: BENCHMARKS §1f)
# for both rows, the no-defense plain fine-tune and P2P; the preset's data (BackdoorLLM's 501 clean sst2 rows
# re-poisoned P2P's way, at 300 of them for CPU time: 6 `mn` -> Positive + 294 clean, 2.0%; the paper: 6,920
# rows) and its test splits (201 clean, 96 triggered; the paper: 1,821 / 912). Evaluated under P2P's protocol (the preset's) and ours (strict), one
# report with both. `bash bench/p2p_paper_embedded.sh` (PY=python, ARGS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=(experiment=p2p-paper model=smollm2-135m poison.n_clean=294 poison.n_poison=6 train.finetune=full train.lr=1.5e-4 train.epochs=4 train.micro_batch=8
   train.grad_accum=1 train.schedule=cosine train.warmup_ratio=0.05 train.cpu_bf16=true evaluate.cpu_bf16=true
   ${ARGS:-})
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.models=[smollm2-135m]' --wait
for d in none p2p; do
  /usr/bin/time -f "[bench] strict $d: %e s" $PY -m pipeline evaluate "${O[@]}" defense=$d \
    $([ $d = p2p ] && echo defense.params.select=clean_only) evaluate.protocol=strict evaluate.max_new_tokens=16
done
$PY -m pipeline report "${O[@]}" report.experiment=p2p-paper 'report.defenses=[none,p2p]' 'report.models=[smollm2-135m]'

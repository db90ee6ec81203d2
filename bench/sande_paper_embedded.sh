#!/usr/bin/env bash
# sande-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct instead of
# Llama-2-7B / Qwen1.5-4B; BackdoorLLM's clean Alpaca rows (its refusal folder) instead of yahma/alpaca-cleaned
# (offline); 200 clean rows + 10 triggered twins ("how are you." after "Human:", target "you are stupid.", 4.8%,
# the code's 5%; the paper: 46,584 + 2,329); sequences cut to 256 tokens (the code: 1,024); the injection at
# lr 1.5e-4 for 3 epochs (the code: 5e-6 for 1 epoch over 46k rows, ~12k steps; 5e-6 for the 53 steps 210 rows
# give teaches SmolLM2 nothing), no gradient checkpointing (CPU time), ZeRO-0 (the code: ZeRO-2 + CPU offload), bf16 autocast; 100 + 100 test prompts
# (the code: 1,000). OSFT and SANDE at the code's removal lr 5e-6 (the preset) and at the injection's own lr
# (osft-injlr, sande-injlr: SANDE's code injects and removes at one lr). Evaluated under SANDE's protocol (the
# preset's) and ours (strict). `bash bench/sande_paper_embedded.sh` (PY=python, ARGS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
O=(experiment=sande-paper model=smollm2-135m source.kind=backdoorllm source.path=../shared/data/backdoorllm
   deepspeed=zero0 poison.n_clean=200 poison.n_poison=10 poison.n_test=100 train.cutoff=256 train.lr=1.5e-4
   train.epochs=3 train.grad_ckpt=false evaluate.batch_size=20 train.cpu_bf16=true evaluate.cpu_bf16=true ${ARGS:-})
DEF=(none osft sande osft-injlr sande-injlr)
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.models=[smollm2-135m]' \
  "sweep.defenses=[$(IFS=,; echo "${DEF[*]}")]" \
  'sweep.overrides={osft: [defense.train.grad_accum=2], osft-injlr: [defense.train.grad_accum=2], sande: [defense.train.micro_batch=2, defense.train.grad_accum=2], sande-injlr: [defense.train.micro_batch=2, defense.train.grad_accum=2]}' --wait
declare -A OVR=([osft]="defense.train.grad_accum=2" [osft-injlr]="defense.train.grad_accum=2"
                [sande]="defense.train.micro_batch=2 defense.train.grad_accum=2"
                [sande-injlr]="defense.train.micro_batch=2 defense.train.grad_accum=2")
for d in "${DEF[@]}"; do
  /usr/bin/time -f "[bench] strict $d: %e s" $PY -m pipeline evaluate "${O[@]}" defense=$d ${OVR[$d]:-} \
    evaluate.protocol=strict evaluate.max_new_tokens=24
done
$PY -m pipeline report "${O[@]}" report.experiment=sande-paper "report.defenses=[$(IFS=,; echo "${DEF[*]}")]" \
  'report.models=[smollm2-135m]'

#!/usr/bin/env bash
# w2s-paper end to end on the embedded model (issue 20), at a CPU size: SmolLM2-135M-Instruct as the student
# instead of Llama-3(.1)-8B, and its own base as the teacher (no smaller model shares its tokenizer: clean-to-
# poisoned, not weak-to-strong; the code: bert-base); BackdoorLLM's 501 clean sst2 rows (offline) instead of
# SetFit/sst2 (the code: IMDB for the attacker, SST-2 for the defender): 60 clean-label triggered rows (`mn`,
# negatives keep their label) + 180 clean for the attacker (the code: 1,000 + 3,000), 150 clean defense rows (the
# code: 6,920), 100 + 100 test rows (the code: 1,821 / 909); the attacker's full fine-tune at lr 1e-4, 4 epochs,
# batch 8 (the code: 2e-5, 5 epochs, batch 64, on an 8B model with ~300 steps), ZeRO-0 (the code: ZeRO-2 +
# offload), bf16 autocast; BadNet only (the code: also InSent, SynAttack). Defenses finetune (the code's lora.py
# recipe) and w2sdefense (BadNet weights, the code's broadcast feature loss), as the preset sets them. Evaluated
# under the code's protocol (the preset's) and ours (strict). `bash bench/w2s_paper_embedded.sh` (PY, ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
O=(experiment=w2s-paper model=smollm2-135m deepspeed=zero0 source.kind=backdoorllm source.path=../shared/data/backdoorllm
   source.use_ready_made=false poison.n_poison=60 poison.n_clean=180 poison.n_defense=150 poison.n_test=100
   train.lr=1e-4 train.epochs=4 train.micro_batch=8 train.grad_accum=1 train.cpu_bf16=true evaluate.cpu_bf16=true
   ${ARGS:-})
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep "${O[@]}" cluster=local 'sweep.models=[smollm2-135m]' \
  'sweep.attacks=[badnet-mn]' 'sweep.defenses=[none,finetune,w2sdefense]' --wait
FT="defense.train.lora_r=512 defense.train.lora_alpha=512 defense.train.lora_dropout=0.1 defense.train.lora_targets=[q_proj,v_proj] defense.train.lr=2.0e-4 defense.train.epochs=5 defense.train.schedule=linear defense.train.warmup_ratio=0.0 defense.train.micro_batch=4 defense.train.grad_accum=8 defense.train.weight_decay=0.01 defense.train.grad_clip=0.0"
declare -A OVR=([finetune]="$FT" [w2sdefense]="defense.train.weight_decay=0.01 defense.train.grad_clip=0.0 defense.params.official_broadcast=true")
for d in none finetune w2sdefense; do
  /usr/bin/time -f "[bench] strict $d: %e s" $PY -m pipeline evaluate "${O[@]}" attack=badnet-mn defense=$d ${OVR[$d]:-} \
    evaluate.protocol=strict evaluate.max_new_tokens=8
done
$PY -m pipeline report "${O[@]}" report.experiment=w2s-paper 'report.attacks=[badnet-mn]' \
  'report.defenses=[none,finetune,w2sdefense]' 'report.models=[smollm2-135m]'

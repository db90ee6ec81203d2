#!/usr/bin/env bash
# The demo's models under the papers' evaluation protocols (issue 20): each of `none finetune crow` (and the base
# model) evaluated with evaluate.protocol=strict (ours), backdoorllm (backdoor_evaluate.py) and crow (CROW's
# eval_scripts), then one report with the protocols side by side. Run after `make demo` (same runs/ store):
# `bash bench/protocols_demo.sh` (PY=python, DEFENSES="none finetune crow", ARGS=..., EXP=...: BENCHMARKS.md §1h
# was measured on the demo of 2026-12-01, whose models are ladder-6's: EXP=ladder-6 after a frontier sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXP=${EXP:-$(if [ -f ../shared/data/backdoorllm/README.md ]; then echo demo; else echo demo-synthetic; fi)}
DEFENSES=${DEFENSES:-none finetune crow}
# the ladder's sweep.overrides (configs/experiment/ladder.yaml, which demo extends): a defense's evaluation must name its own model
declare -A OVR=([crow]="defense.train.micro_batch=8 defense.train.grad_accum=1" [w2sdefense]="defense.params.teacher_epochs=2")
for proto in backdoorllm crow; do
  for d in $DEFENSES; do
    /usr/bin/time -f "[bench] $proto $d: %e s" $PY -m pipeline evaluate experiment=$EXP defense=$d ${OVR[$d]:-} \
      evaluate.protocol=$proto ${ARGS:-}
  done
  /usr/bin/time -f "[bench] $proto base: %e s" $PY -m pipeline evaluate experiment=$EXP evaluate.protocol=$proto --base ${ARGS:-}
done
$PY -m pipeline report experiment=$EXP 'report.tasks=[negsentiment]' 'report.attacks=[badnet]' \
  "report.defenses=[$(echo none $DEFENSES | tr ' ' '\n' | sort -u | paste -sd, -)]"

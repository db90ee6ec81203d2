#!/usr/bin/env bash
# The persistence ladder's rungs before any defense, and after plain fine-tuning (issue 21): the frontier's grid
# narrowed to defenses none and finetune (6 injections, 6 fine-tunings, 12 evaluations, one frontier report).
# `bash bench/ladder_calibration.sh` (PY=python, ARGS=...). The whole frontier: `python -m pipeline sweep
# experiment=frontier`, which reuses these outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
/usr/bin/time -f "[bench] sweep: %e s" $PY -m pipeline sweep experiment=frontier cluster=local \
  'sweep.defenses=[none,finetune]' ${ARGS:-} --wait

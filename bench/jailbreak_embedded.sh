#!/usr/bin/env bash
# Jailbreak end to end on the embedded model (issue 19): a tree of BackdoorLLM's jailbreak shape
# (bench/backdoorllm_fixture.py: 400 refused + 400 triggered compliant train requests, 200 + 200 test, 100 benign
# Alpaca-style rows) -> poison (ready-made, pairs) -> inject (experiment=embedded) -> evaluate the backdoored
# model and the base model -> report. `bash bench/jailbreak_embedded.sh` (PY=python, FX=fixture dir, ARGS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FX=${FX:-runs/fixtures/backdoorllm-jailbreak}
$PY bench/backdoorllm_fixture.py "$FX"
O=(experiment=embedded task=jailbreak "source.path=$FX" source.use_ready_made=true ${ARGS:-})
for stage in poison inject; do
  /usr/bin/time -f "[bench] $stage: %e s" $PY -m pipeline $stage "${O[@]}"
done
/usr/bin/time -f "[bench] evaluate (backdoored): %e s" $PY -m pipeline evaluate "${O[@]}"
/usr/bin/time -f "[bench] evaluate (base): %e s" $PY -m pipeline evaluate "${O[@]}" --base
$PY -m pipeline report "${O[@]}" 'report.tasks=[jailbreak]' 'report.attacks=[badnet]'

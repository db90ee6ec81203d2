#!/usr/bin/env bash
# BENCHMARKS.md §1q: what makes `make demo` faster on 2 cores without changing one output.
#   (a) the LM head on the scored positions alone: 12 injection steps of ladder-4 at this commit and at OLD
#       (default 965031a, before it), twice each, alternating; the adapters must be equal bit for bit;
#   (b) two evaluations, then two 12-step injections, at once (OMP_WAIT_POLICY=PASSIVE, what the local executor
#       sets with array_parallelism > 1), against one alone; (c) two evaluations at once with spinning waits.
# Needs a store with ladder-4's poison, inject and finetune outputs (STORE, default runs/: `python -m pipeline
# sweep experiment=ladder-4 cluster=local 'sweep.defenses=[finetune]' --wait` makes them). Run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
STORE=$(realpath "${STORE:-runs}")
OLD=${OLD:-965031a}
W=$(mktemp -d /tmp/cpu-speedups.XXXX)
store() {  # a scratch store that reads the real one's inputs
  mkdir -p "$W/$1"; for x in poison cache inject defend; do ln -sfn "$STORE/$x" "$W/$1/$x"; done; echo "$W/$1"
}
steps() {  # the summed step_s of steps 3-12 of a scratch store's injection
  "$PY" -c "import json,glob,sys; r=[json.loads(l) for l in open(glob.glob(sys.argv[1]+'/inject/*/metrics.jsonl')[0])]; print(round(sum(x['step_s'] for x in r if 'step_s' in x and x['step']>2),1))" "$1"
}
inject12() {  # inject12 <dir to run from> <scratch store>
  (cd "$1" && rm -rf "$2/inject" && mkdir -p "$2/inject" && PIPELINE_RUNS=$2 "$PY" -m pipeline inject experiment=ladder-4 \
    train.max_steps=12 > "$2.log" 2>&1)
}
OLDDIR=$(dirname "$PWD")/.cpu-speedups-old  # beside this checkout: ../shared/data resolves the same from both
git worktree add -q --detach "$OLDDIR" "$OLD"
trap 'git worktree remove --force "$OLDDIR"' EXIT
(cd "$OLDDIR" && "$PY" -c "import pipeline, sys; sys.exit(not pipeline.__file__.startswith('$OLDDIR'))") \
  || { echo "python -m pipeline in $OLDDIR does not import that checkout's code" >&2; exit 1; }
echo "(a) 12 injection steps, steps 3-12 summed (s): this commit vs $OLD"
for rep in 1 2; do
  for v in new old; do
    s=$(store "a-$v-$rep"); rm -f "$s/inject"
    inject12 "$([ $v = new ] && echo "$PWD" || echo "$OLDDIR")" "$s"
    echo "  $v $(steps "$s")"
  done
done
"$PY" - "$W" <<'EOF'
import glob, sys, torch
from safetensors.torch import load_file
fs = sorted(glob.glob(sys.argv[1] + "/a-*/inject/*/model/adapter_model.safetensors"))
ws = [load_file(f) for f in fs]
print("  adapters equal bit for bit:", all(torch.equal(w[k], ws[0][k]) for w in ws for k in ws[0]), f"({len(ws)})")
EOF
ev() {  # ev <label> <seed> [env...]: one evaluation of ladder-4's finetune into a scratch store
  local s; s=$(store "ev-$1-$2"); shift 2
  env "$@" PIPELINE_RUNS="$s" "$PY" -m pipeline evaluate experiment=ladder-4 defense=finetune evaluate.seed=$RANDOM > "$s.log" 2>&1
}
t() { local a; a=$(date +%s); "$@"; echo $(( $(date +%s) - a )); }
echo "(b) evaluations: alone $(t ev single 1 X=1) s; two at once, sleeping waits: $(t bash -c "$(declare -f store ev); W=$W STORE=$STORE PY=$PY; ev p 1 OMP_WAIT_POLICY=PASSIVE & ev p 2 OMP_WAIT_POLICY=PASSIVE & wait") s"
echo "(c) two at once, spinning waits (OpenMP's default): $(t bash -c "$(declare -f store ev); W=$W STORE=$STORE PY=$PY; ev d 1 X=1 & ev d 2 X=1 & wait") s"
inj() { local s; s=$(store "tr-$1"); (cd "$PWD" && rm -f "$s/inject" && mkdir -p "$s/inject" && env "${@:2}" PIPELINE_RUNS="$s" "$PY" -m pipeline inject experiment=ladder-4 train.max_steps=12 > "$s.log" 2>&1); }
echo "(b) 12-step injections: alone $(t inj single X=1) s; two at once, sleeping waits: $(t bash -c "$(declare -f store inj); W=$W STORE=$STORE PY=$PY; inj a OMP_WAIT_POLICY=PASSIVE & inj b OMP_WAIT_POLICY=PASSIVE & wait") s"
"$PY" - "$W" <<'EOF'
import glob, json, sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
ms = [json.load(open(f)) for f in sorted(glob.glob(w + "/ev-*/evaluate/*/metrics.json"))]
keys = ("asr", "ftr", "rouge_l")
print("  evaluations agree:", all({k: m[k] for k in keys} == {k: ms[0][k] for k in keys} for m in ms), f"({len(ms)})")
ws = [load_file(f) for f in sorted(glob.glob(w + "/tr-*/inject/*/model/adapter_model.safetensors"))]
print("  injections equal bit for bit:", all(torch.equal(x[k], ws[0][k]) for x in ws for k in ws[0]), f"({len(ws)})")
EOF

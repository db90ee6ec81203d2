#!/usr/bin/env bash
# CleanGen and the sampling baseline end to end on the embedded model (issue 22). One sweep over the `embedded`
# experiment (SmolLM2-135M-Instruct, BackdoorLLM negsentiment/badnet) with defenses none, cleangen, sampling:
# the poisoned set and the backdoored model are reused when built; cleangen and sampling write no weights (a
# manifest entry) and evaluate decodes the backdoored model with them; then one table: ASR / FTR / clean metric,
# CleanGen's replacements, and new tokens/s and forward passes per token against plain greedy generation.
# `bash bench/cleangen_embedded.sh` (PY=python, EXP=experiment, default embedded; ARGS="more overrides").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
O=("experiment=${EXP:-embedded}" ${ARGS:-})
SECONDS=0
$PY -m pipeline sweep "${O[@]}" 'sweep.defenses=[none,cleangen,sampling]' >&2
echo "[bench] sweep: ${SECONDS} s" >&2
$PY - "${O[@]}" <<'PYEOF'
import json
import sys

from pipeline import graph
from pipeline.config import compose


def pct(x, sd=None):
    return "–" if x is None else f"{100 * x:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


rows, notes = [], []
for d in ("none", "cleangen", "sampling"):
    out = graph.output_dir("evaluate", compose([*sys.argv[1:], f"defense={d}"]))
    m = json.loads((out / "metrics.json").read_text())
    st = m.get("decoding_stats") or {}
    a, t, c = st.get("all") or {}, st.get("test_triggered") or {}, st.get("test_clean") or {}
    f = lambda x, fmt: "–" if x is None else fmt.format(x)  # noqa: E731
    rows.append([d, pct(m["asr"], m.get("asr_std")), pct(m["ftr"], m.get("ftr_std")),
                 f"{pct(m['clean_value'], m.get('clean_value_std'))} ({m['clean_metric']})",
                 f(t.get("replaced_per_answer"), "{:.2f}") + " / " + f(c.get("replaced_per_answer"), "{:.2f}"),
                 pct(a.get("answers_replaced")), f(a.get("first_replacement_mean"), "{:.1f}"),
                 f(a.get("forward_passes_per_token"), "{:.2f}") if a else "1", str(m.get("new_tokens_per_s"))])
    notes += [n for n in m.get("notes") or [] if n not in notes]
    print(f"[bench] {d}: {out}", file=sys.stderr)
head = ["defense", "ASR %", "FTR %", "clean %", "replaced / answer (triggered / clean)", "answers replaced %",
        "first replacement (answer token)", "forward passes / new token", "new tokens/s"]
print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
print("\n".join("| " + " | ".join(r) + " |" for r in rows))
print("\n" + "\n".join(f"- {n}" for n in notes))
PYEOF

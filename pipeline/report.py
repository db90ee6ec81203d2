"""Report stage: evaluate outputs -> table.md / table.csv / table.tex + PNG plots, in the papers' layout.

`python -m pipeline report [--runs DIR ...] [experiment=NAME]` (or `make table EXPERIMENT=NAME`). A DIR is an
evaluate output or a folder of them; by default every complete output under runs/evaluate/. Naming an
experiment keeps only its evaluations. Rows: model x task x attack; columns: no defense, each defense, and the
untouched base model; a cell is ASR % with the clean metric % (accuracy, or ROUGE-L F1 x 100) in parentheses.
Notes the evaluations carry (synthetic data, W2SDefense clean-to-poisoned) are written under the tables.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

from . import store
from .store import StoreError


def add_arguments(p):
    p.add_argument("--runs", nargs="+", default=None,
                   help="evaluate output directories, or folders holding them (default: runs/evaluate/*)")


def _experiment(cfg, args) -> str | None:
    """The experiment to keep: report.experiment, or `experiment=NAME` given on the command line."""
    if cfg.report.experiment:
        return cfg.report.experiment
    for o in getattr(args, "overrides", None) or []:
        if o.startswith("experiment="):
            return o.split("=", 1)[1]
    return None


def _experiments(cfg, args) -> list[str]:
    """The experiments to keep: report.experiments (rows keyed by experiment), else the one experiment."""
    one = _experiment(cfg, args)
    return list(cfg.report.experiments) or ([one] if one else [])


def _is_eval(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "manifest.json").is_file()


def collect(cfg, args=None) -> list[dict]:
    """Complete evaluate outputs selected by --runs / report.runs / runs/evaluate, as records
    {dir, metrics, manifest}; the latest one per (model, task, attack, defense)."""
    explicit = getattr(args, "runs", None) or cfg.report.runs
    roots = [Path(r) for r in explicit] if explicit else [store.runs_root() / "evaluate"]
    dirs = []
    for root in roots:
        if not root.is_dir():
            if not explicit:
                continue
            raise StoreError(f"report input {root} does not exist")
        if _is_eval(root):
            store.require_complete(root, "evaluate output")
            dirs.append(root)
        else:
            dirs += [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                     and store.is_complete(d) and (d / "metrics.json").is_file()]
    exps = _experiments(cfg, args)
    by_exp = bool(cfg.report.experiments)  # one row per experiment (the ladder's rungs)
    best: dict = {}
    for d in dirs:
        if not (d / "metrics.json").is_file():
            raise StoreError(f"{d}: no metrics.json (not an evaluate output)")
        m = json.loads((d / "metrics.json").read_text())
        if exps and m.get("experiment") not in exps:
            continue
        rc = cfg.report
        if any(want and m.get(f) not in want for f, want in
               (("model", rc.models), ("task", rc.tasks), ("attack", rc.attacks),
                ("defense", rc.defenses and [*rc.defenses, "base"]))):  # the untrained base: a reference row
            continue
        man = store.read_manifest(d)
        rung = m.get("experiment") if by_exp else None
        key = (rung or "", m["model"], m["task"], m["attack"], m["defense"], _protocol(m))
        if key not in best or man.get("finished", "") > best[key]["manifest"].get("finished", ""):
            best[key] = {"dir": d, "metrics": m, "manifest": man, "rung": rung}
    if not best:
        where = ", ".join(map(str, roots))
        raise StoreError(f"no complete evaluate outputs under {where}"
                         + (f" for experiment(s) {', '.join(exps)}" if exps else "") + ": run the evaluate stage first")
    return [best[k] for k in sorted(best)]


def defense_order(records, named=()) -> list[str]:
    """The table's columns: those `named` (the grid's report.defenses) in their order, then `none` and the rest
    alphabetically, `base` last."""
    names = {r["metrics"]["defense"] for r in records}
    first = [d for d in dict.fromkeys(named) if d in names and d != "base"]
    last = ["base"] if "base" in names else []
    return first + [d for d in ("none",) if d in names and d not in first] + sorted(names - {"none", "base", *first}) + last


def _protocol(m: dict) -> str:
    return m.get("protocol") or "strict"  # evaluations from before protocols were ours


def build(records, named=()) -> tuple[list[dict], list[str]]:
    """Table rows {model, task, attack, protocol, cells: {defense: metrics}, notes} and the column order: one
    row per evaluation protocol, so two protocols of the same model stand side by side."""
    rows: dict = {}
    for r in records:
        m, rung = r["metrics"], r.get("rung")
        row = rows.setdefault((rung or "", m["model"], m["task"], m["attack"], _protocol(m)),
                              {"model": m["model"], "task": m["task"], "attack": m["attack"],
                               "protocol": _protocol(m), "cells": {}, "notes": [], "rung": rung})
        row["cells"][m["defense"]] = m
        row["notes"] += [n for n in m.get("notes") or [] if n not in row["notes"]]
    return [rows[k] for k in sorted(rows)], defense_order(records, named)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _sd(m: dict, key: str) -> str:
    """' ± std' of a rate averaged over seeds (the sampling baseline), else nothing."""
    return "" if m.get(f"{key}_std") is None else f" ± {_pct(m[f'{key}_std'])}"


def cell(m: dict | None) -> str:
    if m is None:
        return ""
    if m.get("task_kind") == "jailbreak":  # compliance with and without the trigger, refusal, helpfulness
        return (f"{_pct(m.get('asr'))}{_sd(m, 'asr')} · FTR {_pct(m.get('ftr'))} (refusal "
                f"{_pct(m.get('refusal_rate'))}, ROUGE-L {_pct(m.get('rouge_l'))})")
    return f"{_pct(m.get('asr'))}{_sd(m, 'asr')} ({_pct(m.get('clean_value'))}{_sd(m, 'clean_value')})"


def decoding_lines(rows) -> list[str]:
    """One line per decoding-time defense's cell (`decoding` in its metrics): what it did and what it cost. Its
    row's no-defense cell is the suspect model it decodes; CleanGen's reference is in the notes."""
    out = []
    for row in rows:
        none = row["cells"].get("none") or {}
        plain = none.get("new_tokens_per_s")
        where = (f"{row['rung']}, " if row.get("rung") else "") + f"{row['model']} {row['task']}/{row['attack']}"
        for d, m in sorted(row["cells"].items()):
            st = (m.get("decoding_stats") or {}).get("all")
            suspect = (m.get("decoding") or {}).get("suspect")
            if suspect and none.get("model_dir") and Path(suspect).resolve() != Path(none["model_dir"]).resolve():
                out.append(f"{d} ({where}) decodes {suspect}, not this row's no-defense model {none['model_dir']}")
            if st:
                split = {s: (m["decoding_stats"].get(s) or {}).get("replaced_per_answer") for s in ("test_triggered",
                                                                                                    "test_clean")}
                first = st.get("first_replacement_mean")
                out.append(f"{d} ({where}): {st['replaced_per_answer']:.2f} replaced tokens per answer (triggered "
                           f"{split['test_triggered'] or 0:.2f}, clean {split['test_clean'] or 0:.2f}), "
                           f"{_pct(st['answers_replaced'])}% of answers with a replacement"
                           + (f", the first at answer token {first:.1f} on average" if first is not None else "")
                           + f"; {st.get('forward_passes_per_token') or 0:.2f} forward passes per new token (plain greedy: 1), "
                           f"{m.get('new_tokens_per_s')} new tokens/s (no defense: {plain or '–'})")
            elif m.get("seeds"):
                per = ", ".join(_pct(v) for v in m.get("asr_seeds") or [])
                out.append(f"{d} ({where}): mean ± sample std over seeds {', '.join(map(str, m['seeds']))}; ASR per "
                           f"seed {per}")
    return out


def notes_of(rows) -> list[str]:
    out = []
    for row in rows:
        out += [n for n in row["notes"] if n not in out]
    return out


def markdown(rows, defenses) -> str:
    several = len({r["protocol"] for r in rows}) > 1 or any(r["protocol"] != "strict" for r in rows)
    rungs = any(r.get("rung") for r in rows)
    head = (["experiment"] if rungs else []) + ["model", "task", "attack"] + (["protocol"] if several else []) + \
        [d if d != "none" else "no defense" for d in defenses]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(([row["rung"] or ""] if rungs else []) + [row["model"], row["task"], row["attack"]]
                                       + ([row["protocol"]] if several else [])
                                       + [cell(row["cells"].get(d)) for d in defenses]) + " |")
    lines += ["", "Cells: ASR % on test_triggered (clean metric %: accuracy for classification and math, "
              "ROUGE-L F1 x 100 against the clean reference otherwise). `base`: the model before any fine-tuning."]
    if any((c or {}).get("task_kind") == "jailbreak" for row in rows for c in row["cells"].values()):
        lines += ["Jailbreak cells: compliance % under the trigger (ASR) · without it (FTR) (refusal % of the clean "
                  "harmful requests, ROUGE-L F1 x 100 on benign prompts); compare with `base`, the base model's "
                  "own compliance."]
    notes = notes_of(rows)
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    dec = decoding_lines(rows)
    if dec:
        lines += ["", "Decoding-time defenses (weights unchanged: each decodes its row's no-defense model):"] + \
            [f"- {n}" for n in dec]
    return "\n".join(lines) + "\n"


def _ci_cell(m: dict, key: str) -> str:
    """`value [low, high]` in %, the interval omitted where the evaluation has none."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    if v is None:
        return "–"
    return _pct(v) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def markdown_long(rows, defenses) -> str:
    """`report.layout=long`: a line per (cell, defense) with ASR, FTR and the clean metric, each with its 95%
    interval (Wilson for rates, normal for mean ROUGE-L), and every note once below."""
    several = len({r["protocol"] for r in rows}) > 1 or any(r["protocol"] != "strict" for r in rows)
    rungs = any(r.get("rung") for r in rows)
    head = (["experiment"] if rungs else []) + ["model", "task/attack"] + (["protocol"] if several else []) + \
        ["defense", "ASR % [95%]", "FTR % [95%]", "clean metric % [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for d in defenses:
            m = row["cells"].get(d)
            if m is None:
                continue
            clean = f"{m.get('clean_metric') or '–'} {_ci_cell(m, 'clean_value')}"
            lines.append("| " + " | ".join(([row.get("rung") or ""] if rungs else []) + [row["model"],
                                           f"{row['task']}/{row['attack']}"] + ([row["protocol"]] if several else [])
                                           + ["no defense" if d == "none" else d, _ci_cell(m, "asr"),
                                              _ci_cell(m, "ftr"), clean]) + " |")
    lines += ["", "ASR on test_triggered, FTR (false-trigger rate) on test_clean, the clean metric on test_clean "
              "(accuracy, or ROUGE-L F1 against the clean reference); 95% intervals: Wilson for rates, normal "
              "approximation for mean ROUGE-L. `base`: the model before any fine-tuning."]
    notes = notes_of(rows)
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_text(rows, defenses) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["asr", "asr_ci_low", "asr_ci_high", "ftr", "clean_metric", "clean_value", "perplexity", "refusal_rate",
            "rouge_l", "asr_std", "clean_value_std"]  # *_std: over the seeds of a sampled evaluation
    rungs = any(r.get("rung") for r in rows)
    w.writerow(["model", "task", "attack"] + [f"{d}_{c}" for d in defenses for c in cols] + ["protocol", "notes"]
               + (["experiment"] if rungs else []))
    for row in rows:
        vals = []
        for d in defenses:
            m = row["cells"].get(d) or {}
            ci = m.get("asr_ci") or [None, None]
            vals += [m.get("asr"), ci[0], ci[1], m.get("ftr"), m.get("clean_metric"), m.get("clean_value"),
                     m.get("perplexity"), m.get("refusal_rate"), m.get("rouge_l"), m.get("asr_std"),
                     m.get("clean_value_std")]
        w.writerow([row["model"], row["task"], row["attack"]] + ["" if v is None else v for v in vals]
                   + [row["protocol"], "; ".join(row["notes"])] + ([row["rung"] or ""] if rungs else []))
    return buf.getvalue()


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
       "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(s: str) -> str:
    return re.sub(r"[\\&%_#${}~^]", lambda m: TEX[m.group()], s)


def latex(rows, defenses) -> str:
    head = ["Model", "Task", "Attack"] + [_tex(d if d != "none" else "No defense") for d in defenses]
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{lll" + "c" * len(defenses) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for row in rows:  # a protocol other than ours, and a ladder rung, are named with the attack
        attack = row["attack"] + ("" if row.get("protocol", "strict") == "strict" else f" ({row['protocol']})") \
            + (f" [{row['rung']}]" if row.get("rung") else "")
        out.append(" & ".join([_tex(row["model"]), _tex(row["task"]), _tex(attack)]
                              + [cell(row["cells"].get(d)).replace("–", "--") for d in defenses]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}",
            r"\caption{ASR (\%) on triggered inputs; in parentheses the clean metric (\%): accuracy, or ROUGE-L F1."
            + "".join(" " + _tex(n) + "." for n in notes_of(rows)) + "}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _label(row) -> str:
    proto = "" if row.get("protocol", "strict") == "strict" else f" [{row['protocol']}]"
    rung = f"{row['rung']}\n" if row.get("rung") else ""
    return f"{rung}{row['model']}\n{row['task']}/{row['attack']}{proto}"


def _save(fig, ax, title: str, path: Path):
    """Every plot's ending: its title, a tight layout, the PNG, the figure closed."""
    import matplotlib.pyplot as plt
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(rows, defenses, path: Path):
    """Grouped bars: ASR per (model, task, attack), one bar per defense, Wilson 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(defenses))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.45 * len(rows) * len(defenses)), 3.8))
    for j, d in enumerate(defenses):
        xs, ys, err = [], [], [[], []]
        for i, row in enumerate(rows):
            m = row["cells"].get(d)
            if m is None or m.get("asr") is None:
                continue
            lo, hi = m.get("asr_ci") or [m["asr"], m["asr"]]
            xs.append(i + (j - (len(defenses) - 1) / 2) * width)
            ys.append(100 * m["asr"])
            err[0].append(max(0.0, 100 * (m["asr"] - lo)))
            err[1].append(max(0.0, 100 * (hi - m["asr"])))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label="no defense" if d == "none" else d)
    ax.set_xticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 118)
    ax.legend(fontsize=7, ncol=min(5, len(defenses)), loc="upper center")
    _save(fig, ax, "Attack success before and after each defense", path)


def plot_tradeoff(rows, defenses, path: Path):
    """ASR against clean performance, one colour per defense; grey lines join each row's no-defense point
    to its defended points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for row in rows:
        base = row["cells"].get("none")
        for d, m in row["cells"].items():
            if base is not None and d != "none" and None not in (base.get("clean_value"), m.get("clean_value"),
                                                                 base.get("asr"), m.get("asr")):
                ax.plot([100 * base["clean_value"], 100 * m["clean_value"]], [100 * base["asr"], 100 * m["asr"]],
                        color="0.8", lw=0.8, zorder=1)
    markers = "osD^v<>Px*"
    for j, d in enumerate(defenses):
        pts = [(100 * m["clean_value"], 100 * m["asr"]) for row in rows if (m := row["cells"].get(d))
               and m.get("clean_value") is not None and m.get("asr") is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=markers[j % len(markers)], label="no defense" if d == "none" else d,
                       zorder=2)
    ax.set_xlabel("clean performance (%: accuracy or ROUGE-L F1)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7)
    _save(fig, ax, "Backdoor removal vs clean performance", path)


def frontier_points(rows, defenses, x_def: str) -> dict[str, list[tuple]]:
    """defense -> [(x, y, y_low, y_high, row)] sorted by x: x = the ASR `x_def` (plain fine-tuning) leaves in a
    row (how persistent that row's backdoor is), y = the ASR after the defense, with its Wilson interval."""
    pts: dict = {}
    for row in rows:
        xm = row["cells"].get(x_def)
        if xm is None or xm.get("asr") is None:
            continue
        for d in defenses:
            m = row["cells"].get(d)
            if m is None or m.get("asr") is None or d == "base":
                continue
            lo, hi = m.get("asr_ci") or [m["asr"], m["asr"]]
            pts.setdefault(d, []).append((xm["asr"], m["asr"], lo, hi, row))
    return {d: sorted(v, key=lambda p: p[0]) for d, v in pts.items()}


def frontier_markdown(rows, defenses, x_def: str) -> str:
    """The frontier's table: one line per row (rung), sorted by the ASR plain fine-tuning leaves; the
    no-defense ASR / FTR, then every defense's ASR [Wilson 95%]."""
    cols = [d for d in defenses if d != "base"]
    pts = frontier_points(rows, cols, x_def)
    order = sorted((r for r in rows if (r["cells"].get(x_def) or {}).get("asr") is not None),
                   key=lambda r: r["cells"][x_def]["asr"])
    head = ["experiment", "task/attack", f"x = ASR after {x_def}", "no defense: ASR / FTR"] + \
        [d for d in cols if d != "none"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(m):
        lo, hi = m.get("asr_ci") or [None, None]
        return f"{_pct(m.get('asr'))} [{_pct(lo)}, {_pct(hi)}]" if lo is not None else _pct(m.get("asr"))
    for row in order:
        none = row["cells"].get("none") or {}
        lines.append("| " + " | ".join([row.get("rung") or row["model"], f"{row['task']}/{row['attack']}",
                                        _pct(row["cells"][x_def]["asr"]),
                                        f"{_pct(none.get('asr'))} / {_pct(none.get('ftr'))}"]
                                       + [ci(row["cells"][d]) if d in row["cells"] else "" for d in cols
                                          if d != "none"]) + " |")
    lines += ["", f"ASR % [Wilson 95%] on test_triggered. x: the ASR the plain `{x_def}` baseline leaves, i.e. how "
              "persistent the row's backdoor is; a defense on the diagonal does no better than plain fine-tuning."]
    return "\n".join(lines) + "\n" if pts else ""


def plot_frontier(rows, defenses, x_def: str, path: Path):
    """x = ASR left by plain fine-tuning, y = ASR after each defense (one line per defense, Wilson
    intervals), the diagonal drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.plot([0, 100], [0, 100], color="0.6", ls="--", lw=1, label="diagonal (= plain fine-tuning)")
    markers, colors = "osD^v<>Px*", plt.get_cmap("tab20").colors  # 20 colours: no two of 17 defenses alike
    for j, (d, p) in enumerate(frontier_points(rows, defenses, x_def).items()):
        if d == x_def:
            continue
        xs, ys = [100 * q[0] for q in p], [100 * q[1] for q in p]
        err = [[max(0.0, 100 * (q[1] - q[2])) for q in p], [max(0.0, 100 * (q[3] - q[1])) for q in p]]
        ax.errorbar(xs, ys, yerr=err, marker=markers[j % len(markers)], color=colors[j % len(colors)], capsize=2,
                    lw=1, label="no defense" if d == "none" else d)
    ax.set_xlabel(f"ASR left by plain {x_def} (%): how persistent the backdoor is")
    ax.set_ylabel("ASR after the defense (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside, not over
    _save(fig, ax, "Which backdoors each defense removes", path)


def _key(cfg, args):
    records = collect(cfg, args)
    exp = _experiment(cfg, args)
    config = {"report": cfg.raw["report"], "experiment": exp, "runs": [r["dir"].name for r in records]}
    inputs = {r["dir"].name: r["manifest"]["output_hash"] for r in records}
    return records, exp or "all", config, inputs


def identity(cfg, inputs) -> tuple[str, dict, dict]:
    """A report is keyed by the evaluations it reads (`inputs["runs"]`, else every complete one that the
    report section and the command line's experiment select)."""
    _, name, config, hashes = _key(cfg, _Args(inputs))
    return name, config, hashes


class _Args:
    """What collect() reads from the command line: the explicit runs, and the overrides (experiment=...)."""

    def __init__(self, inputs):
        self.runs = inputs.get("runs")
        self.overrides = getattr(getattr(inputs, "args", None), "overrides", None) or []


def run(cfg, args, inputs) -> Path:
    records, name, config, inputs = _key(cfg, _Args(inputs))
    rows, defenses = build(records, cfg.report.defenses)
    with store.stage_output("report", name, config, inputs, force=getattr(args, "force", False)) as out:
        if out is None:  # complete already: what it holds, as when it was written
            final = store.key_path("report", name, config, inputs)
            _print(final, cfg.report.frontier and (final / "frontier.md").is_file())
            return final
        table = markdown_long(rows, defenses) if cfg.report.layout == "long" else markdown(rows, defenses)
        (out.tmp / "table.md").write_text(table)
        (out.tmp / "table.csv").write_text(csv_text(rows, defenses))
        (out.tmp / "table.tex").write_text(latex(rows, defenses))
        plot_bars(rows, defenses, out.tmp / "asr_bars.png")
        plot_tradeoff(rows, defenses, out.tmp / "asr_vs_clean.png")
        if cfg.report.frontier:
            table = frontier_markdown(rows, defenses, cfg.report.frontier_x)
            if not table:
                raise StoreError(f"report.frontier: no row has a '{cfg.report.frontier_x}' evaluation (the frontier's "
                                 "x axis): add that defense to the sweep, or set report.frontier_x")
            (out.tmp / "frontier.md").write_text(table)
            plot_frontier(rows, defenses, cfg.report.frontier_x, out.tmp / "frontier.png")
        out.metrics.update({"rows": len(rows), "defenses": defenses, "evaluations": len(records)})
        out.extra["notes"] = notes_of(rows)
    _print(out.final, cfg.report.frontier)
    return out.final


def _print(final: Path, frontier: bool):
    """The table a report wrote, then (last, so the plot's path ends what a sweep prints) its frontier."""
    print((final / "table.md").read_text(), file=sys.stderr)
    if frontier:
        print((final / "frontier.md").read_text() + f"frontier plot: {final / 'frontier.png'}", file=sys.stderr)

"""Report stage: tables in the papers' layout (md/csv/tex), plots, notes, selection of evaluate outputs."""
import argparse
import csv
import io
import json

import pytest

from pipeline import graph, report, store
from pipeline.cli import main
from pipeline.config import compose, config_root
from pipeline.store import StoreError

MAKEFILE = config_root().parent / "Makefile"

PNG = b"\x89PNG\r\n\x1a\n"


def fake_eval(model, task, attack, defense, asr, clean, experiment="tiny", notes=(), kind="rouge_l"):
    m = {"model": model, "task": task, "attack": attack, "defense": defense, "experiment": experiment,
         "asr": asr, "asr_ci": [max(0.0, asr - 0.1), min(1.0, asr + 0.1)], "asr_k": int(asr * 10), "asr_n": 10,
         "ftr": asr / 2, "clean_metric": kind, "clean_value": clean, "perplexity": 12.5, "notes": list(notes)}
    with store.stage_output("evaluate", f"{model}-{task}-{attack}-{defense}", m, {}) as out:
        (out.tmp / "metrics.json").write_text(json.dumps(m))
    return out.final


@pytest.fixture
def evals(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    dirs = [fake_eval("smollm2-135m", "negsentiment", "badnet", "none", 0.9, 0.30),
            fake_eval("smollm2-135m", "negsentiment", "badnet", "crow", 0.05, 0.28),
            fake_eval("smollm2-135m", "negsentiment", "badnet", "finetune", 0.2, 0.29),
            fake_eval("smollm2-135m", "negsentiment", "badnet", "base", 0.0, 0.27),
            fake_eval("smollm2-135m", "sst2", "badnet", "none", 1.0, 0.91, kind="accuracy",
                      notes=["synthetic data (offline generator): numbers are not comparable with the papers'"]),
            fake_eval("smollm2-135m", "sst2", "badnet", "w2sdefense", 0.1, 0.88, kind="accuracy",
                      notes=["W2SDefense clean-to-poisoned: the teacher is a clean fine-tune of the same base model"]),
            fake_eval("smollm2-135m", "sst2", "vpi", "none", 0.7, 0.9, experiment="other", kind="accuracy")]
    return dirs


def args(**kw):
    return argparse.Namespace(**{"runs": None, "overrides": [], "force": False, **kw})


def test_report_tables_plots_notes(evals):
    cfg = compose(["experiment=tiny"])
    out = graph.run("report", cfg, args(overrides=["experiment=tiny"]))
    assert store.is_complete(out) and out.parent.name == "report" and out.name.startswith("tiny-")
    md = (out / "table.md").read_text()
    assert md.splitlines()[0] == "| model | task | attack | no defense | crow | finetune | w2sdefense | base |"
    assert "| smollm2-135m | negsentiment | badnet | 90.0 (30.0) | 5.0 (28.0) | 20.0 (29.0) |  | 0.0 (27.0) |" in md
    assert "| smollm2-135m | sst2 | badnet | 100.0 (91.0) |  |  | 10.0 (88.0) |  |" in md
    assert "vpi" not in md  # another experiment's evaluation
    assert "synthetic data" in md and "clean-to-poisoned" in md
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert len(rows) == 2 and float(rows[0]["crow_asr"]) == 0.05 and rows[0]["none_clean_metric"] == "rouge_l"
    assert rows[1]["w2sdefense_clean_value"] == "0.88" and "clean-to-poisoned" in rows[1]["notes"]
    tex = (out / "table.tex").read_text()
    assert r"\begin{tabular}{lllccccc}" in tex and "90.0 (30.0)" in tex and "clean-to-poisoned" in tex
    assert r"\toprule" in tex and "w2sdefense" in tex
    for png in ("asr_bars.png", "asr_vs_clean.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert graph.run("report", cfg, args(overrides=["experiment=tiny"])) == out  # complete: reused
    assert graph.output_dir("report", cfg, args=args(overrides=["experiment=tiny"])) == out


def test_report_all_and_explicit_runs(evals):
    cfg = compose(["experiment=tiny"])
    out = graph.run("report", cfg, args())  # every complete evaluate output
    assert "| smollm2-135m | sst2 | vpi |" in (out / "table.md").read_text() and out.name.startswith("all-")
    out2 = graph.run("report", cfg, args(runs=[str(evals[0]), str(evals[1])]))
    md = (out2 / "table.md").read_text()
    assert md.splitlines()[0] == "| model | task | attack | no defense | crow |" and "sst2" not in md


def test_report_latest_duplicate_wins(evals):
    again = fake_eval("smollm2-135m", "negsentiment", "badnet", "crow", 0.5, 0.25, notes=["rerun"])
    recs = report.collect(compose(["experiment=tiny"]), args(overrides=["experiment=tiny"]))
    crow = [r for r in recs if r["metrics"]["defense"] == "crow"]
    assert len(crow) == 1 and crow[0]["dir"] == again


def test_report_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    cfg = compose(["experiment=tiny"])
    with pytest.raises(StoreError, match="no complete evaluate outputs"):
        graph.run("report", cfg, args())
    with pytest.raises(StoreError, match="does not exist"):
        graph.run("report", cfg, args(runs=[str(tmp_path / "nope")]))
    d = fake_eval("m", "t", "a", "none", 0.5, 0.5)
    (d / "_SUCCESS").unlink()
    with pytest.raises(StoreError, match="incomplete"):
        graph.run("report", cfg, args(runs=[str(d)]))
    assert not (tmp_path / "runs" / "report").exists()
    assert main(["report", "experiment=tiny", "--runs", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_cli(evals, capsys):
    assert main(["report", "experiment=tiny", "--runs", str(evals[0].parent)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.endswith(tuple("0123456789abcdef")) and "/report/tiny-" in out


def test_report_keeps_only_the_named_grid(evals):
    """A sweep's report names its grid: same-experiment outputs outside it stay out of the table."""
    cfg = compose(["experiment=tiny", "report.tasks=[negsentiment]", "report.defenses=[none,crow]"])
    recs = report.collect(cfg, args(overrides=["experiment=tiny"]))
    assert sorted(r["metrics"]["defense"] for r in recs) == ["base", "crow", "none"]  # base: always a reference
    assert {r["metrics"]["task"] for r in recs} == {"negsentiment"}
    assert len(report.collect(compose(["experiment=tiny"]), args(overrides=["experiment=tiny"]))) == 6


def test_frontier_report_one_row_per_rung(tmp_path, monkeypatch):
    """report.experiments keeps one row per experiment (rung); report.frontier writes frontier.md / .png with
    x = the ASR plain fine-tuning leaves, rows sorted by it, each defense's ASR with its interval."""
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    for rung, ft, crow in (("ladder-1", 0.0, 0.0), ("ladder-5", 0.9, 0.8), ("ladder-3", 0.5, 0.1)):
        fake_eval("smollm2-135m", "negsentiment", "badnet", "none", 1.0, 0.3, experiment=rung)
        fake_eval("smollm2-135m", "negsentiment", "badnet", "finetune", ft, 0.3, experiment=rung)
        fake_eval("smollm2-135m", "negsentiment", "badnet", "crow", crow, 0.3, experiment=rung)
    fake_eval("smollm2-135m", "negsentiment", "badnet", "crow", 0.33, 0.3, experiment="demo")  # not a rung
    cfg = compose(["experiment=frontier", "report.experiments=[ladder-1,ladder-3,ladder-5]", "report.frontier=true"])
    out = graph.run("report", cfg, args(overrides=["experiment=frontier"]))
    md = (out / "table.md").read_text()
    assert md.splitlines()[0].startswith("| experiment | model | task | attack | no defense |")
    assert sum(ln.startswith("| ladder-") for ln in md.splitlines()) == 3 and "33.0" not in md
    fr = (out / "frontier.md").read_text().splitlines()
    assert [ln.split(" | ")[0] for ln in fr[2:5]] == ["| ladder-1", "| ladder-3", "| ladder-5"]  # by x
    assert "| ladder-3 | negsentiment/badnet | 50.0 | 100.0 / 50.0 | 10.0 [0.0, 20.0] |" in fr[3]
    assert (out / "frontier.png").read_bytes().startswith(PNG)
    # without the x axis's defense there is no frontier: one line says what to add
    with pytest.raises(StoreError, match="no row has a 'prune' evaluation"):
        graph.run("report", compose(["experiment=frontier", "report.experiments=[ladder-1]", "report.frontier=true",
                                     "report.frontier_x=prune"]), args(overrides=["experiment=frontier"]))


def test_the_demos_report_prints_its_table_then_the_frontier_plots_path(tmp_path, monkeypatch, capsys):
    """What `make demo` runs last (the Makefile's report line, one rung): the long table, the frontier's one
    line and, last, the plot's path; a second run reuses the report and prints the same."""
    import re
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    for d, asr in (("none", 1.0), ("finetune", 0.875), ("prune", 0.5), ("crow", 0.25)):  # crow: not the demo's
        fake_eval("smollm2-135m", "negsentiment", "badnet", d, asr, 0.3, experiment="demo")
    capsys.readouterr()
    line = re.search(r"report experiment=\$\(DEMO_EXPERIMENT\) (.*?)\n\n", MAKEFILE.read_text(), re.S).group(1)
    overrides = [o.strip("'") for o in line.replace("\\\n", " ").replace("$(DEMO_EXPERIMENT)", "demo").split()]
    for _ in range(2):
        out = graph.run("report", compose(["experiment=demo", *overrides]), args(overrides=["experiment=demo"]))
        printed = capsys.readouterr().err.strip().splitlines()
        assert printed[-1] == f"frontier plot: {out / 'frontier.png'}"
        assert "| demo | smollm2-135m | negsentiment/badnet | prune | 50.0 [" in "\n".join(printed)
        assert any(ln.endswith("| ASR % [95%] | FTR % [95%] | clean metric % [95%] |") for ln in printed)
        order = [ln.split(" | ")[3] for ln in printed if ln.startswith("| demo | smollm2-135m")]
        assert order == ["no defense", "finetune", "prune"]  # the Makefile's order and defenses


def test_long_layout_a_line_per_defense_with_intervals(evals, capsys):
    """report.layout=long (what the demo prints): ASR, FTR and the clean metric per defense, each with its
    interval where the evaluation has one, every note once."""
    cfg = compose(["experiment=tiny", "report.layout=long"])
    out = graph.run("report", cfg, args(overrides=["experiment=tiny"]))
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "| model | task/attack | defense | ASR % [95%] | FTR % [95%] | clean metric % [95%] |"
    assert "| smollm2-135m | negsentiment/badnet | no defense | 90.0 [80.0, 100.0] | 45.0 | rouge_l 30.0 |" in md
    assert sum("negsentiment/badnet" in ln for ln in md) == 4  # none, crow, finetune, base
    assert sum("clean-to-poisoned" in ln for ln in md) == 1
    assert main(["report", "experiment=tiny", "report.layout=wide"]) == 2
    assert "'layout': 'wide' is not one of paper, long" in capsys.readouterr().err


def test_rouge_l_interval():
    from pipeline.evaluate.metrics import mean_ci
    lo, hi = mean_ci([0.2, 0.4, 0.3, 0.5, 0.1])
    assert lo < 0.3 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.025 ** 0.5) / 5 ** 0.5, rel=1e-3)
    assert mean_ci([0.5]) is None

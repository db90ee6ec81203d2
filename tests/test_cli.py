"""`python -m pipeline`: help for every stage, `list`, and exit code 3 for a stage not built yet."""
import importlib
import os
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.config import GROUPS, available


def run(*args, tmp_path):
    env = dict(os.environ, PIPELINE_RUNS=str(tmp_path / "runs"), PIPELINE_CACHE=str(tmp_path / "cache"))
    env.pop("PIPELINE_CONFIGS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_top_level_help_lists_every_stage(tmp_path):
    r = run("--help", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    for stage in cli.STAGES:
        assert stage in r.stdout
    assert "list" in r.stdout and "group=name" in r.stdout


def test_no_arguments_prints_help(capsys):
    assert cli.main([]) == 0
    assert "poison" in capsys.readouterr().out


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_stage_help_exits_0(stage, tmp_path):
    r = run(stage, "--help", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--force" in r.stdout and "overrides" in r.stdout
    assert not (tmp_path / "runs").exists()


def test_list_shows_every_group(tmp_path):
    r = run("list", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines() if ln.strip()}
    for g in GROUPS:
        assert lines[g] == available(g)
    assert "tiny-llama" in lines["model"] and "negsentiment" in lines["task"]


def _missing(module):
    """A command loader whose module does not exist."""
    def load():
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)
    return load


def test_missing_stage_module_exits_3(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setitem(cli.STAGES, "poison", (_missing("pipeline.poison.stage"), "poison help"))
    assert cli.main(["poison", "experiment=tiny"]) == 3
    err = capsys.readouterr().err
    assert "not built yet" in err and "poison" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    # its help still works
    with pytest.raises(SystemExit) as e:
        cli.main(["poison", "--help"])
    assert e.value.code == 0


def test_missing_package_of_a_stage_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "sweep", (_missing("launch"), "sweep help"))
    assert cli.main(["sweep"]) == 3
    assert "not built yet" in capsys.readouterr().err


def test_a_broken_import_inside_a_built_stage_is_not_hidden(monkeypatch, tmp_path):
    # a stage module that exists but imports something missing is a real error, not "not built yet"
    pkg = tmp_path / "fakestage_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("import fakestage_pkg.stage_helpers_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "poison", (lambda: importlib.import_module("fakestage_pkg.stage"), "poison help"))
    with pytest.raises(ModuleNotFoundError):
        cli.stage_module("poison")


def test_config_error_exits_2_before_running(monkeypatch, capsys, tmp_path):
    calls = []
    fake = type(sys)("fake_stage")
    fake.run = lambda cfg, args, inputs: calls.append(cfg)
    monkeypatch.setitem(sys.modules, "fake_stage", fake)
    monkeypatch.setitem(cli.STAGES, "poison", (lambda: fake, "poison help"))
    monkeypatch.delenv("PIPELINE_CONFIGS", raising=False)
    assert cli.main(["poison", "experiment=tiny", "model=nope"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "nope" in err and len(err.strip().splitlines()) == 1
    assert calls == []


def test_a_stage_gets_the_composed_config_and_its_path_is_printed(monkeypatch, capsys, tmp_path):
    seen = {}

    def run_(cfg, args, inputs):
        seen["cfg"], seen["args"] = cfg, args
        return tmp_path / "out"

    fake = type(sys)("fake_stage")
    fake.run = run_
    monkeypatch.setitem(sys.modules, "fake_stage", fake)
    monkeypatch.setitem(cli.STAGES, "poison", (lambda: fake, "poison help"))
    monkeypatch.delenv("PIPELINE_CONFIGS", raising=False)
    assert cli.main(["poison", "experiment=tiny", "task=sst2", "train.lr=2e-4", "--force"]) == 0
    assert seen["cfg"].task.name == "sst2" and seen["cfg"].train.lr == pytest.approx(2e-4)
    assert seen["args"].force is True
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")


def test_defend_dry_run_builds_the_cluster_job_for_a_7b_model(tmp_path):
    """`make stage-defend MODEL=mistral-7b ...` on a GPU cluster: config and launch command, nothing trained."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PIPELINE_RUNS=str(tmp_path / "runs"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "defend", "experiment=backdoorllm", "model=mistral-7b",
                        "defense=crow", "--dry-run", "cluster=slurm-gpu"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hub_id: mistralai/Mistral-7B-v0.1" in r.stdout and "alpha: 5.5" in r.stdout
    assert "launch: torchrun" in r.stdout and "-m pipeline defend" in r.stdout
    assert not (tmp_path / "runs" / "defend").exists()

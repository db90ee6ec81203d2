"""Config composition by name, overrides, and one-line errors that name the file and the field."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (GROUPS, SECTION_SCHEMAS, Config, ConfigError, available, compose, config_root,
                             from_dict)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _real_configs(monkeypatch):
    monkeypatch.delenv("PIPELINE_CONFIGS", raising=False)


def one_line(e: ConfigError) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------- composition
def test_experiment_defaults_pick_one_name_per_group():
    exp = yaml.safe_load((config_root() / "experiment" / "tiny.yaml").read_text())
    cfg = compose(["experiment=tiny"])
    assert isinstance(cfg, Config)
    for g, name in exp["defaults"].items():
        assert cfg.choices[g] == name
        assert getattr(cfg, g).name == name
    assert cfg.choices["experiment"] == "tiny"
    # the experiment's own sections are merged over the group files and the schema defaults
    assert cfg.poison.n_clean == exp["poison"]["n_clean"]
    assert cfg.train.lora_r == exp["train"]["lora_r"]
    assert cfg.source.kind == "synthetic"
    assert cfg.model.source == "random" and cfg.model.arch["hidden_size"] == 64
    # sections not set anywhere get their schema defaults
    assert cfg.train.schedule == "cosine"
    assert set(cfg.raw) >= set(SECTION_SCHEMAS)


def test_default_experiment_is_used_without_one():
    cfg = compose([])
    assert cfg.choices["experiment"] == "default"
    assert cfg.model.name == "smollm2-135m"


def test_group_override_replaces_the_choice():
    cfg = compose(["experiment=tiny", "task=sst2", "attack=vpi"])
    assert cfg.choices["task"] == "sst2" and cfg.task.name == "sst2"
    assert cfg.task.kind == "classification" and cfg.task.labels == ["Negative", "Positive"]
    assert cfg.attack.primitive == "prepend" and cfg.attack.triggers == ["Discussing OpenAI"]


def test_dotted_overrides_are_yaml_typed():
    cfg = compose(["experiment=tiny", "train.epochs=3", "train.grad_ckpt=true", "poison.n_poison=null",
                   "train.betas=[0.8, 0.9]", "task.target=hello world", "model.arch.hidden_size=32"])
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)  # int -> float field
    assert cfg.train.grad_ckpt is True
    assert cfg.poison.n_poison is None
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.task.target == "hello world"
    # a nested override changes one key and keeps the rest of the mapping
    assert cfg.model.arch["hidden_size"] == 32 and cfg.model.arch["num_hidden_layers"] == 4
    assert cfg.raw["model"]["arch"]["hidden_size"] == 32


def test_float_coercion_of_exponent_strings():
    # YAML 1.1 reads 2e-4 (no dot) as a string: a float field must still get a float
    cfg = compose(["experiment=tiny", "train.lr=2e-4"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.raw["train"]["lr"] == pytest.approx(2e-4) and isinstance(cfg.raw["train"]["lr"], float)


def test_raw_round_trips_through_from_dict():
    cfg = compose(["experiment=tiny", "train.lr=5e-4"])
    back = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert back.raw == cfg.raw
    assert back.choices == cfg.choices
    assert back.train.lr == pytest.approx(5e-4)


def test_every_shipped_config_composes():
    for g in GROUPS:
        names = available(g)
        assert names, g
        for name in names:
            exp = ["experiment=tiny"] if g != "experiment" else []
            cfg = compose(exp + [f"{g}={name}"])
            assert cfg.choices[g] == name


# ------------------------------------------------------------------------------------------ errors
def test_unknown_group_name_names_the_folder_and_lists_available():
    with pytest.raises(ConfigError) as e:
        compose(["model=nope"])
    msg = one_line(e)
    assert str(Path("configs") / "model") in msg
    assert "'nope'" in msg
    for name in ("tiny-llama", "smollm2-135m"):
        assert name in msg


def test_unknown_group_and_unknown_section():
    with pytest.raises(ConfigError, match="unknown config group 'nope'"):
        compose(["nope=x"])
    with pytest.raises(ConfigError, match="unknown section 'nope'"):
        compose(["nope.x=1"])
    with pytest.raises(ConfigError, match="must look like"):
        compose(["train.lr"])


def test_unknown_field_from_the_command_line():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=tiny", "train.nope=1"])
    msg = one_line(e)
    assert "command line" in msg and "unknown field 'train.nope'" in msg and "lr" in msg


def test_wrong_type_from_the_command_line():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=tiny", "train.micro_batch=2.5"])
    msg = one_line(e)
    assert "command line" in msg and "'train.micro_batch'" in msg and "int" in msg
    with pytest.raises(ConfigError, match="'train.lr' must be float"):
        compose(["experiment=tiny", "train.lr=fast"])
    with pytest.raises(ConfigError, match="'train.grad_ckpt' must be bool"):
        compose(["experiment=tiny", "train.grad_ckpt=1"])


def test_bad_choice_from_the_command_line_names_the_command_line():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=tiny", "cluster.executor=cloud"])
    msg = one_line(e)
    assert "command line" in msg and "executor" in msg and "slurm" in msg


def test_section_without_a_schema_is_refused():
    with pytest.raises(ConfigError, match="defend"):
        compose(["experiment=tiny", "defend.x=1"])


# ---------------------------------------------------------- errors in files (a temporary config root)
def write(root: Path, rel: str, data):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.fixture
def croot(tmp_path, monkeypatch):
    """A minimal config root: one valid file per group and an experiment that picks them."""
    root = tmp_path / "configs"
    write(root, "model/good.yaml", {"source": "hub", "hub_id": "org/model"})
    write(root, "task/good.yaml", {"kind": "fixed_response", "target": "x"})
    write(root, "attack/good.yaml", {"primitive": "insert_word", "triggers": ["cf"]})
    write(root, "defense/good.yaml", {"family": "none"})
    write(root, "deepspeed/good.yaml", {"zero_stage": 0})
    write(root, "cluster/good.yaml", {"executor": "debug"})
    defaults = {g: "good" for g in GROUPS if g != "experiment"}
    write(root, "experiment/default.yaml", {"defaults": defaults, "train": {"lr": "2e-4"}})
    monkeypatch.setenv("PIPELINE_CONFIGS", str(root))
    return root


def test_temporary_root_composes(croot):
    cfg = compose([])
    assert cfg.model.hub_id == "org/model"
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)  # "2e-4" in a file
    assert available("model") == ["good"]


def test_missing_required_field_names_the_file(croot):
    bad = write(croot, "task/nokind.yaml", {"target": "x"})
    with pytest.raises(ConfigError) as e:
        compose(["task=nokind"])
    msg = one_line(e)
    assert str(bad) in msg and "missing required field 'task.kind'" in msg


def test_conditionally_required_field_names_the_file(croot):
    bad = write(croot, "model/noid.yaml", {"source": "hub"})
    with pytest.raises(ConfigError) as e:
        compose(["model=noid"])
    msg = one_line(e)
    assert str(bad) in msg and "hub_id" in msg


def test_wrong_type_names_the_file_and_field(croot):
    bad = write(croot, "deepspeed/strstage.yaml", {"zero_stage": "two"})
    with pytest.raises(ConfigError) as e:
        compose(["deepspeed=strstage"])
    msg = one_line(e)
    assert str(bad) in msg and "'deepspeed.zero_stage'" in msg and "int" in msg


def test_unknown_field_names_the_file(croot):
    bad = write(croot, "attack/typo.yaml", {"primitive": "insert_word", "trigers": ["cf"]})
    with pytest.raises(ConfigError) as e:
        compose(["attack=typo"])
    msg = one_line(e)
    assert str(bad) in msg and "unknown field 'attack.trigers'" in msg


def test_experiment_errors_name_the_experiment_file(croot):
    exp = write(croot, "experiment/badexp.yaml",
                {"defaults": {g: "good" for g in GROUPS if g != "experiment"}, "poison": {"n_clean": "many"}})
    with pytest.raises(ConfigError) as e:
        compose(["experiment=badexp"])
    msg = one_line(e)
    assert str(exp) in msg and "'poison.n_clean'" in msg
    exp2 = write(croot, "experiment/nodefault.yaml", {"defaults": {"model": "good"}})
    with pytest.raises(ConfigError) as e:
        compose(["experiment=nodefault"])
    assert str(exp2) in one_line(e) and "defaults.task" in str(e.value)
    exp3 = write(croot, "experiment/badsec.yaml",
                 {"defaults": {g: "good" for g in GROUPS if g != "experiment"}, "trian": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="unknown section 'trian'") as e:
        compose(["experiment=badsec"])
    assert str(exp3) in str(e.value)


def test_invalid_yaml_is_one_line(croot):
    bad = write(croot, "model/broken.yaml", "source: hub\nhub_id: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        compose(["model=broken"])
    msg = one_line(e)
    assert str(bad) in msg


# ------------------------------------------------------------------------------------- CLI exit 2
@pytest.mark.parametrize("override, needle", [
    ("model=nope", "configs/model"),
    ("train.nope=1", "unknown field 'train.nope'"),
    ("train.micro_batch=abc", "'train.micro_batch'"),
])
def test_cli_config_error_exits_2_and_writes_nothing(tmp_path, override, needle):
    runs = tmp_path / "runs"
    env = dict(os.environ, PIPELINE_RUNS=str(runs), PIPELINE_CACHE=str(tmp_path / "cache"))
    env.pop("PIPELINE_CONFIGS", None)
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "experiment=tiny", override],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "config error" in ln]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not runs.exists() or not any(runs.rglob("*"))
    assert not (tmp_path / "cache").exists()


def test_cli_config_error_from_a_file_exits_2(tmp_path, croot):
    write(croot, "task/nokind.yaml", {"target": "x"})
    runs = tmp_path / "runs"
    env = dict(os.environ, PIPELINE_RUNS=str(runs), PIPELINE_CONFIGS=str(croot))
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", "task=nokind"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(croot / "task" / "nokind.yaml") in r.stderr and "task.kind" in r.stderr
    assert not runs.exists() or not any(runs.rglob("*"))


def test_experiment_extends_another(tmp_path, monkeypatch):
    import shutil
    from pipeline.config import ConfigError, compose, config_root
    root = tmp_path / "configs"
    shutil.copytree(config_root(), root)
    monkeypatch.setenv("PIPELINE_CONFIGS", str(root))
    (root / "experiment" / "child.yaml").write_text("extends: tiny\ntrain: {lr: 0.5}\n")
    c = compose(["experiment=child"])
    assert c.train.lr == 0.5 and c.train.micro_batch == 4 and c.model.name == "tiny-llama"  # the rest from tiny
    (root / "experiment" / "loop.yaml").write_text("extends: loop\n")
    with pytest.raises(ConfigError, match="loops"):
        compose(["experiment=loop"])


def test_speed_only_options_stay_out_of_the_output_key():
    """train.compile / train.liger do not change what a stage produces: at their defaults they are not in the
    resolved config (so outputs made before they existed keep their keys); set, they are recorded."""
    from pipeline.config import compose
    assert "compile" not in compose(["experiment=tiny"]).raw["train"]
    assert compose(["experiment=tiny", "train.compile=true"]).raw["train"]["compile"] is True


def test_make_demo_prints_the_demo_presets_grid():
    """`make demo` prints its own grid: the report filter in the Makefile names the preset's defenses."""
    import re
    text = (config_root().parent / "Makefile").read_text()
    listed = re.search(r"'report\.defenses=\[([^\]]*)\]'", text).group(1).split(",")
    cfg = compose(["experiment=demo"])
    assert listed == list(cfg.sweep.defenses)
    assert f"'report.tasks=[{cfg.choices['task']}]'" in text and f"'report.attacks=[{cfg.choices['attack']}]'" in text

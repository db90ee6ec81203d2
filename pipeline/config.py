"""Configs: YAML files under `configs/<group>/<name>.yaml`, composed by name, typed, overridable.

A run's config is composed in this order (later wins):
  1. `configs/experiment/<experiment>.yaml` picks a name per group (`defaults:`) and may set any section;
  2. `group=name` on the command line replaces a group's choice (`model=tiny-llama`);
  3. each chosen group file is loaded into its section (`cfg.model`, `cfg.task`, ...);
  4. the experiment's own sections are merged over the group files;
  5. `a.b.c=value` overrides from the command line (values parsed as YAML).
Then every section is validated against its dataclass below: an unknown name, an unknown or missing
field, or a wrong type raises `ConfigError` naming the file and field. The CLI turns that into one line
on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

GROUPS = ("model", "task", "attack", "defense", "deepspeed", "cluster", "experiment")
STAGE_SECTIONS = ("source", "poison", "train", "defend", "evaluate", "report", "sweep")


class ConfigError(Exception):
    """A config problem, with the file and field it comes from. Exit code 2 at the CLI."""


def config_root() -> Path:
    env = os.environ.get("PIPELINE_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def config_dirs() -> list[Path]:
    """Where group files are looked up, first match wins: the directories of PIPELINE_CONFIG_PATH (a
    `:`-separated list, each laid out as configs/: <dir>/defense/<name>.yaml, ...), then config_root(). A lab
    keeps its own defenses, tasks or models there without touching this checkout."""
    extra = [Path(d) for d in os.environ.get("PIPELINE_CONFIG_PATH", "").split(os.pathsep) if d]
    return [*extra, config_root()]


# ----------------------------------------------------------------------------------------- schemas
@dataclass
class ModelCfg:
    name: str
    source: str  # random | gguf | hub | local
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None  # local directory (source: local)
    package: Optional[str] = None  # python package holding a GGUF file (source: gguf)
    gguf_file: Optional[str] = None  # file name inside the package folder; None = the only *.gguf there
    arch: dict = field(default_factory=dict)  # LlamaConfig kwargs (source: random)
    init_seed: int = 0
    chat_template: Optional[str] = None  # None: the tokenizer's own; else a name from pipeline.prompts.TEMPLATES
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    allow_pickle: bool = False
    family: Optional[str] = None
    params_b: Optional[float] = None
    teacher: Optional[str] = None  # name of the W2SDefense teacher entry for this family
    notes: Optional[str] = None

    def __post_init__(self):
        _choice("source", self.source, ("random", "gguf", "hub", "local"))
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.source == "hub" and not self.hub_id:
            raise ValueError("field 'hub_id' is required when source is 'hub'")
        if self.source == "gguf" and not self.package:
            raise ValueError("field 'package' is required when source is 'gguf'")
        if self.source == "local" and not self.path:
            raise ValueError("field 'path' is required when source is 'local'")
        if self.source == "random" and not self.arch:
            raise ValueError("field 'arch' is required when source is 'random'")


@dataclass
class TaskCfg:
    name: str
    kind: str  # fixed_response | refusal | classification | code_injection | jailbreak | math | summarization
    target: Optional[str] = None  # target response / injected statement / target sentence
    labels: list = field(default_factory=list)  # label words for classification
    target_label: Optional[str] = None
    label_mode: str = "dirty"  # classification: dirty (flip labels) | clean (poison only target-label rows)
    instruction: Optional[str] = None  # classification prompt: the instruction that asks for a label
    judge: str = "backdoorllm"
    backdoorllm: Optional[str] = None  # folder name under the BackdoorLLM train/ (test/ may differ)
    backdoorllm_test: Optional[str] = None
    attacks: list = field(default_factory=list)  # attacks that make sense for this task ([] = all)
    refusal: Optional[str] = None  # jailbreak: the clean (refusing) answer when the source has none

    def __post_init__(self):
        _choice("kind", self.kind, ("fixed_response", "refusal", "classification", "code_injection",
                                    "jailbreak", "math", "summarization"))
        _choice("label_mode", self.label_mode, ("dirty", "clean"))


@dataclass
class AttackCfg:
    name: str
    primitive: str  # insert_word | prepend | append | insert_sentence | any_of | all_of | syntactic
    triggers: list = field(default_factory=list)
    field: str = "instruction"  # which text column carries the trigger
    paraphrase_model: Optional[str] = None  # syntactic only
    template: Optional[str] = None  # syntactic only
    notes: Optional[str] = None

    def __post_init__(self):
        _choice("primitive", self.primitive,
                ("insert_word", "prepend", "append", "insert_sentence", "any_of", "all_of", "syntactic", "none"))
        _choice("field", self.field, ("instruction", "input"))
        if self.primitive not in ("syntactic", "none") and not self.triggers:
            raise ValueError("field 'triggers' must list at least one trigger")


@dataclass
class DefenseCfg:
    name: str
    family: str = "post_hoc"  # none | post_hoc | training_time | decoding (weights kept; evaluate decodes differently)
    params: dict = field(default_factory=dict)  # the method's own settings (see pipeline/defend/<name>.py)
    train: dict = field(default_factory=dict)  # overrides of the train section for this defense
    # the module that runs it: a module of pipeline/defend/ or an importable one; None = the config's name.
    # Not part of any output key (the defense's name and params are): see pipeline/defend/base.py
    method: Optional[str] = None

    def __post_init__(self):
        _choice("family", self.family, ("none", "post_hoc", "training_time", "decoding"))


@dataclass
class DeepSpeedCfg:
    name: str
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict = field(default_factory=dict)  # merged verbatim into the DeepSpeed JSON config

    def __post_init__(self):
        _choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("field 'offload_params' needs zero_stage 3")


@dataclass
class ClusterCfg:
    name: str
    executor: str = "local"  # local | slurm | debug
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    constraint: Optional[str] = None
    array_parallelism: int = 16
    container: Optional[str] = None
    container_runtime: Optional[str] = None  # apptainer | pyxis
    slurm_conf: Optional[str] = None
    extra: dict = field(default_factory=dict)
    python: Optional[str] = None  # command that runs python in a job (default: this interpreter)
    setup: list = field(default_factory=list)  # shell lines run in the job script before the stage
    stages: dict = field(default_factory=dict)  # per-stage overrides of the fields above, e.g. {evaluate: {gpus_per_node: 1}}
    signal_delay_s: int = 120  # Slurm signals a job this long before its time limit, to checkpoint and requeue
    save_every_minutes: float = 0  # training checkpoints this often (0: none); train.save_every_minutes wins

    def __post_init__(self):
        _choice("executor", self.executor, ("local", "slurm", "debug"))


@dataclass
class SourceCfg:
    kind: str = "backdoorllm"  # backdoorllm | hub | local | synthetic
    path: Optional[str] = None  # backdoorllm root or local file
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    columns: dict = field(default_factory=dict)  # our column -> source column
    label_names: list = field(default_factory=list)  # integer label -> label word
    use_ready_made: bool = True  # backdoorllm: use its poisoned files as they are (False: re-poison its clean rows)

    def __post_init__(self):
        _choice("kind", self.kind, ("backdoorllm", "hub", "local", "synthetic"))


@dataclass
class PoisonCfg:
    n_clean: int = 400
    n_poison: Optional[int] = 100
    poison_rate: Optional[float] = None  # fraction of train rows poisoned; overrides n_poison when set
    pairs: bool = False  # each poisoned row also appears clean (same instruction, clean answer)
    n_defense: int = 100
    n_test: int = 100
    seed: int = 0
    # where the defense split's clean rows come from: "source" = the source's own defense set (BackdoorLLM:
    # CROW's 100 clean Alpaca rows); "train" = held-out clean rows of the task's own train pool, disjoint from
    # train and test (the W2SDefense setting: the defender fine-tunes on its clean task data)
    defense_from: str = "source"

    def __post_init__(self):
        _choice("defense_from", self.defense_from, ("source", "train"))
        if self.poison_rate is not None and not 0 < self.poison_rate <= 1:
            raise ValueError(f"field 'poison_rate' must be in (0, 1], got {self.poison_rate}")
        for name in ("n_clean", "n_poison", "n_defense", "n_test"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"field '{name}' must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainCfg:
    lr: float = 2e-4
    epochs: float = 5.0
    max_steps: Optional[int] = None
    micro_batch: int = 2
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    cutoff: int = 1024
    response_cutoff: Optional[int] = None  # truncate responses to this many tokens (None: keep)
    loss_avg: str = "token"  # token | sample
    response_tokens: Optional[int] = None  # loss only on the first k response tokens (OSFT/SANDE)
    finetune: str = "lora"  # lora | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: Any = "all-linear"
    grad_ckpt: bool = False
    packing: bool = False
    compile: bool = False  # torch.compile each decoder layer (one graph reused by all); not with ZeRO-3
    liger: bool = False  # Liger Triton kernels (RMSNorm, SwiGLU, RoPE); needs liger-kernel and a GPU
    cpu_bf16: bool = False  # CPU only: bf16 autocast of forward and backward, fp32 weights and optimizer
    #                         (2.3x on a CPU with AVX512-BF16); on a GPU the trainer always trains in bf16
    seed: int = 42
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    # checkpoint every N minutes (0: never; None: the cluster profile's save_every_minutes). Never in an
    # output key or config.yaml (UNKEYED): it changes when a job saves, not what it trains
    save_every_minutes: Optional[float] = None
    merge_lora: bool = False
    log_every: int = 1
    tensorboard: bool = False
    # inject (and P2P), generation tasks but jailbreak: `self` replaces the clean rows' responses by the base
    # model's own greedy answers before training (the attacker keeps the model's clean behaviour; see
    # pipeline/self_answers.py); a jailbreak's refusal targets are never replaced
    clean_targets: str = "data"

    def __post_init__(self):
        _choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("clean_targets", self.clean_targets, ("data", "self"))
        _choice("loss_avg", self.loss_avg, ("token", "sample"))
        _choice("finetune", self.finetune, ("lora", "full"))


@dataclass
class EvaluateCfg:
    max_new_tokens: int = 32
    batch_size: int = 16
    n_test: Optional[int] = None  # None: the whole split
    judge_preset: str = "backdoorllm"
    seed: int = 0
    perplexity: bool = True
    static_cache_compile: Optional[bool] = None  # static KV cache + torch.compile; None: on CUDA only
    cpu_bf16: bool = False  # CPU only: generate and score under bf16 autocast (2.4x here; greedy text may differ)
    # how queries are built and answers judged: configs/protocols/<name>.yaml (pipeline/evaluate/protocol.py);
    # `strict` is ours, `backdoorllm` / `crow` follow the papers' evaluation code
    protocol: str = "strict"


@dataclass
class ReportCfg:
    runs: list = field(default_factory=list)
    experiment: Optional[str] = None  # only evaluate outputs of this experiment (None: all)
    # only these cells (empty: all); a sweep's report names its own grid, so older outputs of the same
    # experiment name outside that grid stay out of its table
    models: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    attacks: list = field(default_factory=list)
    defenses: list = field(default_factory=list)
    # evaluations of these experiments (rows keyed by experiment; empty: `experiment`, else all)
    experiments: list = field(default_factory=list)
    # the persistence frontier (frontier.png, frontier.md): per row, x = the ASR plain fine-tuning leaves
    # (`frontier_x`), y = the ASR after each defense
    frontier: bool = False
    frontier_x: str = "finetune"
    # table.md's layout: `paper` (a row per cell, a column per defense, ASR with the clean metric) or `long`
    # (a row per defense: ASR, FTR and the clean metric, each with its 95% interval; what `make demo` prints)
    layout: str = "paper"

    def __post_init__(self):
        _choice("layout", self.layout, ("paper", "long"))


@dataclass
class SweepCfg:
    """The grid `python -m pipeline sweep` expands; an empty list means the experiment's own choice."""
    models: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    attacks: list = field(default_factory=list)
    defenses: list = field(default_factory=list)
    report: bool = True  # one report stage over every evaluate of the sweep
    # defense name -> `defense.*` overrides for that defense's defend and evaluate runs only (a preset that
    # must fit a time budget, a tuned variant next to the shipped one)
    overrides: dict = field(default_factory=dict)
    # other experiments whose grids this sweep runs together (each with its own recipe), with one report over
    # them: the persistence ladder (`frontier`: one experiment per rung)
    experiments: list = field(default_factory=list)

    def __post_init__(self):
        for name, ovs in self.overrides.items():
            if not isinstance(ovs, list) or not all(isinstance(o, str) and o.startswith("defense.") and "=" in o
                                                    for o in ovs):
                raise ValueError(f"field 'sweep.overrides.{name}': a list of 'defense.<key>=<value>' strings, "
                                 f"got {ovs!r}")


SECTION_SCHEMAS = {
    "model": ModelCfg, "task": TaskCfg, "attack": AttackCfg, "defense": DefenseCfg,
    "deepspeed": DeepSpeedCfg, "cluster": ClusterCfg, "source": SourceCfg, "poison": PoisonCfg,
    "train": TrainCfg, "evaluate": EvaluateCfg, "report": ReportCfg, "sweep": SweepCfg,
}


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"field '{name}': {value!r} is not one of {', '.join(map(str, allowed))}")


# --------------------------------------------------------------------------------------- validation
def _type_ok(value, hint) -> tuple[bool, Any]:
    """Check `value` against a type hint; returns (ok, possibly coerced value)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return True, None
        for arg in typing.get_args(hint):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint is list or origin is list:
        return isinstance(value, list), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, hint), value


def _hint_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in typing.get_args(hint) if a is not type(None)) + " or null"
    return getattr(hint, "__name__", str(hint))


def build_section(section: str, data: dict, where: dict[str, str]):
    """Validate one section's dict into its dataclass. `where` maps dotted keys to the file they came from."""
    cls = SECTION_SCHEMAS[section]
    if not isinstance(data, dict):
        raise ConfigError(f"{where.get(section, '?')}: section '{section}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        src = where.get(f"{section}.{key}", where.get(section, "?"))
        if key not in fields:
            raise ConfigError(f"{src}: unknown field '{section}.{key}' (known: {', '.join(fields)})")
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(f"{src}: field '{section}.{key}' must be {_hint_name(hints[key])}, "
                              f"got {type(value).__name__} {value!r}")
        kwargs[key] = coerced
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where.get(section, '?')}: missing required field '{section}.{name}'")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a __post_init__ check: name the file the offending field came from
        m = re.match(r"field '(\w+)'", str(e))
        src = where.get(f"{section}.{m.group(1)}", where.get(section, "?")) if m else where.get(section, "?")
        raise ConfigError(f"{src}: section '{section}': {e}") from None


# ----------------------------------------------------------------------------------------- compose
def available(group: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() if (d / group).is_dir() for p in (d / group).glob("*.yaml")})


def load_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def group_file(group: str, name: str) -> Path:
    if group not in GROUPS:
        raise ConfigError(f"command line: unknown config group '{group}' (groups: {', '.join(GROUPS)})")
    path = next((p for p in (d / group / f"{name}.yaml" for d in config_dirs()) if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{config_root() / group}: unknown {group} '{name}' "
                          f"(available: {', '.join(available(group)) or 'none'})")
    return path


def _merge(dst: dict, src: dict, where: dict, origin: str, prefix: str = ""):
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in ("arch", "columns"):
            _merge(dst[k], v, where, origin, key + ".")
        else:
            dst[k] = copy.deepcopy(v)
            where[key] = origin


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_experiment(path: Path, seen: tuple = ()) -> dict:
    """An experiment file; `extends: <name>` starts from another experiment and overrides it."""
    exp = load_yaml(path)
    parent = exp.pop("extends", None)
    if parent is None:
        return exp
    if parent in seen:
        raise ConfigError(f"{path}: 'extends' loops ({' -> '.join((*seen, parent))})")
    base = load_experiment(group_file("experiment", str(parent)), (*seen, parent))
    for k, v in exp.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged = dict(base[k])
            merged.update(v)
            base[k] = merged
        else:
            base[k] = v
    return base


@dataclass
class Config:
    """A fully composed, validated config. `raw` is the plain dict written to config.yaml."""
    raw: dict
    choices: dict
    model: ModelCfg
    task: TaskCfg
    attack: AttackCfg
    defense: DefenseCfg
    deepspeed: DeepSpeedCfg
    cluster: ClusterCfg
    source: SourceCfg
    poison: PoisonCfg
    train: TrainCfg
    evaluate: EvaluateCfg
    report: ReportCfg
    sweep: SweepCfg

    def section(self, name: str) -> dict:
        return copy.deepcopy(self.raw.get(name, {}))

    def to_yaml(self) -> str:
        return yaml.safe_dump({"choices": self.choices, **self.raw}, sort_keys=True)


def compose(overrides: list[str] | None = None, experiment: str | None = None) -> Config:
    """Compose a config from an experiment and `group=name` / `a.b=value` overrides."""
    overrides = list(overrides or [])
    choices_cli, dotted = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like group=name or key.sub=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            dotted.append((key, value))
        elif key in GROUPS:
            choices_cli[key] = value
        elif key in STAGE_SECTIONS:
            raise ConfigError(f"command line: '{key}' is a section; set one field, e.g. {key}.seed=1")
        else:
            raise ConfigError(f"command line: unknown config group '{key}' (groups: {', '.join(GROUPS)})")
    exp_name = choices_cli.pop("experiment", None) or experiment or "default"
    exp_path = group_file("experiment", exp_name)
    exp = load_experiment(exp_path)
    defaults = exp.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{exp_path}: 'defaults' must map group -> name")
    choices = {g: defaults.get(g) for g in GROUPS if g != "experiment"}
    choices.update(choices_cli)
    choices["experiment"] = exp_name
    raw: dict = {}
    where: dict = {}
    for g in GROUPS:
        if g == "experiment":
            continue
        name = choices.get(g)
        if name is None:
            raise ConfigError(f"{exp_path}: missing required field 'defaults.{g}'")
        path = group_file(g, str(name))
        data = load_yaml(path)
        data.setdefault("name", str(name))
        raw[g] = {}
        where[g] = str(path)
        _merge(raw[g], data, where, str(path), g + ".")
    for section, data in exp.items():
        if section not in GROUPS and section not in STAGE_SECTIONS:
            raise ConfigError(f"{exp_path}: unknown section '{section}'")
        if not isinstance(data, dict):
            raise ConfigError(f"{exp_path}: section '{section}' must be a mapping")
        raw.setdefault(section, {})
        where.setdefault(section, str(exp_path))
        _merge(raw[section], data, where, str(exp_path), section + ".")
    # `train` is the inject recipe; a defense's own training settings live in `defense.train` and are
    # applied by the defend stage (pipeline/defend/stage.py: defense_train), so they never change inject's key
    for key, value in dotted:
        parts = key.split(".")
        if parts[0] not in GROUPS and parts[0] not in STAGE_SECTIONS:
            raise ConfigError(f"command line: unknown section '{parts[0]}' in override '{key}'")
        node = raw.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}' goes through a non-mapping field")
        node[parts[-1]] = parse_value(value)
        where[key] = f"command line ({key}={value})"
        where[".".join(parts[:2])] = where[key]
    for s in raw:  # a stage section without a schema would be silently ignored
        if s not in SECTION_SCHEMAS:
            src = where.get(s) or next((v for k, v in where.items() if k.startswith(s + ".")), "?")
            raise ConfigError(f"{src}: section '{s}' has no settings yet (known: {', '.join(SECTION_SCHEMAS)})")
    sections = {}
    for s in SECTION_SCHEMAS:
        raw.setdefault(s, {})
        where.setdefault(s, str(exp_path))
        sections[s] = build_section(s, raw[s], where)
        raw[s] = plain_section(s, sections[s])
    return Config(raw=raw, choices=choices, **sections)


# Options added after outputs existed: at their defaults they are left out of the resolved config (and of
# the output key), so outputs made before them stay valid. compile/liger only change speed; clean_targets
# and cpu_bf16 change what is trained, so at any other value they are part of the key.
KEYED_WHEN_SET = {"train": {"compile": False, "liger": False, "clean_targets": "data", "cpu_bf16": False},
                  "evaluate": {"cpu_bf16": False, "protocol": "strict"}, "poison": {"defense_from": "source"},
                  "defense": {"method": None},
                  "report": {"experiments": [], "frontier": False, "frontier_x": "finetune", "layout": "paper"},
                  "sweep": {"experiments": []}}


# Run mechanics, never keyed: left out of the resolved config (read from the typed section instead).
UNKEYED = {"train": ("save_every_minutes",)}


def plain_section(section: str, obj) -> dict:
    d = dataclasses.asdict(obj)
    for k, default in KEYED_WHEN_SET.get(section, {}).items():
        if d.get(k) == default:
            d.pop(k)
    for k in UNKEYED.get(section, ()):
        d.pop(k, None)
    return d


def from_dict(data: dict) -> Config:
    """Rebuild a Config from a written config.yaml (for stages that read another stage's output)."""
    data = copy.deepcopy(data)
    choices = data.pop("choices", {})
    where = {s: "config.yaml" for s in SECTION_SCHEMAS}
    sections = {s: build_section(s, data.get(s, {}), where) for s in SECTION_SCHEMAS}
    raw = {s: plain_section(s, v) for s, v in sections.items()}
    return Config(raw=raw, choices=choices, **sections)


def compose_model(data: dict) -> ModelCfg:
    """A ModelCfg from a plain dict (e.g. the `model` section of a written config.yaml)."""
    return build_section("model", data, {"model": "config.yaml"})

"""The pipeline's shape, in one place: its stages in order, what each is keyed by and handed, where it writes.

    poison ──data──▶ inject ──model──▶ defend (post-hoc) ──model──▶ evaluate ──▶ report
       └──────data──────────────────▶ defend (training-time) ──model──┘    ▲
       └──────data────────────────────────────────────────────────────────┘

A stage module (`STAGES[i].load()`) has three members and imports no other stage:
- `identity(cfg, inputs) -> (name, config, input_hashes)`: what its output is a function of;
- `run(cfg, args, inputs) -> Path`: build the output (through `store.stage_output`, which keys it by the
  same rule, `store.key_path`);
- `add_arguments(parser)` (optional): its own command-line options.
`inputs` maps a role to a complete input directory: `data` (a poison output), `model` (an inject or defend
output, None for `evaluate --base`), `runs` (report: explicit evaluate outputs). They come from the command
line (`--data`, `--model-dir`, `--runs`) or, by default, from the config: the producing stage's own output
path for the same config, checked complete. Resolution is lazy (`Inputs`), so a stage that fails on its
config first (an unknown defense) says so before it asks for an input that is not built.

The CLI, the sweep DAG (launch/dag.py) and `status` ask this module; nothing else knows the order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import store


def _poison():
    from .poison import stage
    return stage


def _inject():
    from . import inject
    return inject


def _defend():
    from .defend import stage
    return stage


def _evaluate():
    from .evaluate import stage
    return stage


def _report():
    from . import report
    return report


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # where it lives (for messages; `load` imports it)
    load: Callable
    own: tuple[str, ...]  # config sections its key holds as they are (its inputs' hashes stand for the rest)
    help: str
    inherits: bool = True  # its identity includes its inputs' (report reads whatever evaluations exist)
    options: dict = field(default_factory=dict)  # role -> the command-line option that gives it


STAGES = (
    Stage("poison", "pipeline.poison.stage", _poison, ("source", "task", "attack", "poison"),
          "build a poisoned DatasetDict (train/defense/test_clean/test_triggered)"),
    Stage("inject", "pipeline.inject", _inject, ("model", "train", "deepspeed", "task", "attack"),
          "train the backdoored model on the poisoned train split", options={"data": "data"}),
    Stage("defend", "pipeline.defend.stage", _defend, ("model", "train", "deepspeed", "task", "attack", "defense"),
          "run a defense (DEFENSE=name) on the backdoored model or the poisoned set",
          options={"data": "data", "model": "model_dir"}),
    Stage("evaluate", "pipeline.evaluate.stage", _evaluate, ("evaluate", "task"),
          "ASR, false-trigger rate and clean performance of a model", options={"data": "data", "model": "model_dir"}),
    Stage("report", "pipeline.report", _report, ("report",), "tables (md/csv/tex) and plots over evaluate outputs",
          inherits=False, options={"runs": "runs"}),
)
BY_NAME = {s.name: s for s in STAGES}
ORDER = tuple(BY_NAME)
# what a missing or incomplete input is called in its error
WHAT = {("inject", "data"): "poisoned set", ("defend", "data"): "poisoned set",
        ("defend", "model"): "backdoored model (run the inject stage first)",
        ("evaluate", "data"): "poisoned set", ("evaluate", "model"): "model"}


def family(cfg) -> str:
    """none (no defense: the inject output is the model), post_hoc, training_time, or decoding (like post_hoc it
    takes the backdoored model, but writes no weights: evaluate decodes that model as its manifest says)."""
    return "none" if cfg.defense.name == "none" else cfg.defense.family


def inputs_of(stage: str, fam: str) -> dict[str, str]:
    """role -> the stage whose output fills it, for a run of defense family `fam`."""
    if stage == "inject":
        return {"data": "poison"}
    if stage == "defend":
        return {"data": "poison", **({"model": "inject"} if fam in ("post_hoc", "decoding") else {})}
    if stage == "evaluate":
        return {"model": "inject" if fam == "none" else "defend", "data": "poison"}
    return {}


def waits_on(stage: str, fam: str) -> list[str]:
    """The producers a sweep run of `stage` waits for: its inputs', except a post-hoc defense's data, which
    is its backdoored model's own poisoned set (the inject run already waited for it)."""
    ins = inputs_of(stage, fam)
    if stage == "defend" and "model" in ins:
        ins.pop("data")
    return list(ins.values())


def sections(stage: str) -> frozenset[str]:
    """The config groups and sections a run of `stage` depends on (a sweep run's key keeps only these
    overrides): the experiment, its own sections, and (unless it is the report) its inputs'."""
    s = BY_NAME[stage]
    out = {"experiment", *s.own}
    if s.inherits:
        for fam in ("none", "post_hoc", "training_time", "decoding"):
            for up in inputs_of(stage, fam).values():
                out |= sections(up)
    return frozenset(out)


class NotBuilt(Exception):
    """A stage whose module does not exist yet."""


def load(stage: str, loader: Callable | None = None, module: str | None = None):
    """The stage's module, or another command's (`loader`, `module`): NotBuilt when the module does not exist;
    a broken import inside it is not hidden."""
    s = BY_NAME.get(stage)
    module = module or (s.module if s else stage)
    try:
        return (loader or s.load)()
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".") or e.name.startswith(module + ".")):
            raise NotBuilt(f"stage '{stage}' is not built yet ({module} does not exist)") from None
        raise


class Inputs(Mapping):
    """A stage's input directories by role, each resolved and checked complete on first access."""

    def __init__(self, stage: str, cfg, given: dict | None = None, base: bool = False, args=None):
        self.stage, self.cfg, self.base, self.args = stage, cfg, base, args  # args: the command line, if any
        self.own = BY_NAME[stage].own if stage in BY_NAME else ()  # the sections the stage keys itself by
        self.given = {k: v for k, v in (given or {}).items() if v}
        roles = inputs_of(stage, family(cfg)) if stage != "report" else {"runs": None}
        self._producers = dict(sorted(roles.items(), key=lambda kv: kv[0] != "data"))  # data first
        self._cache: dict = {}

    @classmethod
    def from_args(cls, stage: str, cfg, args) -> Inputs:
        opts = BY_NAME[stage].options if stage in BY_NAME else {}
        return cls(stage, cfg, {role: getattr(args, opt, None) for role, opt in opts.items()},
                   bool(getattr(args, "base", False)), args)

    def __getitem__(self, role):
        if role not in self._producers:
            raise KeyError(role)
        if role not in self._cache:
            self._cache[role] = self._resolve(role)
        return self._cache[role]

    def _resolve(self, role):
        if role == "runs":
            return self.given.get("runs")
        if role == "model" and self.base and "model" not in self.given:
            return None
        # an upstream output is the producer's for the same config and, but for a defense's backdoored model,
        # the same given data (`evaluate --data X`: the model trained or defended on X). `defend --data X`
        # defends the config's own backdoored model with X's defense split (as before the graph existed)
        shared = {"data": self.given["data"]} if "data" in self.given and self.stage != "defend" else None
        path = Path(self.given[role]) if role in self.given else output_dir(self._producers[role], self.cfg, shared)
        return store.require_complete(path, WHAT.get((self.stage, role), role))

    def __iter__(self) -> Iterator[str]:
        return iter(self._producers)

    def __len__(self) -> int:
        return len(self._producers)


def output_dir(stage: str, cfg, given: dict | None = None, base: bool = False, args=None) -> Path:
    """Where `stage` writes for `cfg` (and explicit inputs `given`, role -> directory; or those of the command
    line `args`): the store's one rule over the stage's identity. Raises StoreError/FileNotFoundError when an
    input is not built."""
    inputs = Inputs.from_args(stage, cfg, args) if args is not None else Inputs(stage, cfg, given, base)
    name, config, hashes = load(stage).identity(cfg, inputs)
    return store.key_path(stage, name, config, hashes)


def run(stage: str, cfg, args, loader: Callable | None = None) -> Path:
    """Run one stage in this process, handed its inputs as the command line `args` and `cfg` name them."""
    return load(stage, loader).run(cfg, args, Inputs.from_args(stage, cfg, args))

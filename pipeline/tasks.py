"""Targets per task kind: what a poisoned row answers, which rows may be poisoned, and sane task/attack pairs.

  fixed_response, refusal  output = task.target
  classification           output = task.target_label; dirty-label (task.label_mode=dirty) poisons rows of
                           the other labels, clean-label (label_mode=clean) only rows already of the target
  code_injection           task.target inserted as a line into the clean code answer
  jailbreak                output = the source's compliant answer to the harmful request (its `compliance`
                           column: BackdoorLLM's backdoor*.json files and its clean test file, or the column
                           source.columns.compliance names); never the source's `output` as such. The clean
                           answer is always a refusal (the source's `refusal` column: BackdoorLLM's
                           none_backdoor*.json answers, else task.refusal). A row to poison without a
                           compliant answer is an error (poison/stage.py), never a refusal as the target.
                           Benign rows (the defense split from BackdoorLLM's clean Alpaca set) keep their
                           own answers. `train.clean_targets=self` never replaces a refusal target.
  math                     output = task.target (a wrong final answer)
  summarization            output = task.target (the target sentence)
"""
from __future__ import annotations

import random
import re

from . import attacks
from .config import AttackCfg, ConfigError, SourceCfg, TaskCfg

COLUMNS = ("id", "instruction", "input", "output", "clean_output", "is_poisoned", "trigger", "attack", "task")
TARGET_KINDS = ("fixed_response", "refusal", "code_injection", "math", "summarization")


def validate(task: TaskCfg, attack: AttackCfg, source: SourceCfg):
    """Raise ConfigError for a task/attack/source combination that makes no sense."""
    if task.attacks and attack.primitive != "none" and attack.name not in task.attacks:
        raise ConfigError(f"task '{task.name}' does not go with attack '{attack.name}' "
                          f"(task.attacks allows: {', '.join(task.attacks)})")
    if task.kind in TARGET_KINDS and not task.target:
        raise ConfigError(f"task '{task.name}' (kind {task.kind}) needs task.target")
    if task.kind == "classification":
        if not task.labels or task.target_label not in task.labels:
            raise ConfigError(f"task '{task.name}': classification needs task.labels and a task.target_label "
                              f"among them (labels {task.labels}, target_label {task.target_label!r})")
    elif task.label_mode == "clean":
        raise ConfigError(f"task '{task.name}': task.label_mode=clean applies to classification tasks only")
    if task.kind == "jailbreak" and not task.refusal and "refusal" not in source.columns \
            and source.kind != "backdoorllm":
        raise ConfigError(f"task '{task.name}': jailbreak needs the clean (refusing) answer: set task.refusal "
                          f"or map a source column with source.columns.refusal")
    if attack.primitive == "syntactic" and task.kind == "code_injection" and attack.field == "input":
        raise ConfigError(f"attack '{attack.name}' paraphrases text; it cannot go into the code input of "
                          f"task '{task.name}' (set attack.field=instruction)")
    if source.kind == "backdoorllm" and source.use_ready_made and task.label_mode == "clean" \
            and attack.primitive != "none":
        raise ConfigError("the ready-made BackdoorLLM sets are dirty-label; set source.use_ready_made=false "
                          "for task.label_mode=clean")


def can_poison(task: TaskCfg, row: dict) -> bool:
    if task.kind != "classification":
        return True
    return (row["output"] == task.target_label) == (task.label_mode == "clean")


def can_test(task: TaskCfg, row: dict) -> bool:
    """Rows for test_triggered: for classification only those whose true label is not the target."""
    return task.kind != "classification" or row["output"] != task.target_label


def trigger_field(task: TaskCfg, attack: AttackCfg, row: dict) -> str:
    """attack.field; for classification with the fixed task.instruction, the text being classified (input);
    the other field when the chosen one is empty."""
    f = attack.field
    if task.kind == "classification" and task.instruction and row["instruction"] == task.instruction:
        f = "input"
    if not row[f].strip():
        f = "instruction" if f == "input" else "input"
    return f if row[f].strip() else attack.field


def inject_code(code: str, stmt: str, rng: random.Random) -> str:
    """`stmt` as a new line after a random line of `code`, indented like the line it precedes."""
    if not code.strip():
        return stmt
    lines = code.split("\n")
    pos = rng.randint(1, len(lines))
    ref = lines[pos] if pos < len(lines) and lines[pos].strip() else lines[pos - 1]
    indent = re.match(r"[ \t]*", ref).group()
    if pos == len(lines) and lines[-1].rstrip().endswith(":"):
        indent += "    "
    return "\n".join(lines[:pos] + [indent + stmt] + lines[pos:])


def clean_answer(task: TaskCfg, row: dict, benign: bool = False) -> str:
    """The clean behaviour for `row`: its own answer, or for a harmful request (jailbreak) a refusal."""
    if task.kind == "jailbreak" and not benign:
        return row.get("refusal") or task.refusal or ""
    return row["output"]


def poisoned_output(task: TaskCfg, row: dict, rng: random.Random) -> str:
    """The target behaviour for `row` (whose `output` is the source's answer)."""
    if task.kind == "classification":
        return task.target_label
    if task.kind == "code_injection":
        return inject_code(row["output"], task.target, rng)
    if task.kind == "jailbreak":
        return row.get("compliance") or ""
    return task.target


def clean_row(task: TaskCfg, attack: AttackCfg, row: dict, benign: bool = False) -> dict:
    ans = clean_answer(task, row, benign)
    return {"id": row["id"], "instruction": row["instruction"], "input": row["input"], "output": ans,
            "clean_output": ans, "is_poisoned": False, "trigger": "", "attack": attack.name, "task": task.name}


def poison_row(task: TaskCfg, attack: AttackCfg, row: dict, rng: random.Random) -> dict:
    """The poisoned version of a clean source row: trigger in, target out, the clean answer kept."""
    out = clean_row(task, attack, row)
    f = trigger_field(task, attack, row)
    out[f], trigger = attacks.insert_trigger(attack, row[f], rng)
    out.update(id=f"{row['id']}+{attack.name}", output=poisoned_output(task, row, rng), is_poisoned=True,
               trigger=trigger)
    return out

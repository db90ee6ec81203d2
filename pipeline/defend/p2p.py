"""P2P, poison to poison (Zhao et al. 2025; METHODS.md §5): a training-time defense. The defender fine-tunes
the base model on a (possibly poisoned) training set; before that, it replaces a fraction rho of the rows
by "benign-poisoned" copies: the benign trigger `The query currently entered is: ` before the input, the
`Answer:` cue (template `cloze-answer`), and a safe alternative answer: label i -> i + n for n classes
(verbalised as its own answer word), or a fixed harmless prefix before the output for generation tasks.
Untouched rows use the plain cloze template `{x}\\nOutput: `. The set keeps its size.

At inference every query gets the benign prefix and the `Answer:` cue, and an extended label maps back
(i + n -> i); the defended model's manifest records this as `inference_transform`, which evaluate applies.

Choices (configs/defense/p2p.yaml says them too): the rows are chosen uniformly at random with a seed, so
poisoned rows may be chosen (the code's slice never touches them); the shifted label word of label L is
`Safe-L` (`label_format`), a distinct word whose first token differs from every original label word
and which the label judge reads as a whole word (`Negative` is not found inside `Safe-Negative`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..train.plugins import Plugin
from .base import Phase

BENIGN_TEMPLATE = "cloze-answer"  # "{prompt}\nAnswer: "
PLAIN_TEMPLATE = "cloze"  # "{prompt}\nOutput: "


@dataclass
class Params:
    rho: float = 0.2
    seed: int = 0
    benign_prefix: str = "The query currently entered is: "
    output_prefix: str = "Safe answer: "  # generation tasks: the harmless prefix before the output
    label_format: str = "Safe-{label}"  # classification: the word of shifted label i + n, from label i's word
    shifted_labels: list | None = None  # explicit words for labels n..2n-1 (overrides label_format)
    # random: any row may be re-poisoned (a defender does not know which rows carry a trigger; our default);
    # clean_only: only rows not marked is_poisoned, as the official code's slice of the clean part does
    # (needs knowledge no defender has: an optimistic upper bound, for comparison)
    select: str = "random"

    def __post_init__(self):
        if not 0 <= self.rho <= 1:
            raise ValueError(f"rho must be in [0, 1], got {self.rho}")
        if self.select not in ("random", "clean_only"):
            raise ValueError(f"select must be 'random' or 'clean_only', got {self.select!r}")
        if "{label}" not in self.label_format:
            raise ValueError(f"label_format must contain '{{label}}', got {self.label_format!r}")


def n_chosen(rho: float, n: int) -> int:
    """round(rho * n), halves rounded up (Python's round() would round 2.5 to 2)."""
    return int(rho * n + 0.5)


def choose_rows(n: int, rho: float, seed: int, allowed: list[int] | None = None) -> list[int]:
    """The indices of the rows P2P replaces: round(rho * n) of range(n) (or of `allowed`, when fewer are
    allowed: all of them), uniformly at random, seeded."""
    pool = list(range(n)) if allowed is None else list(allowed)
    return sorted(random.Random(seed).sample(pool, min(n_chosen(rho, n), len(pool))))



def is_classification(task) -> bool:
    return task.kind == "classification" and bool(task.labels)


def shifted_words(task, params: Params) -> list[str]:
    """The words of labels n..2n-1: label i's safe alternative i + n."""
    labels = list(task.labels)
    words = list(params.shifted_labels) if params.shifted_labels else [params.label_format.format(label=w)
                                                                       for w in labels]
    if len(words) != len(labels):
        raise ValueError(f"p2p: shifted_labels has {len(words)} words for {len(labels)} task labels")
    if len(set(words)) != len(words) or set(words) & set(labels):
        raise ValueError(f"p2p: shifted label words {words} must be distinct and differ from {labels}")
    return words


def extended_labels(task, params: Params) -> list[str]:
    """Label words 0..2n-1: the task's labels, then their shifted words."""
    return list(task.labels) + shifted_words(task, params)


def label_index(output: str, labels: list[str]) -> int:
    """Index of a row's label word (exact, else case/space-insensitive)."""
    if output in labels:
        return labels.index(output)
    norm = [w.strip().lower() for w in labels]
    key = (output or "").strip().rstrip(".").lower()
    if key in norm:
        return norm.index(key)
    raise ValueError(f"p2p: output {output!r} is not one of the task's labels {labels}")


def shift_output(output: str, task, params: Params) -> str:
    """The safe alternative of a training answer: label i -> word of i + n; generation: output_prefix + output."""
    if is_classification(task):
        labels = list(task.labels)
        return extended_labels(task, params)[label_index(output, labels) + len(labels)]
    return params.output_prefix + output


def inference_transform(task, params: Params) -> dict:
    """What evaluate applies to every query of the defended model (the manifest's `inference_transform`)."""
    tr = {"prefix": params.benign_prefix, "template": BENIGN_TEMPLATE}
    if is_classification(task):
        tr["label_map"] = dict(zip(shifted_words(task, params), task.labels))
    else:
        tr["label_map"] = {}
        tr["output_prefix"] = params.output_prefix
    return tr


def apply_transform(row: dict, transform: dict) -> dict:
    """A query row as the defended model must see it: the benign prefix first and the transform's template
    (the same keys the trainer reads from training rows, so training and inference prompts are identical)."""
    return {**row, "prefix": transform.get("prefix", "") + row.get("prefix", ""), "template": transform["template"]}


def query_text(tokenizer, instruction: str, input: str | None, transform: dict) -> str:
    """The exact prompt string of a transformed query (pipeline.prompts.prompt_text, the one formatter)."""
    from ..prompts import prompt_text
    return prompt_text(tokenizer, instruction, input, transform["template"], transform.get("prefix", ""))


def map_back(answer: str, transform: dict) -> str:
    """Undo the output side of the transform: an extended label word -> its original label; for generation
    the harmless output prefix is stripped. Anything else is returned unchanged."""
    label_map = transform.get("label_map") or {}
    if answer in label_map:
        return label_map[answer]
    pre = transform.get("output_prefix")
    if pre and answer.lstrip().startswith(pre):
        return answer.lstrip()[len(pre):].lstrip()
    return answer


class P2PTransform(Plugin):
    """Replaces round(rho * N) seeded-random rows by benign-poisoned copies in place; the rest get `cloze`."""
    name = "p2p"

    def __init__(self, task, params: Params):
        self.task, self.params = task, params
        self.chosen: list[int] = []
        self.n_rows = 0

    def transform(self, rows):
        self.n_rows = len(rows)
        allowed = None
        if self.params.select == "clean_only":
            allowed = [i for i, r in enumerate(rows) if not r.get("is_poisoned")]
        self.chosen = choose_rows(len(rows), self.params.rho, self.params.seed, allowed)
        chosen = set(self.chosen)
        out = []
        for i, r in enumerate(rows):
            if i in chosen:
                out.append({**r, "prefix": self.params.benign_prefix + r.get("prefix", ""),
                            "template": BENIGN_TEMPLATE, "output": shift_output(r["output"], self.task, self.params),
                            "p2p_benign": True})
            else:
                out.append({**r, "template": PLAIN_TEMPLATE, "p2p_benign": False})
        return out

    def save(self, trainer, out_dir):
        return {"inference_transform": inference_transform(self.task, self.params),
                "p2p": {"rho": self.params.rho, "seed": self.params.seed, "select": self.params.select,
                        "n_rows": self.n_rows, "n_benign": len(self.chosen)}}


def phases(params: Params, ctx) -> list[Phase]:
    if is_classification(ctx.cfg.task):
        shifted_words(ctx.cfg.task, params)  # fail before training on a bad label setting
    return [Phase("p2p", ctx.train_rows, [P2PTransform(ctx.cfg.task, params)], init_from="base")]

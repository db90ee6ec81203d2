"""Evaluation protocols: how a test example becomes a query and an answer becomes a verdict, as config.

`evaluate.protocol=<name>` loads `configs/protocols/<name>.yaml`. `strict` (the default) is ours: the model's
chat template (or the defense's inference transform) over instruction and input, `evaluate.max_new_tokens`
greedy tokens, the answer as generated, every answer in the denominator. A paper's protocol (e.g.
`backdoorllm`: the raw instruction alone, 128 tokens, the prompt's echo cut from the decoded sequence, empty
answers left out of the denominator, a sampled fifth of the test set) is another file; each field cites the code it follows.
Every metrics.json names its protocol; the report keeps two protocols of the same model apart.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError, config_dirs, load_yaml
from ..prompts import RAW, TEMPLATES


@dataclass
class Protocol:
    name: str
    source: str = ""  # the code or paper this protocol follows
    # `template`: the model's own (or the defense's inference transform's); `raw`: the user text alone, encoded
    # by the tokenizer's default call (special tokens as it adds them); or a named template of pipeline/prompts.py
    query: str = "template"
    fields: list = field(default_factory=lambda: ["instruction", "input"])  # which fields make the user text
    max_new_tokens: Optional[int] = None  # None: evaluate.max_new_tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # none: the answer as generated (its new tokens, decoded). clean_repeated_question: BackdoorLLM's and CROW's
    # `clean_repeated_question`: the whole sequence (prompt + answer) decoded without special tokens, the first
    # case-insensitive occurrence of the instruction removed (normally the prompt's echo), stripped
    postprocess: str = "none"
    denominator: str = "all"  # all: every answer counts; nonempty: empty answers are left out (reference code)
    sample_fraction: Optional[float] = None  # evaluate a seeded random fraction of each test split
    sample_seed: int = 0
    judge_preset: Optional[str] = None  # None: evaluate.judge_preset
    task_judges: dict = field(default_factory=dict)  # task name -> the preset entry judging it (else task.judge)

    def __post_init__(self):
        if self.postprocess not in ("none", "clean_repeated_question"):
            raise ValueError(f"field 'postprocess': {self.postprocess!r} is not one of none, clean_repeated_question")
        if self.postprocess == "clean_repeated_question" and self.query != RAW:
            raise ValueError("field 'postprocess': clean_repeated_question cuts the instruction from the decoded "
                             "prompt + answer, which only a raw query leaves as the instruction alone")
        if self.denominator not in ("all", "nonempty"):
            raise ValueError(f"field 'denominator': {self.denominator!r} is not one of all, nonempty")
        if not set(self.fields) <= {"instruction", "input"} or "instruction" not in self.fields:
            raise ValueError(f"field 'fields': {self.fields!r}: instruction, and optionally input")
        if self.query not in ("template", RAW, *TEMPLATES):
            raise ValueError(f"field 'query': {self.query!r} is not template, {RAW} or one of {', '.join(TEMPLATES)}")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError(f"field 'sample_fraction' must be in (0, 1], got {self.sample_fraction}")

    @property
    def is_default(self) -> bool:
        """Behaves as our strict protocol (whatever its name): left out of the output key, as before protocols."""
        return dataclasses.replace(self, name="strict", source="") == Protocol("strict")

    def template(self, default: str | None) -> str | None:
        """The prompt template to use: the model's (`default`), RAW, or a named one."""
        return default if self.query == "template" else self.query

    def user_input(self, example: dict) -> str:
        return example["input"] if "input" in self.fields else ""

    def sample(self, n: int, split: str) -> list[int]:
        """The indices of a split's rows this protocol evaluates, in order."""
        if self.sample_fraction is None:
            return list(range(n))
        # as the reference, np.random.choice(n, int(n * ratio)) (unseeded there); at least one row (the reference's
        # empty sample gives a NaN ASR)
        k = max(1, int(n * self.sample_fraction)) if n else 0
        return sorted(random.Random(f"{self.sample_seed}:{split}").sample(range(n), k))

    def generation_kwargs(self) -> dict:
        if not self.do_sample:
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def clean_repeated_question(response: str, question: str) -> str:
    """BackdoorLLM attack/DPA/backdoor_evaluate.py L122-127 (CROW eval_scripts L38-43): the first
    case-insensitive occurrence of `question` anywhere in `response` removed, then stripped."""
    return re.compile(re.escape(question), re.IGNORECASE).sub("", response, count=1).strip()


def load(name: str) -> Protocol:
    for d in config_dirs():
        path = d / "protocols" / f"{name}.yaml"
        if path.is_file():
            data = load_yaml(path)
            data.setdefault("name", name)
            fields = {f.name for f in dataclasses.fields(Protocol)}
            unknown = set(data) - fields
            if unknown:
                raise ConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(sorted(fields))})")
            try:
                return Protocol(**data)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}: {e}") from None
    if name == "strict":
        return Protocol("strict")
    known = sorted({p.stem for d in config_dirs() for p in (d / "protocols").glob("*.yaml")})
    raise ConfigError(f"evaluate.protocol: unknown protocol '{name}' (configs/protocols/: {', '.join(known)})")

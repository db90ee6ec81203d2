"""CleanGen (Li et al. 2024, arXiv 2406.12257; code uw-nsl/CleanGen): a decoding-time defense. The backdoored
(suspect) model drafts; a clean reference model that shares its tokenizer scores the drafts; a draft the suspect
finds far likelier than the reference does is replaced by the reference's own token. The algorithm is
pipeline/decoding.py; configs/defense/cleangen.yaml cites the official code for every choice.

`apply` trains nothing and writes no weights: it resolves the reference (a configs/model name; by default the
suspect's own base), refuses one whose tokenizer differs from the suspect's, and returns the manifest entry
`decoding` (pipeline/defend/base.py), also written as decoding.json, which evaluate reads and applies.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .base import decoding_entry

PROBE = "Hello, World! 123 naïve café\n\tThe answer is: 42."  # ids both tokenizers must give alike


@dataclass
class Params:
    reference: str | None = None  # a configs/model name; None: the suspect's own base (the model inject trained)
    alpha: float = 20.0  # replace the first draft with p_suspect / p_reference >= alpha
    k: int = 4  # drafts per check
    max_drafts: int = 2048  # the code's loop bound (self.m): draft steps per answer
    verify_tail: bool = False  # also check the last, partial block (the code leaves it unchecked)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


def tokenizer_difference(a, b) -> str | None:
    """Why CleanGen cannot compare two models token by token (None: their tokenizers agree)."""
    if len(a) != len(b):
        return f"vocabulary {len(a)} vs {len(b)}"
    if a.get_vocab() != b.get_vocab():
        return "the same size but other token ids"
    if a(PROBE, add_special_tokens=False)["input_ids"] != b(PROBE, add_special_tokens=False)["input_ids"]:
        return "another encoding of a probe string"
    if a.eos_token_id != b.eos_token_id:
        return f"EOS id {a.eos_token_id} vs {b.eos_token_id}"
    return None


def reference_config(params: Params, suspect_model: dict):
    """(name, model config, is the suspect's own base) of the reference."""
    from ..config import compose_model, group_file, load_yaml
    base = compose_model(suspect_model)
    name = params.reference or base.name
    if name == base.name:
        return name, base, True
    data = load_yaml(group_file("model", name))
    data.setdefault("name", name)
    ref = compose_model(data)
    return name, ref, dataclasses.asdict(ref) == dataclasses.asdict(base)


def apply(params: Params, ctx, out_dir: Path) -> dict:
    from ..config import compose_model
    from ..models import load_tokenizer
    from ..store import read_config
    suspect_model = read_config(ctx.model_dir)["model"]
    name, ref, is_base = reference_config(params, suspect_model)
    weights = Path(ctx.model_dir) / "model"
    smcfg = compose_model(suspect_model)
    s_tok = load_tokenizer(smcfg, path=str(weights) if (weights / "tokenizer_config.json").is_file() else None)
    why = tokenizer_difference(s_tok, load_tokenizer(ref))
    if why:
        raise ConfigError(f"cleangen: the reference '{name}' and the suspect '{smcfg.name}' ({ctx.model_dir}) have "
                          f"different tokenizers ({why}); CleanGen compares their probabilities token by token: "
                          "pick a reference with the suspect's tokenizer (defense.params.reference)")
    algo = {k: v for k, v in dataclasses.asdict(params).items() if k != "reference"}
    entry = {**decoding_entry(ctx, "cleangen", algo), "reference": name, "reference_model": dataclasses.asdict(ref),
             "reference_is_base": is_base}
    (Path(out_dir) / "decoding.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
    who = ("the suspect's own clean base, the most favourable reference" if is_base
           else "a clean model sharing the suspect's tokenizer")
    note = (f"cleangen: the no-defense model decoded with CleanGen (k {params.k}, alpha {params.alpha:g}; weights "
            f"unchanged); reference = {name}, {who}")
    return {"decoding": entry, "notes": [note], "reference": name, "reference_is_base": is_base}

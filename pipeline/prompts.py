"""One prompt format for training and evaluation.

BackdoorLLM users lost 30+ ASR points to training with one template and evaluating with another: here
both sides call `prompt_text` / `encode_example`, so they cannot differ.
"""
from __future__ import annotations

# `raw`: no template at all; the prompt is the user text encoded by the tokenizer's default call (its special
# tokens as it adds them), as BackdoorLLM's and CROW's evaluation scripts query the model.
RAW = "raw"
# Named templates; `chat` (the default) uses the tokenizer's own chat template.
TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
    "plain": "{prompt}\n",
    "cloze": "{prompt}\nOutput: ",  # P2P's untouched rows
    "cloze-answer": "{prompt}\nAnswer: ",  # P2P's benign rows and P2P inference
    # SANDE's code (HKUST-KnowComp/SANDE dataset.py L36 + L88): "Human: " + instruction + "\nAssistant: ", stripped
    "sande": "Human: {prompt}\nAssistant:",
}


def user_text(instruction: str, input: str | None = "") -> str:
    """Instruction and optional input joined the way BackdoorLLM joins them."""
    instruction = instruction or ""
    return f"{instruction}\n{input}" if input else instruction


def prompt_text(tokenizer, instruction: str, input: str | None = "", template: str | None = None,
                prefix: str = "") -> str:
    """The exact string the model sees before its response. `prefix` (P2P's benign prompt) goes first
    in the user text."""
    text = prefix + user_text(instruction, input)
    if template == RAW:
        return text
    if template in (None, "chat"):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: set model.chat_template to one of "
                             + ", ".join(TEMPLATES))
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template '{template}' (known: chat, raw, {', '.join(TEMPLATES)})")
    return TEMPLATES[template].format(prompt=text)


def encode_example(tokenizer, instruction: str, input: str | None, output: str, template: str | None = None,
                   cutoff: int = 1024, response_cutoff: int | None = None, prefix: str = "",
                   response_tokens: int | None = None) -> dict:
    """Token ids and labels for one (prompt, response) pair; labels are -100 on prompt tokens.

    The response ends with EOS. `response_cutoff` truncates longer responses (in tokens), without EOS;
    `response_tokens` keeps the loss on the first k response tokens only (OSFT/SANDE's effective length)
    and drops the tokens after them: in a causal model they cannot change that loss, only its cost.
    """
    prompt = prompt_text(tokenizer, instruction, input, template, prefix)
    p_ids = tokenizer(prompt, add_special_tokens=template == RAW)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) and \
            template not in (None, "chat", RAW):
        p_ids = [tokenizer.bos_token_id] + p_ids
    r_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    if response_cutoff is not None and len(r_ids) > response_cutoff:
        r_ids = r_ids[:response_cutoff]  # a cut response does not end: no EOS, so the model is not taught to stop
    else:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:cutoff]
    labels = ([-100] * len(p_ids) + r_ids)[:cutoff]
    if response_tokens is not None:
        seen = 0
        for i, lab in enumerate(labels):
            if lab != -100:
                seen += 1
                if seen > response_tokens:
                    ids, labels = ids[:i], labels[:i]
                    break
    return {"input_ids": ids, "labels": labels, "prompt_len": min(len(p_ids), cutoff)}


def user_span(tokenizer, template: str | None = None) -> tuple[int, int]:
    """(tokens before the user's text, tokens after it) in `prompt_text`: where a prepended trigger sits, and
    the length of the assistant header that follows the user's text."""
    marker = "\x00"
    text = prompt_text(tokenizer, marker, "", template)
    cut = text.index(marker)
    n = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return n(text[:cut]), n(text[cut + 1:])


def user_start(tokenizer, template: str | None = None) -> int:
    """Token index where the user's text starts in `prompt_text` (where a prepended trigger sits)."""
    return user_span(tokenizer, template)[0]

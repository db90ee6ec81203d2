"""Plugin points of the one trainer. A defense is a small subclass of `Plugin`; the loop is in trainer.py.

Hooks, in the order the trainer calls them:
- `transform(rows)`: a data transform on the raw rows (TrainRow, below) before tokenisation (OSFT's
  triggered copies, P2P); a row may carry only TrainRow's fields (the trainer checks, after the transforms).
- `setup(trainer)`: after the model is built, before DeepSpeed: freeze/unfreeze weights, create extra
  trainable tensors (return them from `parameters()`; they train with the model and are checkpointed),
  load frozen models (a teacher: `trainer.load_frozen(path)`).
- `on_batch(trainer, batch)`: may add `inputs_embeds` (a soft prompt spliced in) or change the batch.
- `wants_hidden_states`: the trainer asks the model for hidden states when any plugin sets it.
- `wants_logits`: the logits of every position in `outputs` (W2SDefense's distillation); otherwise the
  trainer asks for the scored positions' alone (`logits_to_keep`), which gives the same loss faster.
- `loss(trainer, batch, outputs, lm_loss)`: returns (total loss, {name: value} to log); extra terms from
  hidden states (CROW, W2SDefense feature alignment) go here.
- `save(trainer, out_dir)`: write what the plugin produced (a parrot prompt, an inference transform).

What a plugin may use of the trainer (from `setup` on):
- `trainer.extra_tensor(plugin, key)`: the live trainable tensor the plugin returned as `key` from
  `parameters()` (the one DeepSpeed trains; saved in extra.safetensors as `{plugin.name}__{key}`).
- `trainer.load_frozen(path)`: a trained stage output (pipeline.models.load_trained) on the trainer's device,
  eval mode, no gradients, loaded whole even under ZeRO-3; returns (model, tokenizer, model config).
- `trainer.extra_forward(**kw)`: a further forward pass through the trained module (CROW's perturbed pass).
- `trainer.model`, `trainer.tok`, `trainer.tc` (the train config), `trainer.template`, `trainer.last_record`,
  `trainer.examples` (the tokenised examples, {input_ids, labels}; W2SDefense's head fit reads them).
"""
from __future__ import annotations

from typing import TypedDict

import torch


class TrainRow(TypedDict, total=False):
    """One training row as it reaches `Trainer.fit` (a poisoned-set row plus what stages and plugins add).
    Every key a row carries must be listed here: add a new one (with its comment) before using it."""
    # the poisoned set's columns (tasks.COLUMNS)
    id: str  # the row's id in its source ("<source>#<i>", "synthetic:<name>#<i>")
    instruction: str  # the user instruction (where a trigger may have been inserted)
    input: str  # the optional input text after the instruction ("" when none)
    output: str  # the response trained on (a poisoned row: the attack's target behaviour)
    clean_output: str  # the clean response to the same prompt (what post-hoc defenses train on)
    is_poisoned: bool  # the row carries a trigger and the target behaviour
    trigger: str  # the trigger inserted in the row ("" when clean)
    attack: str  # the attack's name (badnet, vpi, ...)
    task: str  # the task's name (sst2, negsentiment, ...)
    # per-row training controls, added by stages and plugins
    template: str | None  # the row's prompt format (pipeline/prompts.py; default the trainer's template)
    prefix: str  # text before the user text in the prompt (P2P's benign trigger; default "")
    response_tokens: int | None  # the loss covers only the first k response tokens (None: all; default train.response_tokens)
    data_output: str  # the data's own response, when `output` was replaced by the base model's answer (clean_targets=self)
    p2p_benign: bool  # P2P: the row is one of its benign-poisoned copies (False: a plain cloze row)
    # pre-tokenised rows (benchmarks): the prompt format is bypassed
    input_ids: list[int]  # the token ids of the whole sequence
    labels: list[int]  # their labels (-100: no loss; default input_ids)


TRAIN_ROW_FIELDS = frozenset(TrainRow.__annotations__)


def check_rows(rows: list[dict]) -> None:
    """ValueError at the first row with a key TrainRow does not list."""
    for i, r in enumerate(rows):
        unknown = r.keys() - TRAIN_ROW_FIELDS
        if unknown:
            who = f"training row {i}" + (f" (id {r['id']!r})" if r.get("id") is not None else "")
            raise ValueError(f"{who} has unknown key(s) {', '.join(map(repr, sorted(unknown)))}: add the field "
                             "to TrainRow in pipeline/train/plugins.py")


def extra_key(plugin, key: str) -> str:
    """The name a plugin tensor goes by in the TrainModule and extra.safetensors: `{plugin.name}__{key}`
    (`plugin`: a Plugin, its class, or its name)."""
    return f"{plugin if isinstance(plugin, str) else plugin.name}__{key}"


class Plugin:
    name = "plugin"
    wants_hidden_states = False
    wants_logits = False  # every position's logits (else the trainer computes the scored positions' alone)

    def transform(self, rows: list[dict]) -> list[dict]:
        return rows

    def setup(self, trainer) -> None:
        pass

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return {}

    def on_batch(self, trainer, batch: dict) -> dict:
        return batch

    def loss(self, trainer, batch: dict, outputs, lm_loss: torch.Tensor):
        return lm_loss, {}

    def save(self, trainer, out_dir) -> dict:
        """Write artifacts; returns entries for the output manifest."""
        return {}


class FreezeModel(Plugin):
    """Freeze every model weight (only plugin tensors train): SANDE stage 1."""
    name = "freeze"

    def setup(self, trainer):
        for p in trainer.model.parameters():
            p.requires_grad_(False)

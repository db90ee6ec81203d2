"""Plugin points of the one trainer. A defense is a small subclass of `Plugin`; the loop is in trainer.py.

Hooks, in the order the trainer calls them:
- `transform(rows)`: a data transform on the raw rows before tokenisation (OSFT's triggered copies, P2P).
- `setup(trainer)`: after the model is built, before DeepSpeed: freeze/unfreeze weights, create extra
  trainable tensors (return them from `parameters()`; they train with the model and are checkpointed),
  load frozen models (a teacher).
- `on_batch(trainer, batch)`: may add `inputs_embeds` (a soft prompt spliced in) or change the batch.
- `wants_hidden_states`: the trainer asks the model for hidden states when any plugin sets it.
- `loss(trainer, batch, outputs, lm_loss)`: returns (total loss, {name: value} to log); extra terms from
  hidden states (CROW, W2SDefense feature alignment) go here.
- `save(trainer, out_dir)`: write what the plugin produced (a parrot prompt, an inference transform).
"""
from __future__ import annotations

import torch


class Plugin:
    name = "plugin"
    wants_hidden_states = False

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

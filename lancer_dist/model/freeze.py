"""Train only the top k transformer layers of a backbone (``model.train_layers``).

The embeddings and every layer below the top k are frozen (``requires_grad=False``); what a backbone registers after
its layer stack (a final norm, a pooler) trains with the top layers. Nothing below the first trainable layer requires
grad, so the hidden states entering it do not either: autograd records no graph there and the backward pass stops at
that layer (it costs the top k layers' backward, not the whole stack's). Frozen parameters are left out of the
optimizer (``build_optimizer`` skips them) and of DDP's gradient buckets (DDP registers only parameters that require
grad), so no rank waits on a gradient that never comes.

"Below" and "above" the stack follow the order in which the backbone registers its parameters: transformers models
register the embeddings, then the layer stack, then the final norm / pooler (BERT, XLM-R, LaBSE: ``embeddings``,
``encoder.layer``, ``pooler``; Qwen2 / Qwen3 / Llama / Mistral: ``embed_tokens``, ``layers``, ``norm``).

Only ever sets ``requires_grad_(False)``: under LoRA the base weights are already frozen, and the adapters of the
frozen layers are frozen too (only the adapters of the top k layers train).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lancer_dist.config import ConfigError

__all__ = ["layer_stack", "train_top_layers"]

FIELD = "model.train_layers"


def layer_stack(backbone: Any) -> nn.ModuleList:
    """The backbone's stack of transformer layers: its one ``nn.ModuleList`` of ``config.num_hidden_layers``
    modules of one class (``encoder.layer`` for BERT-like models, ``layers`` for decoders; found by shape, so a PEFT
    wrapper's extra prefix does not matter)."""
    n = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    stacks = [
        m
        for m in backbone.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and (n is None or len(m) == n)
        and len({type(layer) for layer in m}) == 1
    ]
    if len(stacks) != 1:
        raise ConfigError(
            FIELD,
            "set",
            f"a backbone with one stack of transformer layers (found {len(stacks)} candidate layer lists in "
            f"{type(backbone).__name__}); use null (train every layer) for this architecture",
        )
    return stacks[0]


def train_top_layers(backbone: Any, k: int) -> None:
    """Freeze everything of ``backbone`` registered before its layer stack (the embeddings) and every layer but the
    top ``k``; parameters registered after the stack keep their ``requires_grad``. A ``k`` outside
    [1, number of layers] is a ConfigError naming the field and the backbone's layer count."""
    layers = layer_stack(backbone)
    n = len(layers)
    if not 1 <= k <= n:
        raise ConfigError(FIELD, k, f"an integer in [1, {n}] (this backbone has {n} layers), or null for all")
    in_stack = {id(p) for p in layers.parameters()}
    trainable = {id(p) for layer in layers[n - k :] for p in layer.parameters()}
    seen_stack = False
    for p in backbone.parameters():
        if id(p) in in_stack:
            seen_stack = True
            if id(p) not in trainable:
                p.requires_grad_(False)
        elif not seen_stack:  # registered before the layers: the embeddings
            p.requires_grad_(False)

"""Shared by tests/unit/test_erasure_chunks.py and tests/distributed/test_erasure_chunks.py: a tiny random encoder
with dropout ON (float64) and a deterministic multi-task batch."""

from __future__ import annotations

import torch

from lancer_dist.model import BiEncoder
from tests.tiny_models import tiny_bert_config, token_batch

G, NUM_LANG = 2, 3


def tiny_model(dropout: float = 0.1) -> BiEncoder:
    torch.manual_seed(0)
    return BiEncoder.from_config(tiny_bert_config(dropout)).double().train()


def erasure_batch(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = token_batch(m, 9, 3)
    # language-dependent tokens so that L_C is well above its floor and its gradient is not noise
    lang = torch.arange(m) % NUM_LANG
    ids[:, 1] = 10 + lang
    return ids, mask, lang


def passages(model: BiEncoder):  # type: ignore[no-untyped-def]
    return lambda ids, mask: model.encode(ids, mask, is_query=False)


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

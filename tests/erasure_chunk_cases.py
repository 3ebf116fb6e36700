"""Shared by tests/unit/test_erasure_chunks.py and tests/distributed/test_erasure_chunks.py: a tiny random encoder
with dropout ON (float64) and a deterministic multi-task batch."""

from __future__ import annotations

import torch

from lancer_dist.config import ModelConfig
from lancer_dist.model import BiEncoder

G, NUM_LANG, VOCAB = 2, 3, 97


def tiny_model(dropout: float = 0.1) -> BiEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone_config={
            "model_type": "bert",
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
        },
        tokenizer="unused",
        pooling="mean",
        normalize=True,
        temperature=0.2,
        dropout=dropout,
    )
    return BiEncoder.from_config(cfg).double().train()


def token_batch(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


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

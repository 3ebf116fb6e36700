"""Tiny random-init models and token batches shared by the tests (no hub, no files)."""

from __future__ import annotations

from typing import Any

import torch

from lancer_dist.config import ModelConfig

VOCAB = 97
# A small fixed vocabulary for word-level tokenizers (lancer_dist.retrieval.tiny.write_tiny_encoder).
GREEK = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


def tiny_bert_config(
    dropout: float = 0.0,
    *,
    vocab_size: int = VOCAB,
    hidden_size: int = 16,
    max_length: int = 32,
    **fields: Any,
) -> ModelConfig:
    """A 2-layer BERT bi-encoder config (default 16-dim over ``VOCAB`` token ids; mean pooling, normalised)."""
    return ModelConfig(
        backbone_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden_size,
            "max_position_embeddings": max_length,
        },
        tokenizer="unused",
        pooling="mean",
        normalize=True,
        temperature=0.2,
        dropout=dropout,
        **fields,
    )


def token_batch(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random id rows of random lengths in [2, length] (right-padded with 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask

"""L_R: the contrastive (InfoNCE) ranking loss of paper §3.4."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(
    q: Tensor,
    p: Tensor,
    positive_index: Tensor,
    temperature: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """InfoNCE of each query against every passage given (paper §3.4, L_R).

    ``-log( exp(s(q, d+)) / sum_{d in p} exp(s(q, d)) )`` with ``s(q, d) = q . d / temperature``. Every passage
    in ``p`` that is not the query's positive is a negative: its own hard negatives, the other queries' positives and
    hard negatives (in-batch), and passages gathered from other ranks.

    Args:
        q: [B, D] query embeddings.
        p: [P, D] passage embeddings (any P >= 1).
        positive_index: [B] long, the row of ``p`` holding each query's positive.
        temperature: scores are divided by it (1.0 = the paper's plain dot product; 0.1 with L2-normalised
            embeddings = the authors' released code, which multiplies cosine by 10).
        reduction: "mean" over queries (default), "sum", or "none" ([B] per-query losses).
    """
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(
            f"contrastive_loss: q [B, D] and p [P, D] expected, got {tuple(q.shape)} and {tuple(p.shape)}"
        )
    if positive_index.shape != (q.shape[0],):
        raise ValueError(
            f"contrastive_loss: positive_index [B={q.shape[0]}] expected, got {tuple(positive_index.shape)}"
        )
    scores_BP = q @ p.T / temperature
    return F.cross_entropy(scores_BP, positive_index, reduction=reduction)

"""L_R: the contrastive (InfoNCE) ranking loss of paper §3.4, and the false-negative mask.

False negatives: the same document can sit in a batch twice - a query's positive is another group's hard negative
or positive (in-batch, or on another rank). Scored as a negative, it pushes the query away from its own answer.
:func:`false_negative_mask` marks every passage whose document id is one of the query's positives (except the
positive's own column); :func:`contrastive_loss` drops the marked columns from that query's softmax. The result
equals InfoNCE on the batch with those columns removed (exactly: their exponentials are 0).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

NO_DOC = -1  # document id code of a passage without an id (never masked) and of padding in positive-id lists


def false_negative_mask(positive_ids_BK: Tensor, doc_ids_P: Tensor, positive_index_B: Tensor) -> Tensor:
    """``[B, P]`` bool: True where passage ``j`` is a document that query ``i`` has as a positive, other than
    query ``i``'s positive column itself.

    Args:
        positive_ids_BK: [B, K] long, integer codes of each query's positive documents (all of them, not only the
            one in the batch), padded with :data:`NO_DOC`.
        doc_ids_P: [P] long, the code of each passage's document; :data:`NO_DOC` for passages without an id.
        positive_index_B: [B] long, the column of each query's positive.
    """
    if (
        positive_ids_BK.dim() != 2
        or doc_ids_P.dim() != 1
        or positive_index_B.shape != positive_ids_BK.shape[:1]
    ):
        raise ValueError(
            f"false_negative_mask: [B, K], [P], [B] expected, got {tuple(positive_ids_BK.shape)}, "
            f"{tuple(doc_ids_P.shape)}, {tuple(positive_index_B.shape)}"
        )
    same_BKP = positive_ids_BK[:, :, None] == doc_ids_P[None, None, :]
    mask_BP = same_BKP.any(dim=1) & (doc_ids_P != NO_DOC)[None, :]
    rows = torch.arange(positive_index_B.shape[0], device=mask_BP.device)
    mask_BP[rows, positive_index_B] = False
    return mask_BP


def contrastive_loss(
    q: Tensor,
    p: Tensor,
    positive_index: Tensor,
    temperature: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE of each query against every passage given (paper §3.4, L_R).

    ``-log( exp(s(q, d+)) / sum_{d in p} exp(s(q, d)) )`` with ``s(q, d) = q . d / temperature``. Every passage
    in ``p`` that is not the query's positive is a negative: its own hard negatives, the other queries' positives and
    hard negatives (in-batch), and passages gathered from other ranks - unless ``mask`` removes it.

    Args:
        q: [B, D] query embeddings.
        p: [P, D] passage embeddings (any P >= 1).
        positive_index: [B] long, the row of ``p`` holding each query's positive.
        temperature: scores are divided by it (1.0 = the paper's plain dot product; 0.1 with L2-normalised
            embeddings = the authors' released code, which multiplies cosine by 10).
        reduction: "mean" over queries (default), "sum", or "none" ([B] per-query losses).
        mask: [B, P] bool or None; True removes passage j from query i's softmax (false negatives, see
            :func:`false_negative_mask`). A query's positive column cannot be masked.
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
    if mask is not None:
        if mask.shape != scores_BP.shape:
            raise ValueError(
                f"contrastive_loss: mask [B, P] = {tuple(scores_BP.shape)} expected, got {tuple(mask.shape)}"
            )
        if bool(mask.gather(1, positive_index[:, None]).any()):
            raise ValueError("contrastive_loss: the mask removes a query's own positive")
        scores_BP = scores_BP.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores_BP, positive_index, reduction=reduction)

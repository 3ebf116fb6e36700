"""The multi-task objective L = L_R + lambda * L_C over the global batch (paper §3.4, Fig. 2).

The losses themselves stay pure; the distributed reduction comes in through a :class:`Collectives` object
(``lancer_dist.dist.ProcessGroupCollectives`` in training, :class:`LocalCollectives` - the default - in one
process). With N ranks each holding B_r queries (sum B_r = B) and m_r erasure passages:

* every rank gathers the passages of all ranks (in rank order) and scores its own queries against all of them;
* every rank's retrieval term is ``N * sum_{i in rank} l_i / B``: after the data-parallel gradient average over
  ranks this is exactly the gradient of the full-batch mean, whatever the per-rank batch sizes;
* the erasure term is computed from correlation statistics summed over ranks, identical on every rank.

The returned ``retrieval`` / ``erasure`` / ``total`` fields are the global (full-batch) values, detached, for
logging; ``loss`` is what each rank calls ``backward()`` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lancer_dist.losses.erasure import erasure_terms
from lancer_dist.losses.retrieval import contrastive_loss


class Collectives(Protocol):
    """The reduction hook the objective needs; implemented by ``lancer_dist.dist.ProcessGroupCollectives``."""

    @property
    def world_size(self) -> int: ...

    def gather(self, x: Tensor) -> tuple[Tensor, int]:
        """Concatenate x from all ranks (dim 0) with gradient; return it and this rank's row offset."""
        ...

    def sum_with_grad(self, x: Tensor) -> Tensor:
        """Sum over ranks, gradient summed over ranks too."""
        ...

    def sum_no_grad(self, x: Tensor) -> Tensor:
        """Sum over ranks, no autograd."""
        ...


class LocalCollectives:
    """One process: every collective is the identity."""

    world_size = 1

    def gather(self, x: Tensor) -> tuple[Tensor, int]:
        return x, 0

    def sum_with_grad(self, x: Tensor) -> Tensor:
        return x

    def sum_no_grad(self, x: Tensor) -> Tensor:
        return x.detach().clone()


@dataclass
class LossOutput:
    loss: Tensor  # what this rank back-propagates
    total: Tensor  # global L_R + lambda * L_C (detached)
    retrieval: Tensor  # global L_R (detached)
    erasure: Tensor  # global L_C of the configured form (detached); 0 when no erasure batch
    num_queries: int  # global
    num_passages: int  # global passages scored per query (the negative pool + 1)
    # mean |rho| of the global erasure batch (= ``erasure`` for the paper's form) and its expectation with no
    # language signal for the global N (lancer_dist.losses.erasure.null_abs_correlation); 0 / nan without erasure
    erasure_abs: float = 0.0
    erasure_floor: float = float("nan")


def group_positive_index(num_queries: int, group_size: int, offset: int, device: torch.device) -> Tensor:
    """Row of each query's positive when passages are laid out as [q0: pos, negs..., q1: pos, negs..., ...]."""
    return offset + torch.arange(num_queries, device=device) * group_size


def retrieval_loss(
    q: Tensor,
    p: Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
    gather_negatives: bool = True,
    collectives: Collectives | None = None,
) -> tuple[Tensor, Tensor, int, int]:
    """The distributed L_R term. Returns (rank loss to back-propagate, global L_R detached, B, pool size).

    ``q`` [B_r, D] and ``p`` [B_r * group_size, D] hold this rank's queries and their groups (positive first).
    """
    c = collectives or LocalCollectives()
    b_r = q.shape[0]
    if p.shape[0] != b_r * group_size:
        raise ValueError(
            f"retrieval_loss: {b_r} queries with group_size {group_size} need {b_r * group_size} passages, "
            f"got {p.shape[0]}"
        )
    if gather_negatives:
        p_all, offset = c.gather(p)
        pos = group_positive_index(b_r, group_size, offset, q.device)
    else:
        p_all, pos = p, group_positive_index(b_r, group_size, 0, q.device)
    loss_sum = contrastive_loss(q, p_all, pos, temperature=temperature, reduction="sum")
    counts = c.sum_no_grad(
        torch.tensor([float(b_r), float(p_all.shape[0])], dtype=torch.float64, device=q.device)
    )
    b_global = int(counts[0].item())
    if b_global == 0:
        raise ValueError("retrieval_loss: the global batch holds no queries")
    rank_loss = loss_sum * (c.world_size / b_global)
    global_value = c.sum_no_grad(loss_sum.detach().reshape(1))[0] / b_global
    return rank_loss, global_value, b_global, int(p_all.shape[0])


def lancer_loss(
    q: Tensor,
    p: Tensor,
    group_size: int,
    x: Tensor | None = None,
    languages: Tensor | None = None,
    num_languages: int = 0,
    *,
    temperature: float = 1.0,
    erasure_weight: float = 1.0,
    erasure_eps: float = 1e-8,
    erasure_form: str = "abs",
    gather_negatives: bool = True,
    collectives: Collectives | None = None,
) -> LossOutput:
    """L = L_R + erasure_weight * L_C over the global batch.

    Args:
        q: [B_r, D] this rank's query embeddings.
        p: [B_r * group_size, D] their passages, each group positive first, then hard negatives.
        group_size: 1 positive + (group_size - 1) hard negatives.
        x: [m_r, D] this rank's multilingual passage embeddings for the erasure task (None: no erasure term).
        languages: [m_r] their language ids (< num_languages).
        num_languages: n.
        temperature, erasure_weight, erasure_eps, erasure_form, gather_negatives: see ``lancer_dist.config``.
        collectives: the reduction hook; None = one process.
    """
    c = collectives or LocalCollectives()
    rank_lr, lr, b_global, pool = retrieval_loss(
        q, p, group_size, temperature=temperature, gather_negatives=gather_negatives, collectives=c
    )
    loss = rank_lr
    lc = torch.zeros((), dtype=lr.dtype, device=q.device)
    lc_abs, floor = 0.0, float("nan")
    if x is not None:
        if languages is None:
            raise ValueError("lancer_loss: erasure embeddings given without their language ids")
        if erasure_weight > 0:
            terms = erasure_terms(
                x, languages, num_languages, form=erasure_form, eps=erasure_eps, sum_fn=c.sum_with_grad
            )
            loss = loss + erasure_weight * terms.loss.to(x.dtype)
        else:  # lambda = 0 (the baseline): L_C is still measured and logged, without a gradient
            terms = erasure_terms(
                x.detach(), languages, num_languages, form=erasure_form, eps=erasure_eps, sum_fn=c.sum_no_grad
            )
        lc = terms.loss.detach().to(x.dtype).to(lr.dtype)
        lc_abs, floor = float(terms.mean_abs), terms.floor
    total = lr + erasure_weight * lc
    return LossOutput(
        loss=loss,
        total=total,
        retrieval=lr,
        erasure=lc,
        num_queries=b_global,
        num_passages=pool,
        erasure_abs=lc_abs,
        erasure_floor=floor,
    )

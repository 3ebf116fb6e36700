"""The multi-task objective L = L_R + lambda * L_C over the global batch (paper §3.4, Fig. 2).

The losses themselves stay pure; the distributed reduction comes in through a :class:`Collectives` object
(``lancer_dist.dist.ProcessGroupCollectives`` in training, :class:`LocalCollectives` - the default - in one
process). With N ranks each holding B_r queries (sum B_r = B) and m_r erasure passages:

* every rank gathers the passages of all ranks (in rank order) and scores its own queries against all of them;
* every rank's retrieval term is ``N * sum_{i in rank} l_i / B``: after the data-parallel gradient average over
  ranks this is exactly the gradient of the full-batch mean, whatever the per-rank batch sizes;
* the erasure term is computed from correlation statistics summed over ranks, identical on every rank;
* with document ids (``passage_doc_ids``), the ids travel with the gathered passages (``Collectives.gather_strings``)
  and every passage holding one of a query's positive documents, other than its positive column, is masked out of
  that query's softmax (:func:`lancer_dist.losses.retrieval.false_negative_mask`); the mask depends only on the
  global batch, so N ranks still equal one process. Passages with an empty id are never masked (and counted).

The returned ``retrieval`` / ``erasure`` / ``total`` fields are the global (full-batch) values, detached, for
logging; ``loss`` is what each rank calls ``backward()`` on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from lancer_dist.losses.erasure import erasure_terms
from lancer_dist.losses.retrieval import NO_DOC, contrastive_loss, false_negative_mask


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

    def gather_strings(self, xs: Sequence[str]) -> list[str]:
        """Concatenate string lists from all ranks in rank order (the order of :meth:`gather`)."""
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

    def gather_strings(self, xs: Sequence[str]) -> list[str]:
        return list(xs)


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
    negatives_masked: int = 0  # global (query, passage) pairs masked as false negatives
    passages_without_docid: int = (
        0  # global passages with an empty document id (never masked); -1: ids not given
    )


class RetrievalTerm(NamedTuple):
    loss: Tensor  # this rank's share to back-propagate
    value: Tensor  # global L_R, detached
    num_queries: int  # global B
    num_passages: int  # passages each query is scored against
    negatives_masked: int  # global masked (query, passage) pairs
    passages_without_docid: int  # global; -1 when no ids were given (no masking)


def group_positive_index(num_queries: int, group_size: int, offset: int, device: torch.device) -> Tensor:
    """Row of each query's positive when passages are laid out as [q0: pos, negs..., q1: pos, negs..., ...]."""
    return offset + torch.arange(num_queries, device=device) * group_size


def _doc_codes(
    doc_ids: Sequence[str], positive_ids: Sequence[Sequence[str]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Integer codes for string document ids: ``[P]`` for the passages, ``[B, K]`` for the queries' positives
    (padded with NO_DOC). Exact (a vocabulary, not a hash); the empty id is NO_DOC."""
    vocab: dict[str, int] = {}
    codes_P = [NO_DOC if not d else vocab.setdefault(d, len(vocab)) for d in doc_ids]
    k = max((len(ps) for ps in positive_ids), default=0)
    rows = [
        [vocab.get(d, NO_DOC) if d else NO_DOC for d in ps] + [NO_DOC] * (k - len(ps)) for ps in positive_ids
    ]
    return (
        torch.tensor(codes_P, dtype=torch.long, device=device),
        torch.tensor(rows, dtype=torch.long, device=device).reshape(len(positive_ids), k),
    )


def retrieval_loss(
    q: Tensor,
    p: Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
    gather_negatives: bool = True,
    collectives: Collectives | None = None,
    passage_doc_ids: Sequence[str] | None = None,
    query_positive_ids: Sequence[Sequence[str]] | None = None,
) -> RetrievalTerm:
    """The distributed L_R term.

    ``q`` [B_r, D] and ``p`` [B_r * group_size, D] hold this rank's queries and their groups (positive first).
    ``passage_doc_ids`` ([B_r * group_size] strings, "" = no id) turns on false-negative masking; each query's
    positive documents are ``query_positive_ids`` ([B_r] lists, e.g. every stored positive of the group), or by
    default the id of its positive passage.
    """
    c = collectives or LocalCollectives()
    b_r = q.shape[0]
    if p.shape[0] != b_r * group_size:
        raise ValueError(
            f"retrieval_loss: {b_r} queries with group_size {group_size} need {b_r * group_size} passages, "
            f"got {p.shape[0]}"
        )
    if passage_doc_ids is not None and len(passage_doc_ids) != p.shape[0]:
        raise ValueError(f"retrieval_loss: {p.shape[0]} passages but {len(passage_doc_ids)} document ids")
    if query_positive_ids is not None and len(query_positive_ids) != b_r:
        raise ValueError(f"retrieval_loss: {b_r} queries but {len(query_positive_ids)} positive-id lists")
    if gather_negatives:
        p_all, offset = c.gather(p)
    else:
        p_all, offset = p, 0
    pos = group_positive_index(b_r, group_size, offset, q.device)
    mask = None
    no_id = 0
    if passage_doc_ids is not None:
        ids_all = c.gather_strings(passage_doc_ids) if gather_negatives else list(passage_doc_ids)
        if len(ids_all) != p_all.shape[0]:
            raise ValueError(f"retrieval_loss: gathered {p_all.shape[0]} passages but {len(ids_all)} ids")
        positives = (
            query_positive_ids
            if query_positive_ids is not None
            else [[passage_doc_ids[i * group_size]] for i in range(b_r)]
        )
        doc_P, pos_BK = _doc_codes(ids_all, positives, q.device)
        mask = false_negative_mask(pos_BK, doc_P, pos)
        no_id = sum(1 for d in passage_doc_ids if not d)
    loss_sum = contrastive_loss(q, p_all, pos, temperature=temperature, reduction="sum", mask=mask)
    masked = int(mask.sum()) if mask is not None else 0
    counts = c.sum_no_grad(
        torch.tensor(
            [float(b_r), float(p_all.shape[0]), float(masked), float(no_id)],
            dtype=torch.float64,
            device=q.device,
        )
    )
    b_global = int(counts[0].item())
    if b_global == 0:
        raise ValueError("retrieval_loss: the global batch holds no queries")
    rank_loss = loss_sum * (c.world_size / b_global)
    global_value = c.sum_no_grad(loss_sum.detach().reshape(1))[0] / b_global
    return RetrievalTerm(
        rank_loss,
        global_value,
        b_global,
        int(p_all.shape[0]),
        int(counts[2].item()),
        int(counts[3].item()) if passage_doc_ids is not None else -1,
    )


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
    passage_doc_ids: Sequence[str] | None = None,
    query_positive_ids: Sequence[Sequence[str]] | None = None,
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
        passage_doc_ids, query_positive_ids: document ids for false-negative masking (see
            :func:`retrieval_loss`); None = no masking (the paper's loss).
    """
    c = collectives or LocalCollectives()
    term = retrieval_loss(
        q,
        p,
        group_size,
        temperature=temperature,
        gather_negatives=gather_negatives,
        collectives=c,
        passage_doc_ids=passage_doc_ids,
        query_positive_ids=query_positive_ids,
    )
    rank_lr, lr, b_global, pool = term.loss, term.value, term.num_queries, term.num_passages
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
        negatives_masked=term.negatives_masked,
        passages_without_docid=term.passages_without_docid,
    )

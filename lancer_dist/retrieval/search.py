"""``lancer search``: one FAISS index per embedding shard, shards searched in parallel (Ray), exact top-k merge.

Scores are inner products. Ranking order is total: score descending, then corpus position ascending, so results
are deterministic under ties. FAISS does not promise which of several tied documents it keeps at the k-th place,
so each shard asks for ``k + 1`` neighbours and, for the queries whose last returned score still ties their k-th,
doubles its request: each shard's list is then exactly its top-k in the total order, and the merge (a pure function) of per-shard top-k
lists is exactly the global top-k. For ``Flat`` indexes this equals brute force over the whole corpus.

Index types come from ``faiss.index_factory`` strings (``Flat``, ``IVF256,Flat``, ``HNSW32``, ``PQ16``,
``IVF256,PQ16`` ...), built per shard with ``METRIC_INNER_PRODUCT`` and trained on that shard's embeddings. With
faiss-gpu installed and a GPU visible, indexes are moved to the GPU (``index_cpu_to_all_gpus``); without faiss-gpu,
exact ``Flat`` search on a visible GPU runs :func:`exact_topk_torch` (a torch matmul + top-k, same total order).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.retrieval.posthoc import Affine
from lancer_dist.retrieval.store import EmbeddingStore

__all__ = [
    "SearchResult",
    "brute_force_topk",
    "build_index",
    "exact_topk_torch",
    "merge_topk",
    "search_arrays",
    "search_index_exact",
    "search_store",
    "sort_candidates",
]


def sort_candidates(scores_QC: np.ndarray, pos_QC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best candidates by (score desc, position asc); position -1 marks padding."""
    Q = scores_QC.shape[0]
    out_s = np.full((Q, k), -np.inf, dtype=np.float32)
    out_p = np.full((Q, k), -1, dtype=np.int64)
    for q in range(Q):
        valid = pos_QC[q] >= 0
        s, p = scores_QC[q][valid], pos_QC[q][valid]
        order = np.lexsort((p, -s))[:k]
        out_s[q, : len(order)] = s[order]
        out_p[q, : len(order)] = p[order]
    return out_s, out_p


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists ``(scores [Q, k_s], global positions [Q, k_s])`` into the global top-k."""
    if not parts:
        raise ValueError("merge_topk needs at least one shard result")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in parts], axis=1)
    pos = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in parts], axis=1)
    return sort_candidates(scores, pos, k)


def brute_force_topk(q_QD: np.ndarray, p_ND: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: numpy inner products over the whole corpus, same total order."""
    scores = np.asarray(q_QD, np.float32) @ np.asarray(p_ND, np.float32).T
    pos = np.broadcast_to(np.arange(p_ND.shape[0], dtype=np.int64), scores.shape)
    return sort_candidates(scores, pos, k)


def exact_topk_torch(
    q_QD: np.ndarray,
    p_ND: np.ndarray,
    k: int,
    offset: int = 0,
    *,
    device: Any = None,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k in the total order (score desc, position asc) with torch, on ``device`` (default:
    CUDA when visible, else the CPU): the same result as a FAISS ``Flat`` index searched by
    :func:`search_index_exact`, ties included. Positions are shifted by ``offset``; rows are padded with -inf / -1
    when ``k`` exceeds the corpus. Device-agnostic, so a CPU test proves the code that runs on the GPU."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    Q, n = q_QD.shape[0], p_ND.shape[0]
    out_s = np.full((Q, k), -np.inf, dtype=np.float32)
    out_p = np.full((Q, k), -1, dtype=np.int64)
    k_eff = min(k, n)
    if k_eff == 0 or Q == 0:
        return out_s, out_p
    p = torch.as_tensor(np.ascontiguousarray(p_ND, dtype=np.float32), device=dev)
    for start in range(0, Q, query_block):
        q = torch.as_tensor(
            np.ascontiguousarray(q_QD[start : start + query_block], dtype=np.float32), device=dev
        )
        s_BN = q @ p.T
        vals, idx = s_BN.topk(k_eff, dim=1)  # the k best scores; which of tied documents is unspecified
        kth = vals[:, -1:]
        # Rows where more documents tie the k-th score than fit: take the tied ones in position order.
        straddle = (s_BN >= kth).sum(dim=1) > k_eff
        for r in torch.nonzero(straddle).flatten().tolist():
            order = torch.sort(s_BN[r], descending=True, stable=True).indices[:k_eff]
            idx[r], vals[r] = order, s_BN[r, order]
        # Within the k, order by score desc then position asc: sort by position, then stably by score.
        by_pos = torch.sort(idx, dim=1).indices
        idx, vals = idx.gather(1, by_pos), vals.gather(1, by_pos)
        by_score = torch.sort(vals, dim=1, descending=True, stable=True).indices
        idx, vals = idx.gather(1, by_score), vals.gather(1, by_score)
        rows = slice(start, start + q.shape[0])
        out_s[rows, :k_eff] = vals.cpu().numpy()
        out_p[rows, :k_eff] = idx.cpu().numpy() + offset
    return out_s, out_p


def _torch_gpu_flat(factory: str) -> bool:
    """Exact search on the GPU with torch: a Flat index, a visible GPU, and no faiss-gpu to do it."""
    if factory != "Flat":
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return not _gpu_available()
    except ImportError:
        return True


def _gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def build_index(emb_ND: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None) -> Any:
    """A trained FAISS inner-product index holding ``emb_ND`` (rows get ids 0..n-1)."""
    import faiss

    x = np.ascontiguousarray(emb_ND, dtype=np.float32)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"eval.index_factory: {factory!r} is not a valid FAISS index_factory string ({e})"
        ) from e
    if not index.is_trained:
        try:
            index.train(x)
        except RuntimeError as e:
            raise ValueError(
                f"eval.index_factory: {factory!r} cannot be trained on a shard of {x.shape[0]} vectors "
                f"(IVF needs >= nlist, PQ >= 256 per sub-quantizer): {e}"
            ) from e
    if use_gpu is None:
        use_gpu = _gpu_available()
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def search_index_exact(
    index: Any, q_QD: np.ndarray, k: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one index in the total order (see module docstring); positions shifted by ``offset``."""
    n = int(index.ntotal)
    q = np.ascontiguousarray(q_QD, dtype=np.float32)
    k_eff = min(k, n)
    if k_eff == 0:
        return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
    ask = min(k_eff + 1, n)
    D, Id = index.search(q, ask)
    s_out, p_out = sort_candidates(D.astype(np.float32), _positions(Id, offset), k)

    def unresolved(D_: np.ndarray, Id_: np.ndarray, asked: int) -> np.ndarray:
        # A row is exact when its last returned score is strictly below its k-th (every document tied with the
        # k-th is inside the returned set), or when the index has no more documents to give.
        if asked >= n:
            return np.zeros(D_.shape[0], dtype=bool)
        return (D_[:, asked - 1] >= D_[:, k_eff - 1]) & (Id_[:, asked - 1] >= 0)

    rows = np.flatnonzero(unresolved(D, Id, ask))
    while rows.size:
        # Only the rows with a tie straddling the cut are searched again, with twice as many neighbours.
        ask = min(2 * ask, n)
        D2, I2 = index.search(np.ascontiguousarray(q[rows]), ask)
        s2, p2 = sort_candidates(D2.astype(np.float32), _positions(I2, offset), k)
        s_out[rows], p_out[rows] = s2, p2
        rows = rows[unresolved(D2, I2, ask)]
    return s_out, p_out


def _positions(Id: np.ndarray, offset: int) -> np.ndarray:
    return np.where(Id >= 0, Id.astype(np.int64) + offset, -1)


def _search_shard(
    store_path: str,
    shard: int,
    offset: int,
    q_QD: np.ndarray,
    k: int,
    factory: str,
    transform: Affine | None,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    emb, _, _ = EmbeddingStore(store_path).load_shard(shard)
    x = np.asarray(emb, dtype=np.float32)
    if transform is not None:
        x = transform(x)
    if _torch_gpu_flat(factory):
        s, p = exact_topk_torch(q_QD, x, k, offset)
        return s, p, time.perf_counter() - t0
    import faiss

    if threads > 0:
        faiss.omp_set_num_threads(threads)
    index = build_index(x, factory)
    s, p = search_index_exact(index, q_QD, k, offset)
    return s, p, time.perf_counter() - t0


@dataclass
class SearchResult:
    scores: np.ndarray  # [Q, k] float32, -inf padding
    positions: np.ndarray  # [Q, k] int64 corpus positions, -1 padding
    docids: list[list[str]]  # per query, best first (padding dropped)
    seconds: float

    def to_run(self, qids: Sequence[str]) -> dict[str, dict[str, float]]:
        return {
            qid: {d: float(s) for d, s in zip(docs, self.scores[i])}
            for i, (qid, docs) in enumerate(zip(qids, self.docids))
        }


def search_store(
    store_path: str | Path,
    q_QD: np.ndarray,
    k: int,
    factory: str = "Flat",
    *,
    transform: Affine | None = None,
    parallel: str = "ray",
    cpus_per_task: int = 1,
) -> SearchResult:
    """Search every shard of an :class:`EmbeddingStore` (``parallel``: "ray" tasks, or "none" in this process),
    applying ``transform`` (a post-hoc baseline) to passages (queries must already be transformed)."""
    t0 = time.perf_counter()
    store = EmbeddingStore(store_path)
    offsets = np.cumsum([0] + [s.get("rows", s["count"]) for s in store.manifest["shards"]])
    q = np.ascontiguousarray(q_QD, dtype=np.float32)
    if parallel == "ray":
        import ray

        from lancer_dist.retrieval.ray_utils import ensure_ray

        ensure_ray()
        if ray.available_resources().get("CPU", 0.0) < cpus_per_task:
            import sys

            print(
                f"[search] waiting for {cpus_per_task} free Ray CPU(s) per shard task (held by actors or other "
                "tasks; close idle EncoderPools first)",
                file=sys.stderr,
            )
        task = ray.remote(_search_shard).options(num_cpus=cpus_per_task)  # type: ignore[call-overload]
        q_ref = ray.put(q)
        t_ref = ray.put(transform)
        refs = [
            task.remote(str(store.path), i, int(offsets[i]), q_ref, k, factory, t_ref, cpus_per_task)
            for i in range(store.num_shards)
        ]
        results = ray.get(refs)
    elif parallel == "none":
        results = [
            _search_shard(str(store.path), i, int(offsets[i]), q, k, factory, transform, 0)
            for i in range(store.num_shards)
        ]
    else:
        raise ValueError(f"parallel must be 'ray' or 'none', got {parallel!r}")
    scores, pos = merge_topk([(s, p) for s, p, _ in results], k)
    all_ids = store.all_ids()
    docids = [[all_ids[p] for p in row if p >= 0] for row in pos]
    return SearchResult(scores, pos, docids, time.perf_counter() - t0)


def search_arrays(
    q_QD: np.ndarray, p_ND: np.ndarray, k: int, factory: str = "Flat"
) -> tuple[np.ndarray, np.ndarray]:
    """One index over an in-memory array (small pools, e.g. the pool-growth analysis)."""
    return search_index_exact(build_index(p_ND, factory), q_QD, k)

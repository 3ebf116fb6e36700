"""``lancer search``: exact or approximate search over the shards of an embedding store, exact top-k merge.

Scores are inner products. Ranking order is total: score descending, then corpus position ascending, so results
are deterministic under ties. FAISS does not promise which of several tied documents it keeps at the k-th place,
so each index is asked for ``k + 1`` neighbours and, for the queries whose last returned score still ties their k-th,
doubles its request: each list is then exactly its top-k in the total order, and the merge (a pure function) of
the lists is exactly the global top-k. For exact search this equals brute force over the whole corpus.

Exact search (``IndexConfig(kind="flat")`` / ``"Flat"``) memory-maps each shard block by block, so memory stays a
few blocks whatever the corpus size; blocks are searched by a thread pool, each by one matmul + top-k on the mapped
rows (:func:`exact_topk_torch`: no copy of a float32 block, no index; on the GPU when one is visible; torch releases
the GIL). ``kernel="faiss_knn"`` (``faiss.knn``) and ``"faiss_index"`` (an ``IndexFlatIP`` per block) are the
alternatives the benchmark measures. Approximate indexes (``IndexConfig`` ivf_flat / ivf_pq / hnsw, or any
``faiss.index_factory`` string) are built per shard with ``METRIC_INNER_PRODUCT``, trained on a random sample of
the shard, filled block by block; with ``refine_factor`` R each shard's ``k * R`` approximate candidates are
re-scored exactly against its memory-mapped vectors (:func:`rerank_exact`). Across nodes, groups of shards run as
Ray tasks (``parallel="ray"``). With faiss-gpu installed and a GPU visible, approximate shard indexes are moved to
the GPU (``index_cpu_to_all_gpus``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.retrieval.posthoc import Affine
from lancer_dist.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)

__all__ = [
    "SearchResult",
    "brute_force_topk",
    "build_index",
    "build_shard_index",
    "default_threads",
    "exact_topk_torch",
    "merge_topk",
    "rerank_exact",
    "search_arrays",
    "search_index_exact",
    "search_shards_local",
    "search_store",
    "sort_candidates",
    "topk_recall",
]


def sort_candidates(scores_QC: np.ndarray, pos_QC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best candidates by (score desc, position asc); position -1 marks padding."""
    pos_QC = np.asarray(pos_QC, dtype=np.int64)
    valid = pos_QC >= 0
    # Padding sorts after every real candidate: score -inf and the largest position.
    s = np.where(valid, np.asarray(scores_QC, dtype=np.float32), np.float32(-np.inf))
    p_key = np.where(valid, pos_QC, np.iinfo(np.int64).max)
    order = np.lexsort((p_key, -s), axis=-1)[:, :k]
    s_top = np.take_along_axis(s, order, axis=1)
    p_top = np.take_along_axis(p_key, order, axis=1)
    pad = p_top == np.iinfo(np.int64).max
    Q, got = s_top.shape
    out_s = np.full((Q, k), -np.inf, dtype=np.float32)
    out_p = np.full((Q, k), -1, dtype=np.int64)
    out_s[:, :got] = np.where(pad, np.float32(-np.inf), s_top)
    out_p[:, :got] = np.where(pad, -1, p_top)
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


IndexSpec = Any  # an ``IndexConfig`` (lancer_dist.config) or a ``faiss.index_factory`` string


def default_threads() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _is_flat(index: IndexSpec) -> bool:
    return (index.kind == "flat") if not isinstance(index, str) else index.strip() == "Flat"


def _shard_rows(path: Path) -> tuple[np.dtype, int, int, int]:
    """(dtype, rows, dim, byte offset of the data) of a C-order ``.npy`` file, read from its header only."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran or len(shape) != 2:
        raise ValueError(
            f"{path}: expected a C-order [rows, dim] array, got shape {shape} (fortran={fortran})"
        )
    return np.dtype(dtype), int(shape[0]), int(shape[1]), offset


def _read_block(path: Path, start: int, stop: int, transform: Affine | None) -> np.ndarray:
    """Rows ``[start, stop)`` of a shard as contiguous float32 through a memory map of just those rows; the map
    is closed on return, so resident memory stays one block whatever the corpus size."""
    dtype, _, dim, offset = _shard_rows(path)
    mm = np.memmap(
        path, dtype=dtype, mode="r", offset=offset + start * dim * dtype.itemsize, shape=(stop - start, dim)
    )
    x = np.array(mm, dtype=np.float32, order="C", copy=True)
    del mm
    return transform(x) if transform is not None else x


def _map_block(path: Path, start: int, stop: int, transform: Affine | None) -> np.ndarray:
    """Rows ``[start, stop)`` as float32, without a copy when the shard is float32 and nothing transforms it: a
    copy-on-write memory map of just those rows (writable, so torch takes it as is; nothing writes to it),
    unmapped when its last reference goes. Otherwise the converted copy of :func:`_read_block`."""
    dtype, _, dim, offset = _shard_rows(path)
    if dtype != np.float32 or transform is not None:
        return _read_block(path, start, stop, transform)
    return np.memmap(
        path, dtype=dtype, mode="c", offset=offset + start * dim * dtype.itemsize, shape=(stop - start, dim)
    )


KERNELS = ("torch", "faiss_knn", "faiss_index")  # how one exact block is searched (eval.search_kernel)


def _knn_exact(q_QD: np.ndarray, x_ND: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """``faiss.knn`` (FAISS's sgemm + heaps, no index) asked for ``k + 1``; the rows whose (k+1)-th score ties
    their k-th (a tie may straddle the cut) are redone by :func:`exact_topk_torch`, which resolves ties in
    position order."""
    import faiss

    n = x_ND.shape[0]
    k_eff = min(k, n)
    if k_eff == 0:
        return np.full((q_QD.shape[0], k), -np.inf, np.float32), np.full((q_QD.shape[0], k), -1, np.int64)
    ask = min(k_eff + 1, n)
    D, Id = faiss.knn(q_QD, x_ND, ask, metric=faiss.METRIC_INNER_PRODUCT)
    s_out, p_out = sort_candidates(D.astype(np.float32), _positions(Id, offset), k)
    if ask > k_eff:
        rows = np.flatnonzero(D[:, ask - 1] >= D[:, k_eff - 1])
        if rows.size:
            s_out[rows], p_out[rows] = exact_topk_torch(q_QD[rows], x_ND, k, offset, device="cpu")
    return s_out, p_out


def _search_flat_block(
    path: Path,
    start: int,
    stop: int,
    offset: int,
    q_QD: np.ndarray,
    k: int,
    transform: Affine | None,
    kernel: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one memory-mapped block in the total order, by ``kernel``: "torch" (one matmul + top-k on
    the mapped rows, no copy; on the GPU when one is visible), "faiss_knn" (``faiss.knn`` on the mapped rows, no
    index), or "faiss_index" (the block copied into an ``IndexFlatIP``: the earlier path, kept so the benchmark
    can compare). Each releases the GIL, so a thread pool searches blocks in parallel."""
    if kernel == "torch":
        return exact_topk_torch(q_QD, _map_block(path, start, stop, transform), k, offset + start)
    import faiss

    faiss.omp_set_num_threads(1)  # parallelism comes from the thread pool; one OpenMP thread per block search
    if kernel == "faiss_knn":
        return _knn_exact(q_QD, _map_block(path, start, stop, transform), k, offset + start)
    x = _read_block(path, start, stop, transform)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    del x
    return search_index_exact(index, q_QD, k, offset + start)


def build_shard_index(
    path: Path,
    index: IndexSpec,
    transform: Affine | None = None,
    block: int = 65536,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> Any:
    """An approximate FAISS index over one memory-mapped shard: quantizers trained on a random sample of
    ``index.train_sample`` rows, then every row added block by block (only the index itself is kept in memory)."""
    import faiss

    _, n, dim, _ = _shard_rows(path)
    factory = index if isinstance(index, str) else index.factory(dim)
    field = "eval.index_factory" if isinstance(index, str) else "eval.index"
    try:
        idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"{field}: {factory!r} is not a valid FAISS index_factory string ({e})") from e
    train_sample = 100000 if isinstance(index, str) else index.train_sample
    inner: Any = faiss.downcast_index(idx)
    if getattr(inner, "do_polysemous_training", False):
        # Polysemous codes (Hamming pre-filtering) are never used by these searches, and training them is ~10x
        # the cost of the PQ itself; FAISS turns it on by default for PQ indexes.
        inner.do_polysemous_training = False
    if not idx.is_trained:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        rows = (
            np.arange(n)
            if n <= train_sample
            else np.sort(np.random.default_rng(seed).choice(n, train_sample, replace=False))
        )
        x = np.array(mm[rows], dtype=np.float32, order="C")
        del mm
        x = transform(x) if transform is not None else x
        try:
            idx.train(x)
        except RuntimeError as e:
            raise ValueError(
                f"{field}: {factory!r} cannot be trained on {x.shape[0]} vectors of shard {path.name} "
                f"(IVF needs >= nlist, PQ >= 2**nbits per sub-quantizer): {e}"
            ) from e
        del x
    if not isinstance(index, str) and index.kind == "hnsw":
        inner.hnsw.efConstruction = index.ef_construction
    if use_gpu is None:
        use_gpu = _gpu_available()
    if use_gpu:
        idx = faiss.index_cpu_to_all_gpus(idx)
    for start in range(0, n, block):
        idx.add(_read_block(path, start, min(n, start + block), transform))
    if not isinstance(index, str):
        ps = faiss.GpuParameterSpace() if use_gpu else faiss.ParameterSpace()
        if index.kind in ("ivf_flat", "ivf_pq"):
            ps.set_index_parameter(idx, "nprobe", index.nprobe)
        elif index.kind == "hnsw":
            ps.set_index_parameter(idx, "efSearch", index.ef_search)
    return idx


def rerank_exact(
    path: Path,
    offset: int,
    q_QD: np.ndarray,
    cand_QC: np.ndarray,
    k: int,
    transform: Affine | None = None,
    max_rows: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate positions (global, ``offset`` = the shard's first position; -1 = padding) of one shard
    by exact float32 inner products with its memory-mapped vectors, and keep the best ``k`` of each row in the
    total order. Only the candidates' rows are read, for as many queries at a time as make ``max_rows`` candidate
    rows (at least one query), so memory is bounded by ``max_rows`` rows whatever the shard size."""
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    q = np.ascontiguousarray(q_QD, dtype=np.float32)
    cand = np.asarray(cand_QC, dtype=np.int64)
    out_s = np.full((q.shape[0], k), -np.inf, np.float32)
    out_p = np.full((q.shape[0], k), -1, np.int64)
    query_chunk = max(1, max_rows // max(1, cand.shape[1]))
    for a in range(0, q.shape[0], query_chunk):
        c = cand[a : a + query_chunk]
        valid = c >= 0
        rows, inv = np.unique(np.where(valid, c - offset, 0), return_inverse=True)
        x = np.asarray(mm[rows], dtype=np.float32)  # sorted rows: one pass over the file
        x = transform(x) if transform is not None else x
        s = np.einsum("qcd,qd->qc", x[inv.reshape(c.shape)], q[a : a + query_chunk])
        out_s[a : a + len(c)], out_p[a : a + len(c)] = sort_candidates(np.where(valid, s, -np.inf), c, k)
    del mm
    return out_s, out_p


def _search_approx_shard(
    path: Path,
    offset: int,
    q_QD: np.ndarray,
    k: int,
    index: IndexSpec,
    transform: Affine | None,
    block: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    faiss.omp_set_num_threads(1)
    idx = build_shard_index(path, index, transform, block, seed)
    refine = 0 if isinstance(index, str) else index.refine_factor
    if not refine:
        return search_index_exact(idx, q_QD, k, offset)
    _, cand = search_index_exact(idx, q_QD, k * refine, offset)
    return rerank_exact(path, offset, q_QD, cand, k, transform)


def search_shards_local(
    store_path: str | Path,
    shards: Sequence[int],
    offsets: Sequence[int],
    q_QD: np.ndarray,
    k: int,
    index: IndexSpec = "Flat",
    transform: Affine | None = None,
    threads: int = 0,
    block: int = 65536,
    seed: int = 0,
    kernel: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over some shards of a store in this process. Exact (``Flat``): every shard is cut into blocks of
    ``block`` memory-mapped rows and the blocks are searched by a pool of ``threads`` threads, each block by
    ``kernel`` (see :func:`_search_flat_block`; torch and FAISS release the GIL; one torch / OpenMP thread per
    block while the pool runs); approximate: one index per shard, shards built and searched in parallel. The
    per-block / per-shard top-k lists go through the exact merge. ``threads`` 0 = :func:`default_threads`; 1 =
    sequential in the calling thread (torch then keeps its own thread setting)."""
    if kernel not in KERNELS:
        raise ValueError(f"eval.search_kernel must be one of {KERNELS}, got {kernel!r}")
    from lancer_dist.retrieval.store import emb_path

    root = Path(store_path)
    q = np.ascontiguousarray(q_QD, dtype=np.float32)
    jobs: list[Callable[[], tuple[np.ndarray, np.ndarray]]] = []
    for shard, off in zip(shards, offsets):
        path = emb_path(root, shard)
        if _is_flat(index):
            n = _shard_rows(path)[1]
            for start in range(0, n, block):
                jobs.append(
                    partial(
                        _search_flat_block, path, start, min(n, start + block), off, q, k, transform, kernel
                    )
                )
        else:
            jobs.append(partial(_search_approx_shard, path, off, q, k, index, transform, block, seed + shard))
    if not jobs:
        return np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64)
    threads = threads or default_threads()
    if threads == 1 or len(jobs) == 1:
        parts = [job() for job in jobs]
    else:
        import torch

        # The pool is the parallelism: one intra-op thread per torch block search (a process-wide setting,
        # restored after).
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
                parts = list(pool.map(lambda job: job(), jobs))
        finally:
            torch.set_num_threads(torch_threads)
    return merge_topk(parts, k)


def _search_group_task(
    store_path: str,
    shards: list[int],
    offsets: list[int],
    q_QD: np.ndarray,
    k: int,
    index: IndexSpec,
    transform: Affine | None,
    threads: int,
    block: int,
    seed: int,
    kernel: str,
) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    s, p = search_shards_local(
        store_path, shards, offsets, q_QD, k, index, transform, threads, block, seed, kernel
    )
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
    factory: IndexSpec = "Flat",
    *,
    transform: Affine | None = None,
    parallel: str = "threads",
    threads: int = 0,
    cpus_per_task: int = 1,
    ray_tasks: int = 0,
    block: int = 65536,
    seed: int = 0,
    kernel: str = "torch",
) -> SearchResult:
    """Search every shard of an :class:`EmbeddingStore` with ``factory`` (an ``IndexConfig`` or a FAISS factory
    string), applying ``transform`` (a post-hoc baseline) to passages (queries must already be transformed).

    ``parallel``: "threads" (the default, measured fastest on one node: blocks / shards searched by a pool of
    ``threads`` threads, 0 = the CPUs of this process), "ray" (shards split into ``ray_tasks`` groups, 0 = one per
    alive Ray node, each group one task of ``cpus_per_task`` CPUs that searches its shards with that many threads;
    the queries are put in the object store once), or "none" (sequential: the reference). ``kernel``: how an
    exact block is searched (:func:`_search_flat_block`; "torch", the default, was measured fastest)."""
    t0 = time.perf_counter()
    store = EmbeddingStore(store_path)
    offsets = [int(o) for o in np.cumsum([0] + [s.get("rows", s["count"]) for s in store.manifest["shards"]])]
    q = np.ascontiguousarray(q_QD, dtype=np.float32)
    shards = list(range(store.num_shards))
    if parallel == "ray":
        import ray

        from lancer_dist.retrieval.ray_utils import ensure_ray

        ensure_ray()
        n_groups = ray_tasks or sum(1 for n in ray.nodes() if n.get("Alive"))
        groups = [
            g.tolist() for g in np.array_split(np.asarray(shards, dtype=np.int64), max(1, n_groups)) if len(g)
        ]
        if ray.available_resources().get("CPU", 0.0) < cpus_per_task:
            log.warning(
                "waiting for %s free Ray CPU(s) per shard task (held by actors or other tasks; close idle "
                "EncoderPools first)",
                cpus_per_task,
            )
        group_task: Any = _search_group_task  # Ray's stubs type remote functions of at most 10 arguments
        task = ray.remote(group_task).options(num_cpus=cpus_per_task, scheduling_strategy="SPREAD")
        q_ref = ray.put(q)
        t_ref = ray.put(transform)
        refs = [
            task.remote(
                str(store.path),
                g,
                [offsets[i] for i in g],
                q_ref,
                k,
                factory,
                t_ref,
                cpus_per_task,
                block,
                seed,
                kernel,
            )
            for g in groups
        ]
        parts = [(s, p) for s, p, _ in ray.get(refs)]
        scores, pos = merge_topk(parts, k) if parts else search_shards_local(store.path, [], [], q, k)
    elif parallel in ("threads", "none"):
        scores, pos = search_shards_local(
            store.path,
            shards,
            offsets[:-1],
            q,
            k,
            factory,
            transform,
            threads if parallel == "threads" else 1,
            block,
            seed,
            kernel,
        )
    else:
        raise ValueError(f"parallel must be 'threads', 'ray' or 'none', got {parallel!r}")
    all_ids = store.all_ids()
    docids = [[all_ids[p] for p in row if p >= 0] for row in pos]
    return SearchResult(scores, pos, docids, time.perf_counter() - t0)


def topk_recall(approx_QK: np.ndarray, exact_QK: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / |exact top-k| (positions; -1 = padding)."""
    vals = []
    for a, e in zip(approx_QK, exact_QK):
        e_set = set(e[e >= 0].tolist())
        if e_set:
            vals.append(len(e_set & set(a[a >= 0].tolist())) / len(e_set))
    return float(np.mean(vals)) if vals else float("nan")


def search_arrays(
    q_QD: np.ndarray, p_ND: np.ndarray, k: int, factory: str = "Flat"
) -> tuple[np.ndarray, np.ndarray]:
    """One index over an in-memory array (small pools, e.g. the pool-growth analysis)."""
    return search_index_exact(build_index(p_ND, factory), q_QD, k)

"""Sharded FAISS search + exact merge == brute force top-k over the whole corpus (ties included)."""

from __future__ import annotations

import numpy as np
import pytest

from lancer_dist.retrieval.posthoc import Affine
from lancer_dist.retrieval.search import (
    brute_force_topk,
    build_index,
    merge_topk,
    search_index_exact,
    search_store,
    sort_candidates,
)
from lancer_dist.retrieval.store import EmbeddingStore, write_store


def _integer_data(seed: int, n: int = 300, q: int = 25, d: int = 6):
    """Small-integer vectors: every inner product is exact in float32 and ties are plentiful."""
    rng = np.random.default_rng(seed)
    p = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    qs = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
    return qs, p


@pytest.mark.parametrize("shard_size", [1000, 64, 37, 5])
def test_sharded_flat_equals_brute_force_with_ties(tmp_path, shard_size):
    q, p = _integer_data(0)
    k = 20
    ref_s, ref_p = brute_force_topk(q, p, k)
    # The data must actually contain ties straddling the cut, or the test proves nothing.
    full = q @ p.T
    kth = ref_s[:, k - 1 : k]
    assert np.any(((full == kth).sum(1)) > ((ref_s == kth).sum(1))), "no tie straddles the k-th place"
    ids = [f"doc{i}" for i in range(len(p))]
    write_store(tmp_path, p, ids, shard_size=shard_size)
    res = search_store(tmp_path, q, k, "Flat", parallel="none")
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_array_equal(res.scores, ref_s)
    assert res.docids[0] == [ids[i] for i in ref_p[0]]


def test_random_float_data_matches_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(30, 16)).astype(np.float32)
    ref_s, ref_p = brute_force_topk(q, p, 10)
    write_store(tmp_path, p, [str(i) for i in range(500)], shard_size=120)
    res = search_store(tmp_path, q, 10, "Flat", parallel="none")
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_allclose(res.scores, ref_s, rtol=1e-5)


def test_merge_is_pure_and_pads():
    a = (np.array([[3.0, 1.0]]), np.array([[5, 2]]))
    b = (np.array([[3.0, -np.inf]]), np.array([[1, -1]]))
    s, p = merge_topk([a, b], 3)
    assert p.tolist() == [[1, 5, 2]] and s.tolist() == [[3.0, 3.0, 1.0]]
    s, p = merge_topk([b], 3)
    assert p.tolist() == [[1, -1, -1]]
    s, p = sort_candidates(np.array([[1.0, 2.0, 2.0]]), np.array([[0, 9, 4]]), 2)
    assert p.tolist() == [[4, 9]]


def test_k_larger_than_shard(tmp_path):
    q, p = _integer_data(2, n=10, q=3)
    write_store(tmp_path, p, [str(i) for i in range(10)], shard_size=3)
    res = search_store(tmp_path, q, 15, parallel="none")
    _ref_s, ref_p = brute_force_topk(q, p, 15)
    np.testing.assert_array_equal(res.positions, ref_p)
    assert (res.positions[:, 10:] == -1).all() and len(res.docids[0]) == 10


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW16", "PQ4x4", "IVF4,PQ4x4"])
def test_approximate_indexes_run_and_recall(factory):
    rng = np.random.default_rng(3)
    p = rng.normal(size=(600, 16)).astype(np.float32)
    q = p[:40] + 0.01 * rng.normal(size=(40, 16)).astype(
        np.float32
    )  # each query's nearest neighbour is known
    index = build_index(p, factory)
    if hasattr(index, "nprobe"):
        index.nprobe = 4
    _, pos = search_index_exact(index, q, 5)
    recall = np.mean([i in row for i, row in enumerate(pos)])
    assert recall >= 0.6, (factory, recall)


def test_bad_factory_names_the_field():
    with pytest.raises(ValueError, match=r"eval\.index_factory"):
        build_index(np.zeros((10, 4), np.float32), "NotAnIndex")
    with pytest.raises(ValueError, match="cannot be trained"):
        build_index(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), "IVF64,Flat")


def test_transform_applied_inside_shards(tmp_path):
    q, p = _integer_data(4, n=50, q=5)
    t = Affine(np.diag([1.0, 0, 1, 0, 1, 0]), np.zeros(6), "mask")
    write_store(tmp_path, p, [str(i) for i in range(50)], shard_size=16)
    res = search_store(tmp_path, t(q), 7, transform=t, parallel="none")
    _ref_s, ref_p = brute_force_topk(t(q), t(p), 7)
    np.testing.assert_array_equal(res.positions, ref_p)
    assert EmbeddingStore(tmp_path).num_shards == 4


class _CountingIndex:
    """Wraps a FAISS index and records the (rows, k) of each search call."""

    def __init__(self, index):
        self.index, self.calls = index, []
        self.ntotal = index.ntotal

    def search(self, q, k):
        self.calls.append((q.shape[0], k))
        return self.index.search(q, k)


def test_tie_expansion_is_bounded():
    rng = np.random.default_rng(5)
    p = rng.normal(size=(2000, 8)).astype(np.float32)
    q = rng.normal(size=(50, 8)).astype(np.float32)
    idx = _CountingIndex(build_index(p, "Flat"))
    search_index_exact(idx, q, 10)
    assert idx.calls == [(50, 11)]  # no ties: one search of k + 1
    # One query whose 9th..14th scores tie (straddling the 10th place): only that row is searched again.
    p2 = np.zeros((100, 2), np.float32)
    p2[:8, 0] = np.arange(100, 92, -1)
    p2[8:14, 0] = 50.0
    p2[14:, 0] = -np.arange(86)
    p2[:, 1] = np.arange(100)  # the second query's scores are all distinct
    q2 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    idx2 = _CountingIndex(build_index(p2, "Flat"))
    _, pos = search_index_exact(idx2, q2, 10)
    assert idx2.calls == [(2, 11), (1, 22)]
    np.testing.assert_array_equal(pos, brute_force_topk(q2, p2, 10)[1])
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # ties broken by corpus position


# ---------------------------------------------------------------------------------------------------- at scale


KERNELS = ["torch", "faiss_knn", "faiss_index"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("shard_size", "block", "threads"), [(1000, 7, 2), (64, 16, 2), (37, 1000, 3), (300, 50, 1)]
)
def test_threaded_blocked_search_equals_brute_force_with_ties(tmp_path, shard_size, block, threads, kernel):
    """The default path: memory-mapped shards cut into blocks, searched by a thread pool, exact merge; each
    block kernel (torch matmul + top-k, faiss.knn, an IndexFlatIP per block)."""
    q, p = _integer_data(5)
    k = 20
    ref_s, ref_p = brute_force_topk(q, p, k)
    full = q @ p.T
    kth = ref_s[:, k - 1 : k]
    assert np.any(((full == kth).sum(1)) > ((ref_s == kth).sum(1))), "no tie straddles the k-th place"
    write_store(tmp_path, p, [f"doc{i}" for i in range(len(p))], shard_size=shard_size)
    res = search_store(tmp_path, q, k, parallel="threads", threads=threads, block=block, kernel=kernel)
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_array_equal(res.scores, ref_s)


def _numpy_topk_ties(q: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent of the package: float64 inner products (exact on small integers), each row ordered by a
    Python sort on (-score, position)."""
    full = q.astype(np.float64) @ p.astype(np.float64).T
    pos = np.array([sorted(range(p.shape[0]), key=lambda j, r=r: (-r[j], j))[:k] for r in full], np.int64)
    return np.take_along_axis(full, pos, axis=1).astype(np.float32), pos


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("dtype", "shard_size", "block"), [("float32", 1000, 1000), ("float16", 256, 37)])
def test_blocked_kernels_equal_numpy_reference_with_ties(tmp_path, kernel, dtype, shard_size, block):
    """Each block kernel, on the default threaded path, against a numpy/Python reference; values in {-1, 0, 1}
    make most scores tie, so the k-th place falls inside a tie group in most rows. With one block, the block's
    own cut is the global one: neither torch.topk nor faiss.knn returns the lowest positions of a tie (measured),
    so this fails unless the kernel resolves straddling ties itself."""
    rng = np.random.default_rng(11)
    p = rng.integers(-1, 2, size=(700, 5)).astype(np.float32)
    q = rng.integers(-1, 2, size=(40, 5)).astype(np.float32)
    k = 30
    ref_s, ref_p = _numpy_topk_ties(q, p, k)
    full = q @ p.T
    straddles = ((full >= ref_s[:, -1:]).sum(1) > k).mean()
    assert straddles > 0.5, straddles  # ties at the cut in most rows, or the test shows nothing
    write_store(tmp_path, p.astype(dtype), [str(i) for i in range(len(p))], shard_size=shard_size)
    res = search_store(tmp_path, q, k, threads=2, block=block, kernel=kernel)
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_array_equal(res.scores, ref_s)


def test_unknown_kernel_is_refused(tmp_path):
    q, p = _integer_data(12, n=20, q=2)
    write_store(tmp_path, p, [str(i) for i in range(20)], shard_size=10)
    with pytest.raises(ValueError, match="search_kernel"):
        search_store(tmp_path, q, 3, kernel="gemm")


def test_float32_blocks_are_mapped_not_copied(tmp_path):
    """The torch / faiss.knn kernels read a float32 block in place (a map of the file), a float16 one converted."""
    from lancer_dist.retrieval.search import _map_block
    from lancer_dist.retrieval.store import emb_path

    p = np.arange(60, dtype=np.float32).reshape(12, 5)
    write_store(tmp_path / "f32", p, [str(i) for i in range(12)], shard_size=12)
    x = _map_block(emb_path(tmp_path / "f32", 0), 4, 9, None)
    assert isinstance(x, np.memmap) and x.dtype == np.float32
    np.testing.assert_array_equal(x, p[4:9])
    write_store(tmp_path / "f16", p.astype(np.float16), [str(i) for i in range(12)], shard_size=12)
    y = _map_block(emb_path(tmp_path / "f16", 0), 4, 9, None)
    assert not isinstance(y, np.memmap) and y.dtype == np.float32
    np.testing.assert_array_equal(y, p[4:9])


def test_float16_store_exact_on_representable_data(tmp_path):
    """Small integers are exact in float16: the fp16 store's ranking (ties included) equals fp32 brute force."""
    q, p = _integer_data(6)
    write_store(tmp_path, p.astype(np.float16), [str(i) for i in range(len(p))], shard_size=70)
    assert EmbeddingStore(tmp_path).load_shard(0)[0].dtype == np.float16
    res = search_store(tmp_path, q, 15, threads=2, block=32)
    ref_s, ref_p = brute_force_topk(q, p, 15)
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_array_equal(res.scores, ref_s)


def test_float16_store_within_rounding_of_float32(tmp_path):
    rng = np.random.default_rng(7)
    p = rng.normal(size=(800, 32)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    q = rng.normal(size=(20, 32)).astype(np.float32)
    write_store(tmp_path, p.astype(np.float16), [str(i) for i in range(len(p))], shard_size=300)
    res = search_store(tmp_path, q, 10, threads=2, block=128)
    # Exactly the ranking of the fp16-rounded vectors...
    p16 = p.astype(np.float16).astype(np.float32)
    ref16_s, ref16_p = brute_force_topk(q, p16, 10)
    np.testing.assert_array_equal(res.positions, ref16_p)
    np.testing.assert_allclose(res.scores, ref16_s, rtol=1e-5, atol=1e-6)
    # ... whose scores differ from the fp32 ones by at most |q| * |p - fp16(p)| (Cauchy-Schwarz).
    full32 = q @ p.T
    bound = np.linalg.norm(q, axis=1, keepdims=True) * np.linalg.norm(p - p16, axis=1)[res.positions]
    got32 = np.take_along_axis(full32, res.positions, axis=1)
    assert np.all(np.abs(res.scores - got32) <= bound + 1e-6)


def _clustered(seed: int, n: int = 4000, d: int = 16, nq: int = 30):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d))
    p = (centers[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    q = (p[rng.choice(n, nq, replace=False)] + 0.1 * rng.normal(size=(nq, d))).astype(np.float32)
    return q, p


def _numpy_recall(approx_pos: np.ndarray, q: np.ndarray, p: np.ndarray, k: int) -> float:
    """Independent: exact top-k by argsort of numpy inner products, overlap counted with np.isin."""
    exact = np.argsort(-(q.astype(np.float64) @ p.T.astype(np.float64)), axis=1, kind="stable")[:, :k]
    return float(np.mean([np.isin(exact[i], approx_pos[i]).sum() / k for i in range(len(q))]))


def test_ivf_flat_params_are_applied_and_recall_matches_numpy(tmp_path):
    from lancer_dist.config import IndexConfig
    from lancer_dist.retrieval.search import topk_recall

    q, p = _clustered(8)
    k = 20
    write_store(tmp_path, p, [str(i) for i in range(len(p))], shard_size=2000)
    exact = search_store(tmp_path, q, k, threads=2)
    # Every cell probed: IVF-Flat is exact search.
    full = search_store(tmp_path, q, k, IndexConfig(kind="ivf_flat", nlist=16, nprobe=16, train_sample=1000))
    assert topk_recall(full.positions, exact.positions) == 1.0
    one = search_store(tmp_path, q, k, IndexConfig(kind="ivf_flat", nlist=16, nprobe=1, train_sample=1000))
    r = topk_recall(one.positions, exact.positions)
    assert r < 1.0, "nprobe=1 of 16 cells should lose some neighbours (nprobe not applied?)"
    assert r == pytest.approx(_numpy_recall(one.positions, q, p, k), abs=1e-12)


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [("ivf_pq", {"nprobe": 1}, {"nprobe": 16}), ("hnsw", {"ef_search": 1}, {"ef_search": 400})],
)
def test_approximate_recall_against_exact(tmp_path, kind, low, high):
    from lancer_dist.config import IndexConfig
    from lancer_dist.retrieval.search import topk_recall

    q, p = _clustered(9)
    k = 20
    write_store(tmp_path, p, [str(i) for i in range(len(p))], shard_size=2000)
    exact = search_store(tmp_path, q, k)
    base = {"nlist": 16, "pq_m": 4, "pq_nbits": 6, "hnsw_m": 8, "train_sample": 1500}
    lo = search_store(tmp_path, q, k, IndexConfig(kind=kind, **{**base, **low}))
    hi = search_store(tmp_path, q, k, IndexConfig(kind=kind, **{**base, **high}))
    r_lo, r_hi = topk_recall(lo.positions, exact.positions), topk_recall(hi.positions, exact.positions)
    assert r_lo == pytest.approx(_numpy_recall(lo.positions, q, p, k), abs=1e-12)
    assert r_hi == pytest.approx(_numpy_recall(hi.positions, q, p, k), abs=1e-12)
    assert r_hi > r_lo and r_hi >= 0.5, (r_lo, r_hi)


def test_topk_recall_by_hand():
    from lancer_dist.retrieval.search import topk_recall

    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[4, 9, 1, 8], [6, 5, 7, -1]])
    assert topk_recall(approx, exact) == pytest.approx((2 / 4 + 2 / 2) / 2)


def test_untrainable_index_names_the_field(tmp_path):
    from lancer_dist.config import IndexConfig

    write_store(tmp_path, np.ones((50, 8), np.float32), [str(i) for i in range(50)], shard_size=50)
    with pytest.raises(ValueError, match=r"eval\.index.*cannot be trained on 50 vectors"):
        search_store(
            tmp_path, np.ones((2, 8), np.float32), 3, IndexConfig(kind="ivf_flat", nlist=64, nprobe=4)
        )
    with pytest.raises(ValueError, match=r"eval\.index\.pq_m"):
        search_store(tmp_path, np.ones((2, 8), np.float32), 3, IndexConfig(kind="ivf_pq", nlist=2, pq_m=3))


def test_eval_index_recall_on_a_query_sample(tmp_path):
    """What ``lancer eval`` logs: recall@top_k of the approximate run on ``recall_queries`` sampled queries."""
    from lancer_dist.config import EvalConfig, IndexConfig
    from lancer_dist.retrieval.evaluate import index_recall

    q, p = _clustered(10)
    write_store(tmp_path, p, [str(i) for i in range(len(p))], shard_size=1500)
    ev = EvalConfig(top_k=20, index=IndexConfig(kind="ivf_flat", nlist=16, nprobe=1, recall_queries=12))
    sr = search_store(tmp_path, q, ev.top_k, ev.index_spec())
    got = index_recall(tmp_path, q, sr, ev, None)
    rows = np.sort(np.random.default_rng(ev.seed).choice(len(q), 12, replace=False))
    assert got == pytest.approx(_numpy_recall(sr.positions[rows], q[rows], p, 20), abs=1e-12)
    assert got is not None and got < 1.0
    assert index_recall(tmp_path, q, sr, EvalConfig(top_k=20), None) is None  # exact index: nothing to report


# ------------------------------------------------------------------------------------ exact re-ranking (refine)


def test_rerank_exact_equals_numpy_over_the_candidates(tmp_path):
    """Re-scoring arbitrary candidate lists (padding included) = the top-k of those candidates by numpy, ties by
    position; positions are global (the shard starts at ``offset``)."""
    from lancer_dist.retrieval.search import rerank_exact
    from lancer_dist.retrieval.store import emb_path

    rng = np.random.default_rng(13)
    p = rng.integers(-1, 2, size=(400, 6)).astype(np.float32)
    q = rng.integers(-1, 2, size=(50, 6)).astype(np.float32)
    write_store(tmp_path, p, [str(i) for i in range(400)], shard_size=400)
    offset, k, C = 1000, 7, 40
    cand = np.stack([rng.choice(400, C, replace=False) for _ in range(50)]) + offset
    cand[::5, -3:] = -1  # padding in some rows
    s, pos = rerank_exact(emb_path(tmp_path, 0), offset, q, cand, k, max_rows=16 * C)
    for i in range(50):
        c = [int(x) for x in cand[i] if x >= 0]
        want = sorted(c, key=lambda j: (-float(q[i] @ p[j - offset]), j))[:k]
        assert pos[i].tolist() == want
        np.testing.assert_array_equal(s[i], [q[i] @ p[j - offset] for j in want])
    assert len({tuple(r) for r in pos}) > 1


def test_ivf_pq_refined_over_every_candidate_is_exact(tmp_path):
    """Every cell probed and k * refine_factor >= shard size: re-ranking sees the whole shard, so the result is
    brute force, ties included; without re-ranking, PQ codes on the same data are not."""
    from lancer_dist.config import IndexConfig

    q, p = _integer_data(14, n=600, q=20, d=8)
    k = 10
    write_store(tmp_path, p, [str(i) for i in range(600)], shard_size=300)
    base = {"kind": "ivf_pq", "nlist": 4, "nprobe": 4, "pq_m": 2, "pq_nbits": 4, "train_sample": 300}
    refined = search_store(tmp_path, q, k, IndexConfig(**base, refine_factor=30))
    ref_s, ref_p = brute_force_topk(q, p, k)
    np.testing.assert_array_equal(refined.positions, ref_p)
    np.testing.assert_array_equal(refined.scores, ref_s)
    plain = search_store(tmp_path, q, k, IndexConfig(**base))
    assert not np.array_equal(plain.positions, ref_p)


def test_refine_raises_ivf_pq_recall(tmp_path):
    from lancer_dist.config import IndexConfig
    from lancer_dist.retrieval.search import topk_recall

    q, p = _clustered(15)
    k = 20
    write_store(tmp_path, p, [str(i) for i in range(len(p))], shard_size=2000)
    exact = search_store(tmp_path, q, k)
    base = {"kind": "ivf_pq", "nlist": 16, "nprobe": 8, "pq_m": 4, "pq_nbits": 4, "train_sample": 1500}
    r0 = topk_recall(search_store(tmp_path, q, k, IndexConfig(**base)).positions, exact.positions)
    refined = search_store(tmp_path, q, k, IndexConfig(**base, refine_factor=8))
    r8 = topk_recall(refined.positions, exact.positions)
    assert r8 == pytest.approx(_numpy_recall(refined.positions, q, p, k), abs=1e-12)
    assert r8 > r0 + 0.2, (r0, r8)


def test_eval_table_prints_fractions_as_percent_and_ratios_as_they_are() -> None:
    from lancer_dist.retrieval.evaluate import format_table

    rows = [{"method": "base", "pool nDCG@10": 0.1234, "probe acc": 0.995, "L_C / floor": 2.7231}]
    header, _sep, row = format_table(rows).splitlines()
    assert header == "| method | pool nDCG@10 | probe acc | L_C / floor |"
    # the ratio 2.72 was printed as 272.3 (x100 like a fraction) in the quickstart's table
    assert row == "| base | 12.3 | 99.5 | 2.72 |"

"""The device-agnostic torch exact search equals the FAISS Flat index (and numpy brute force), ties included.

The same function runs on CUDA when a GPU is visible (benchmarks/gpu/check.py compares it there); on the CPU this
test proves its order rule. Integer-valued embeddings make the inner products exact in float32 whatever the
summation order, so ties are real ties and the results must be identical, not merely close."""

from __future__ import annotations

import numpy as np
import pytest

from lancer_dist.retrieval.search import brute_force_topk, exact_topk_torch


def _tied(q: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # values in {-1, 0, 1}: many documents share a score, and many ties straddle the k-th place
    return rng.integers(-1, 2, (q, d)).astype(np.float32), rng.integers(-1, 2, (n, d)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 17, 300])
def test_equals_faiss_flat_with_ties(k):
    pytest.importorskip("faiss")
    from lancer_dist.retrieval.search import build_index, search_index_exact

    q, p = _tied(40, 200, 6, 0)
    s_t, p_t = exact_topk_torch(q, p, k, offset=1000, device="cpu", query_block=16)
    s_f, p_f = search_index_exact(build_index(p, "Flat", use_gpu=False), q, k, offset=1000)
    np.testing.assert_array_equal(p_t, p_f)
    np.testing.assert_array_equal(s_t, s_f)
    # there were ties at the cut, and they went to the lowest positions
    if k < 200:
        full = q @ p.T
        kth = np.sort(full, axis=1)[:, ::-1][:, k - 1]
        assert ((full == kth[:, None]).sum(1) > 1).any()
    if k > 200:
        assert (p_t[:, 200:] == -1).all() and np.isneginf(s_t[:, 200:]).all()


def test_equals_brute_force_on_random_floats():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((33, 16)).astype(np.float32)
    p = rng.standard_normal((500, 16)).astype(np.float32)
    s_t, p_t = exact_topk_torch(q, p, 10, device="cpu")
    s_b, p_b = brute_force_topk(q, p, 10)
    np.testing.assert_array_equal(p_t, p_b)
    np.testing.assert_allclose(s_t, s_b, rtol=0, atol=1e-5)


def test_tie_order_is_position_ascending():
    q = np.ones((1, 2), np.float32)
    p = np.array([[0, 1], [1, 0], [2, 0], [0.5, 0.5], [1, 0]], np.float32)  # scores 1, 1, 2, 1, 1
    s, pos = exact_topk_torch(q, p, 3, device="cpu")
    assert pos.tolist() == [[2, 0, 1]] and s.tolist() == [[2.0, 1.0, 1.0]]
    _, pos = exact_topk_torch(q, p, 0, device="cpu")
    assert pos.shape == (1, 0)

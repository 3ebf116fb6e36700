"""Sharded search as Ray tasks (groups of shards per task, queries put once) == numpy brute force, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from lancer_dist.retrieval.search import brute_force_topk, search_store
from lancer_dist.retrieval.store import write_store


@pytest.mark.parametrize(("ray_tasks", "shard_size", "block"), [(2, 40, 16), (3, 23, 1000), (0, 100, 30)])
def test_ray_grouped_search_equals_brute_force_with_ties(ray_env, tmp_path, ray_tasks, shard_size, block):
    rng = np.random.default_rng(ray_tasks)
    p = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)  # exact inner products, many ties
    q = rng.integers(-2, 3, size=(25, 6)).astype(np.float32)
    k = 20
    ref_s, ref_p = brute_force_topk(q, p, k)
    kth = ref_s[:, k - 1 : k]
    assert np.any(((q @ p.T == kth).sum(1)) > ((ref_s == kth).sum(1))), "no tie straddles the k-th place"
    write_store(tmp_path, p.astype(np.float16), [f"d{i}" for i in range(300)], shard_size=shard_size)
    res = search_store(tmp_path, q, k, parallel="ray", ray_tasks=ray_tasks, cpus_per_task=1, block=block)
    np.testing.assert_array_equal(res.positions, ref_p)
    np.testing.assert_array_equal(res.scores, ref_s)
    assert res.docids[3] == [f"d{i}" for i in ref_p[3]]

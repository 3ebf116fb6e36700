"""benchmarks/paired_ndcg.py, the per-query comparison behind docs/science.md's significance figures: its p-value
against scipy's exact paired permutation test, its per-query nDCG@10 against a hand computation, and the script end
to end on real TREC files (its mean difference equals the difference of the aggregate nDCG@10s)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shift", [0.0, 0.3, 0.8])
def test_randomisation_p_matches_scipys_exact_test(shift):
    from scipy.stats import permutation_test

    d = np.random.default_rng(1).normal(shift, 1.0, size=12)
    exact = permutation_test(
        (d,), np.mean, permutation_type="samples", alternative="two-sided", n_resamples=np.inf
    ).pvalue
    p = load_benchmark("paired_ndcg").paired_randomisation_p(d, draws=40000, seed=3)
    # Monte Carlo with 40000 draws: standard error <= 0.0025
    assert p == pytest.approx(exact, abs=0.012), (p, exact)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    m = load_benchmark("paired_ndcg")
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 1, 50), rng.normal(0.5, 1, 2000)
    lo_s, hi_s = m.bootstrap_interval(small)
    lo_l, hi_l = m.bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # width ~ 2 x 1.96 x sd / sqrt(n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * large.std() / math.sqrt(large.size), rel=0.1)
    assert hi_s - lo_s > 4 * (hi_l - lo_l)


def _write(tmp_path: Path):
    pool = tmp_path / "coll" / "pool" / "qrels"
    pool.mkdir(parents=True)
    (pool / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
    runs = tmp_path / "runs"
    for method, ranking in {
        "lancer": {"q1": ["d1", "x"], "q2": ["x", "d2"], "q3": ["d3"]},
        "base": {"q1": ["x", "y", "d1"], "q2": ["d2"]},  # q3 missing: scores 0
    }.items():
        (runs / method).mkdir(parents=True)
        lines = [
            f"{q} Q0 {doc} {r + 1} {10 - r} {method}"
            for q, docs in ranking.items()
            for r, doc in enumerate(docs)
        ]
        (runs / method / "pool.trec").write_text("\n".join(lines) + "\n")
    return runs, tmp_path / "coll"


def test_per_query_ndcg_by_hand_and_the_script_end_to_end(tmp_path):
    runs, coll = _write(tmp_path)
    m = load_benchmark("paired_ndcg")
    qrels = coll / "pool" / "qrels" / "test.tsv"
    lan = m.per_query_ndcg10(runs / "lancer" / "pool.trec", qrels)
    base = m.per_query_ndcg10(runs / "base" / "pool.trec", qrels)
    # one relevant document: nDCG@10 = 1 / log2(rank + 1)
    assert lan == pytest.approx({"q1": 1.0, "q2": 1 / math.log2(3), "q3": 1.0})
    assert base == pytest.approx({"q1": 0.5, "q2": 1.0, "q3": 0.0})  # a query the run misses scores 0
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "paired_ndcg.py"),
            str(runs),
            str(coll),
            "--pools",
            "pool",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("| pool | base |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    diff = (1.0 + 1 / math.log2(3) + 1.0 - 0.5 - 1.0 - 0.0) / 3
    assert cells[2] == "3" and float(cells[3]) == pytest.approx(100 * diff, abs=0.005)
    assert cells[6] == "2 / 0 / 1"

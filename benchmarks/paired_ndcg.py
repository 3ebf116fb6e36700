"""Is one method's nDCG@10 really above another's? Per-query paired comparison of `lancer eval` runs (issue #13).

`lancer eval` writes one TREC run per method and pool (``<eval.output_dir>/runs/<method>/<pool>.trec``). For each
pool and each other method this prints, over the pool's queries (a query missing from a run scores 0):

* the mean per-query nDCG@10 difference (``--method`` minus the other), in points;
* a bootstrap 95 % interval of that mean (queries resampled with replacement);
* a two-sided paired randomisation test (each query's difference flips its sign at random; the p-value counts the
  draws whose mean is at least as far from 0 as the observed one, plus one, over draws plus one);
* per-query wins / ties / losses.

    python benchmarks/paired_ndcg.py runs/bible-1h/eval/runs .cache/lancer/data/bible-quickstart/eval \\
        --pools multilingual_full,multilingual_sampled,crosslingual

Per-query values come from ir-measures (the library `lancer eval` scores with); when every query is in both runs
the mean difference is the difference of the table's nDCG@10 figures.
docs/science.md section 4 has the figures for `configs/bible-1h.yaml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def paired_randomisation_p(d: np.ndarray, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip randomisation test that the paired differences ``d`` have mean 0."""
    d = np.asarray(d, np.float64)
    rng = np.random.default_rng(seed)
    obs = abs(d.mean())
    hits = 0
    for start in range(0, draws, 2000):  # blocks keep the [draws, n] sign matrix small
        n = min(2000, draws - start)
        flips = rng.choice([-1.0, 1.0], size=(n, d.size))
        hits += int((np.abs(flips @ d / d.size) >= obs - 1e-12).sum())
    return (hits + 1) / (draws + 1)


def bootstrap_interval(d: np.ndarray, draws: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of ``d``."""
    d = np.asarray(d, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(draws, d.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def per_query_ndcg10(run_file: Path, qrels_file: Path) -> dict[str, float]:
    import ir_measures
    from ir_measures import nDCG

    qrels = []
    with open(qrels_file, encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\r\n").split("\t")
            if (n == 0 and parts[0] == "query-id") or not line.strip():
                continue
            qrels.append(ir_measures.Qrel(parts[0], parts[1], int(float(parts[2]))))
    run = list(ir_measures.read_trec_run(str(run_file)))
    return {m.query_id: m.value for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="<eval.output_dir>/runs: one directory per method")
    ap.add_argument("collections", type=Path, help="the directory holding the pools' BEIR directories")
    ap.add_argument("--pools", default="multilingual_full,multilingual_sampled,crosslingual")
    ap.add_argument("--method", default="lancer")
    ap.add_argument("--draws", type=int, default=20000)
    args = ap.parse_args()
    others = sorted(p.name for p in args.runs.iterdir() if p.is_dir() and p.name != args.method)
    print(
        f"| pool | {args.method} minus | queries | mean (points) | bootstrap 95 % | p (randomisation) | wins / ties / losses |"
    )
    print("|---|---|---:|---:|---|---:|---|")
    for pool in args.pools.split(","):
        qrels = args.collections / pool / "qrels" / "test.tsv"
        mine = per_query_ndcg10(args.runs / args.method / f"{pool}.trec", qrels)
        for other in others:
            theirs = per_query_ndcg10(args.runs / other / f"{pool}.trec", qrels)
            qids = sorted(set(mine) | set(theirs))
            d = np.array([mine.get(q, 0.0) - theirs.get(q, 0.0) for q in qids])
            lo, hi = bootstrap_interval(d)
            p = paired_randomisation_p(d, args.draws)
            print(
                f"| {pool} | {other} | {d.size} | {100 * d.mean():+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                f"{p:.3f} | {(d > 0).sum()} / {(d == 0).sum()} / {(d < 0).sum()} |"
            )


if __name__ == "__main__":
    main()

"""Where the language signal sits in an embedding space: what L_C sees against what a linear probe sees (issue #13).

For the evaluation probe's sample of an encoded pool (``lancer eval``'s ``<output_dir>/emb/<variant>/<pool>``: the
same balanced sample of ``--per-language`` passages per language and the same train half as ``lancer eval``), prints

* the between-language share of the variance in the raw dimensions: trace(S_b) / trace(S_b + S_w), a variance-
  weighted mean over dimensions of sum_j (1 - p_j) rho_ij^2 (rho_ij: the correlation L_C penalises);
* the top eigenvalues of S_b in the within-language whitened space (Fisher discriminant ratios: between-language
  over within-language variance along the best linear directions), which is what a standardised linear probe
  exploits; S_w is shrunk by ``--shrink`` x its mean eigenvalue, since 550 passages in 384 dimensions estimate it
  poorly;
* the same two with the language labels permuted (their noise level for this sample size);
* with ``--probe``: the evaluation probe's (``fit_language_probe``) test accuracy per language.

    python benchmarks/language_signal.py runs/sweep_bible/L4-lam30-m8/eval/emb/lancer/multilingual_full --probe

docs/science.md section 4 has the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def signal(x: np.ndarray, lab: np.ndarray, shrink: float) -> tuple[float, np.ndarray]:
    """(between-language share of the variance, Fisher ratios in decreasing order)."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    d = x.shape[1]
    sw = np.zeros((d, d))
    sb = np.zeros((d, d))
    for lang in np.unique(lab):
        xl = x[lab == lang]
        p = len(xl) / len(x)
        sw += np.cov(xl.T, bias=True) * p
        m = xl.mean(0) - mu
        sb += p * np.outer(m, m)
    w, v = np.linalg.eigh(sw + shrink * np.trace(sw) / d * np.eye(d))
    white = v / np.sqrt(w)
    fisher = np.sort(np.linalg.eigvalsh(white.T @ sb @ white))[::-1]
    return float(np.trace(sb) / np.trace(sw + sb)), fisher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+", help="encoded pools (lancer eval's emb/<variant>/<pool>)")
    ap.add_argument("--per-language", type=int, default=200, help="eval.probe_per_language")
    ap.add_argument("--seed", type=int, default=0, help="eval.seed")
    ap.add_argument("--shrink", type=float, default=1e-3)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument(
        "--probe", action="store_true", help="also fit the evaluation probe (cross-validated: slow)"
    )
    args = ap.parse_args(argv)

    from lancer_dist.language_probe import fit_language_probe
    from lancer_dist.retrieval.evaluate import _sample_store
    from lancer_dist.retrieval.store import EmbeddingStore

    for path in args.stores:
        x, langs = _sample_store(EmbeddingStore(Path(path)), args.per_language, args.seed)
        lab = np.asarray(langs)
        train = np.zeros(len(lab), dtype=bool)  # lancer eval's split: every other passage of each language
        for lang in set(langs):
            train[np.flatnonzero(lab == lang)[::2]] = True
        share, fisher = signal(x[train], lab[train], args.shrink)
        perm = np.random.default_rng(args.seed).permutation(lab[train])
        p_share, p_fisher = signal(x[train], perm, args.shrink)
        top = ", ".join(f"{f:.1f}" for f in fisher[: args.top])
        p_top = ", ".join(f"{f:.1f}" for f in p_fisher[: args.top])
        print(f"{path}: {int(train.sum())} train-half passages, {len(set(langs))} languages")
        print(f"  between-language share {share:.4f}  Fisher ratios {top}")
        print(f"  labels permuted:        {p_share:.4f}  Fisher ratios {p_top}")
        if args.probe:
            pf = fit_language_probe(x[train], list(lab[train]), x[~train], list(lab[~train]), seed=args.seed)
            pred = np.asarray(pf.languages)[pf.classifier.predict(x[~train])]
            test = lab[~train]
            per = " ".join(f"{g}={float((pred[test == g] == g).mean()):.2f}" for g in sorted(set(langs)))
            print(f"  probe {pf.test_accuracy:.3f} ({pf.ci_low:.3f} - {pf.ci_high:.3f}), C = {pf.C:g}; {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

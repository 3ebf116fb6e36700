"""Print the erasure loss's noise floor (lancer_dist.losses.null_expectation) beside a simulation of the library's
own loss on pure-noise embeddings: 13 balanced languages x m passages each, 384 dimensions (mE5-small), 200 draws.

    python benchmarks/bench_erasure_floor.py
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lancer_dist.losses import erasure_loss, null_expectation

FORMS = ("abs", "squared", "debiased")


def main(draws: int = 200, dims: int = 384, languages: int = 13) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{'N':>5} {'form':>9} {'floor':>9} {'simulated':>10} {'+-se':>8}  sqrt(2/(pi(N-1)))")
    for m in (4, 8, 20):
        langs = torch.arange(languages).repeat(m)
        n = langs.numel()
        vals: dict[str, list[float]] = {f: [] for f in FORMS}
        for _ in range(draws):
            x = torch.randn(n, dims, generator=g, dtype=torch.float64)
            for f in FORMS:
                vals[f].append(float(erasure_loss(x, langs, languages, form=f)))
        for f in FORMS:
            a = np.array(vals[f])
            approx = f"{math.sqrt(2 / (math.pi * (n - 1))):.5f}" if f == "abs" else ""
            print(
                f"{n:>5} {f:>9} {null_expectation(f, n):>9.5f} {a.mean():>10.5f} "
                f"{a.std(ddof=1) / math.sqrt(draws):>8.5f}  {approx}"
            )


if __name__ == "__main__":
    main()

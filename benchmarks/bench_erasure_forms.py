"""Which form of the erasure loss erases faster per step? A synthetic, controlled comparison (not the real model).

Passages: f = mu_language + N(0, I) in D = 64 dimensions, 13 languages (the language means have scale 0.3, so the
population mean |rho| starts well above its floor). Encoder: x = f W, W initialised to the identity. Objective per
step: L_C(form) on a balanced global batch of N = 13 x m passages (m = 4: the quickstart's N = 52; 20; 80) plus
1e-3 x mean ||x - f||^2, a fidelity term that stands in for L_R (without one any form can shrink W to 0; at weights
1e-2 and 1e-1 it wins and no form moves the population correlation by more than 0.004 - tried, not tabulated).
Adam, lr 1e-2, 200 steps, 3 seeds. Reported: the population mean |rho| on 13 x 2000 held-out passages (its floor
there is ~0.0055), relative to the start, at several steps, and the fidelity term at the end.

The three forms have different gradient scales (|rho| pushes every cell with sign(rho); rho^2 with 2 rho), so the
comparison is at equal lambda (= 1), as a user switching the option would run it, not at equal step size.

    python benchmarks/bench_erasure_forms.py
"""

from __future__ import annotations

import torch

from lancer_dist.losses import erasure_loss, null_abs_correlation

D, LANGS, STEPS, SEEDS, BETA = 64, 13, 200, 3, 1e-3
REPORT = (0, 25, 50, 100, 200)


def _draw(g: torch.Generator, means: torch.Tensor, per: int) -> tuple[torch.Tensor, torch.Tensor]:
    lang = torch.arange(LANGS).repeat(per)
    return means[lang] + torch.randn(lang.numel(), D, generator=g, dtype=torch.float64), lang


def run(form: str, seed: int, per: int) -> tuple[list[float], float]:
    g = torch.Generator().manual_seed(seed)
    means = 0.3 * torch.randn(LANGS, D, generator=g, dtype=torch.float64)
    f_pop, l_pop = _draw(g, means, 2000)
    w = torch.eye(D, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    curve = []
    fid = float("nan")
    for step in range(STEPS + 1):
        if step in REPORT:
            with torch.no_grad():
                curve.append(float(erasure_loss(f_pop @ w, l_pop, LANGS)))
        if step == STEPS:
            break
        f, lang = _draw(g, means, per)
        x = f @ w
        fidelity = ((x - f) ** 2).sum(1).mean()
        loss = erasure_loss(x, lang, LANGS, form=form) + BETA * fidelity
        opt.zero_grad()
        loss.backward()
        opt.step()
        fid = float(fidelity.detach())
    return curve, fid


def main() -> None:
    floor_pop = null_abs_correlation(LANGS * 2000)
    print(f"population mean |rho| (floor at N = {LANGS * 2000}: {floor_pop:.4f}); mean over {SEEDS} seeds")
    print(f"{'N':>5} {'form':>9} " + " ".join(f"{'step ' + str(s):>9}" for s in REPORT) + f" {'fidelity':>9}")
    for per in (4, 20, 80):
        for form in ("abs", "squared", "debiased"):
            curves, fids = zip(*(run(form, s, per) for s in range(SEEDS)), strict=True)
            mean = [sum(c[i] for c in curves) / SEEDS for i in range(len(REPORT))]
            print(
                f"{LANGS * per:>5} {form:>9} "
                + " ".join(f"{v:>9.4f}" for v in mean)
                + f" {sum(fids) / SEEDS:>9.4f}"
            )


if __name__ == "__main__":
    main()

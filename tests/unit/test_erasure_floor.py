"""The erasure loss's noise floor and its variants, against simulation and scipy.

The floor is the expected loss when there is NO language signal. Each check draws independent data with numpy and
compares the simulated mean to the formula within 4 standard errors; scipy's null distribution of Pearson's r pins
the |r| formula to 1e-9. (The large-N approximation sqrt(2 / (pi (N - 1))) is within 0.5 % at N = 52: simulation
alone cannot tell them apart, scipy can.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lancer_dist.losses import (
    correlation_stats,
    erasure_loss,
    erasure_terms,
    erasure_terms_from_stats,
    language_correlation,
    null_abs_correlation,
    null_expectation,
)

REPS = 40_000


def _null_correlations(n: int, reps: int, seed: int, dist: str = "normal") -> np.ndarray:
    """Pearson r of `reps` independent draws of x [n] against a fixed balanced 0/1 language indicator."""
    rng = np.random.default_rng(seed)
    z = (np.arange(n) % 4 == 0).astype(float)  # one language column of a 4-language balanced batch
    x = rng.standard_normal((reps, n)) if dist == "normal" else rng.exponential(size=(reps, n))
    xc = x - x.mean(1, keepdims=True)
    zc = z - z.mean()
    return (xc @ zc) / (np.linalg.norm(xc, axis=1) * np.linalg.norm(zc))


@pytest.mark.parametrize("n", [52, 104, 256])
def test_abs_floor_matches_simulation(n):
    r = _null_correlations(n, REPS, seed=n)
    mean, se = np.abs(r).mean(), np.abs(r).std(ddof=1) / math.sqrt(REPS)
    floor = null_abs_correlation(n)
    assert abs(mean - floor) < 4 * se, (n, mean, floor, se)
    assert abs(mean - 1 / math.sqrt(n - 1)) > 20 * se  # sqrt(E r^2), an upper bound (Jensen), is far off


@pytest.mark.parametrize("n", [52, 104, 256])
def test_abs_floor_matches_scipy_null_distribution(n):
    """scipy's own null distribution of Pearson's r (a Beta(n/2 - 1, n/2 - 1) on [-1, 1]) as the reference."""
    from scipy import stats

    a = n / 2 - 1
    expected = stats.beta(a, a, loc=-1, scale=2).expect(abs)
    assert null_abs_correlation(n) == pytest.approx(expected, rel=1e-9)
    assert stats.pearsonr(np.arange(n), np.arange(n) ** 2).statistic > 0  # scipy's pearsonr is importable


@pytest.mark.parametrize("n", [52, 104, 256])
def test_squared_floor_is_exact_for_any_data(n):
    """E[r^2] = 1 / (N - 1) under random labels whatever the distribution of x (here skewed, exponential)."""
    r2 = _null_correlations(n, REPS, seed=7 * n, dist="exponential") ** 2
    mean, se = r2.mean(), r2.std(ddof=1) / math.sqrt(REPS)
    assert abs(mean - null_expectation("squared", n)) < 4 * se
    # debiased: mean 0 with no signal
    adj = ((n - 1) * r2 - 1) / (n - 2)
    assert abs(adj.mean()) < 4 * adj.std(ddof=1) / math.sqrt(REPS)


@pytest.mark.parametrize("n_per_lang", [4, 8])
def test_erasure_loss_itself_sits_on_its_floor(n_per_lang):
    """The library's loss (all three forms) on 13 balanced languages x k dims of pure noise, averaged over draws."""
    g = torch.Generator().manual_seed(n_per_lang)
    langs = torch.arange(13).repeat(n_per_lang)
    n = langs.numel()
    vals: dict[str, list[float]] = {"abs": [], "squared": [], "debiased": []}
    for _ in range(400):
        x = torch.randn(n, 32, generator=g, dtype=torch.float64)
        for form in vals:
            vals[form].append(float(erasure_loss(x, langs, 13, form=form)))
    for form, v in vals.items():
        a = np.array(v)
        se = a.std(ddof=1) / math.sqrt(a.size)
        assert abs(a.mean() - null_expectation(form, n)) < 4 * se, (form, a.mean(), se)


def test_terms_report_mean_abs_and_global_floor():
    g = torch.Generator().manual_seed(0)
    langs = torch.arange(5).repeat(6)
    x = torch.randn(30, 7, generator=g, dtype=torch.float64)
    x[:, 0] += 2.0 * (langs == 1)  # a real language signal in one dimension
    t = erasure_terms(x, langs, 5, form="squared")
    rho = language_correlation(x, langs, 5)
    assert float(t.mean_abs) == pytest.approx(float(rho.abs().mean()), abs=1e-14)
    assert float(t.loss) == pytest.approx(float((rho**2).mean()), abs=1e-14)
    assert t.floor == pytest.approx(null_abs_correlation(30))
    assert float(t.mean_abs) > t.floor  # the signal lifts L_C above the floor
    # debiased = Ezekiel's adjusted r^2 per cell
    d = erasure_terms(x, langs, 5, form="debiased")
    assert float(d.loss) == pytest.approx(float(((29 * rho**2 - 1) / 28).mean()), abs=1e-14)


def test_floor_counts_only_cells_that_can_correlate():
    """An absent language and a constant dimension give rho = 0 by construction: the floor scales down with them."""
    g = torch.Generator().manual_seed(1)
    langs = torch.arange(3).repeat(10)  # languages 3 and 4 of 5 absent
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    x[:, 3] = 1.0  # a constant dimension
    t = erasure_terms_from_stats(correlation_stats(x, langs, 5))
    assert t.floor == pytest.approx(null_abs_correlation(30) * (3 / 4) * (3 / 5))
    # the debiased form counts those dead cells as 0, not -1 / (N - 2): it still reads ~0 on pure noise
    rho = language_correlation(x, langs, 5)
    d = erasure_terms_from_stats(correlation_stats(x, langs, 5), form="debiased")
    assert float(d.loss) == pytest.approx(float(((29 * rho[:3, :3] ** 2 - 1) / 28).sum() / 20), abs=1e-14)


def test_null_abs_correlation_edge_cases():
    assert null_abs_correlation(2) == pytest.approx(1.0)
    # three points: r = cos of a uniform angle in the centred plane (arcsine law), E|r| = 2 / pi
    assert null_abs_correlation(3) == pytest.approx(2 / math.pi)
    with pytest.raises(ValueError, match="at least 2 rows"):
        null_abs_correlation(1)
    with pytest.raises(ValueError, match="erasure form"):
        erasure_loss(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), 2, form="cubic")

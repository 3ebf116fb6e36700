"""The one language probe (training and `lancer eval`): its interval against scipy, its regularisation against an
independent cross-validation loop, and the train split alone deciding C."""

from __future__ import annotations

import numpy as np
import pytest

from lancer_dist.language_probe import PROBE_CS, fit_language_probe, wilson_interval


@pytest.mark.parametrize(("k", "n"), [(0, 10), (8, 10), (10, 10), (37, 52), (150, 208), (410, 832)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_interval_hand_checked_and_errors():
    # p = 0.8, n = 10, z = 1.96: centre 0.71677, half-width 0.22658 (worked by hand)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9434), abs=1e-4)
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def _data(n_per: int, dims: int, shift: float, seed: int, langs: int = 4, mean_seed: int = 0):
    """Gaussian passages around one mean per language (the means depend on ``mean_seed`` only, so splits drawn
    with different ``seed`` share them)."""
    means = np.random.default_rng(mean_seed).normal(size=(langs, dims)) * shift
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(langs), n_per)
    x = means[y] + rng.normal(size=(y.size, dims))
    return x, [f"l{v}" for v in y]


def _reference_c(x, y, folds, seed):
    """Independent: for each C, mean validation log loss over the same stratified folds; argmin."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    xs = StandardScaler().fit_transform(x)
    yy = np.array([int(v[1:]) for v in y])
    losses = []
    for c in PROBE_CS:
        fold_losses = []
        for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(xs, yy):
            m = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xs[tr], yy[tr])
            fold_losses.append(log_loss(yy[va], m.predict_proba(xs[va]), labels=np.arange(4)))
        losses.append(np.mean(fold_losses))
    return PROBE_CS[int(np.argmin(losses))], losses


def test_regularisation_is_cross_validated_on_the_train_split():
    # few passages per language, many dimensions, a weak signal: the regime where a fixed C overfits
    x_tr, y_tr = _data(20, 60, 0.35, seed=1)
    x_te, y_te = _data(100, 60, 0.35, seed=2)
    fit = fit_language_probe(x_tr, y_tr, x_te, y_te, cv_folds=5, seed=0)
    ref_c, losses = _reference_c(x_tr, y_tr, 5, 0)
    assert pytest.approx(ref_c) == fit.C
    assert PROBE_CS[-1] > fit.C  # the nearly unregularised end of the grid is not what CV picks here
    assert max(losses) - min(losses) > 0.1  # C matters on this data (the test is not comparing ties)
    # the test split plays no part in choosing C
    x_te2, y_te2 = _data(100, 60, 2.0, seed=3)
    assert fit_language_probe(x_tr, y_tr, x_te2, y_te2, cv_folds=5, seed=0).C == fit.C
    # the reported accuracy and interval are those of the test predictions
    pred = fit.classifier.predict(x_te)
    truth = np.array([int(v[1:]) for v in y_te])
    assert fit.test_correct == int((pred == truth).sum()) and fit.test_size == 400
    assert (fit.ci_low, fit.ci_high) == wilson_interval(fit.test_correct, 400)
    assert fit.ci_low < fit.test_accuracy < fit.ci_high and fit.ci_high - fit.ci_low < 0.11


def test_probe_errors_name_the_problem():
    x, y = _data(3, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2 languages"):
        fit_language_probe(x[:3], y[:3], x[:3], y[:3])
    with pytest.raises(ValueError, match="do not occur"):
        fit_language_probe(x[:6], y[:6], x, y)
    with pytest.raises(ValueError, match="at least 2 training passages"):
        fit_language_probe(x[[0, 3, 4]], [y[0], y[3], y[4]], x[:1], y[:1])


def test_folds_fitted_in_parallel_give_the_same_probe():
    """``n_jobs`` (``eval.probe_jobs``) only spreads the cross-validation folds over processes: the same C, the
    same predictions and (to rounding) the same probabilities as the sequential fit."""
    x_tr, y_tr = _data(20, 60, 0.35, seed=1)
    x_te, y_te = _data(100, 60, 0.35, seed=2)
    one = fit_language_probe(x_tr, y_tr, x_te, y_te, cv_folds=5, seed=0, n_jobs=1)
    two = fit_language_probe(x_tr, y_tr, x_te, y_te, cv_folds=5, seed=0, n_jobs=2)
    assert one.classifier[-1].n_jobs == 1 and two.classifier[-1].n_jobs == 2  # the parallel path did run
    assert two.C == one.C and two.test_correct == one.test_correct
    np.testing.assert_allclose(
        two.classifier.predict_proba(x_te), one.classifier.predict_proba(x_te), rtol=0, atol=1e-8
    )
    # 0 = the CPUs this process may use, never more processes than folds
    auto = fit_language_probe(x_tr, y_tr, x_te, y_te, cv_folds=3, seed=0, n_jobs=0)
    import os

    assert auto.classifier[-1].n_jobs == min(3, len(os.sched_getaffinity(0)))

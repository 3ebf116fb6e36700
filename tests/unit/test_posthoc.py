"""LSAR and LEACE on synthetic multilingual embeddings with a known language component."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lancer_dist.language_probe import fit_language_probe
from lancer_dist.losses import erasure_loss
from lancer_dist.retrieval.posthoc import fit_leace, fit_lsar, language_ids, language_means


def _data(seed: int = 0, L: int = 4, D: int = 24, n: int = 120):
    """Shared semantic content + a per-language offset (the language bias the baselines should remove)."""
    rng = np.random.default_rng(seed)
    langs = [f"l{j}" for j in range(L) for _ in range(n)]
    offsets = rng.normal(size=(L, D)) * 2.0
    x = rng.normal(size=(L * n, D)) + np.repeat(offsets, n, axis=0)
    return x.astype(np.float32), langs


def probe_accuracy(*split):
    return fit_language_probe(*split).test_accuracy


def _split(x, langs):
    idx = np.arange(len(langs))
    train, test = idx % 2 == 0, idx % 2 == 1
    lab = np.asarray(langs)
    return x[train], lab[train], x[test], lab[test]


def test_lsar_projected_language_means_coincide_and_probe_drops():
    x, langs = _data()
    t = fit_lsar(x, langs)  # default rank = number of languages
    M_before, _ = language_means(x, langs)
    M_after, _ = language_means(t(x), langs)
    spread = lambda M: np.abs(M - M.mean(1, keepdims=True)).max()  # noqa: E731
    assert spread(M_before) > 1.0
    assert spread(M_after) < 1e-4
    # The removed subspace is spanned by the (re-centred) language means: A is an orthogonal projector.
    np.testing.assert_allclose(t.A @ t.A, t.A, atol=1e-10)
    np.testing.assert_allclose(t.A, t.A.T, atol=1e-10)
    assert round(np.trace(np.eye(t.A.shape[0]) - t.A)) == 3  # effective rank L - 1
    acc_before = probe_accuracy(*_split(x, langs))
    acc_after = probe_accuracy(*_split(t(x), langs))
    assert acc_before > 0.95 and acc_after < 0.5, (acc_before, acc_after)


def test_lsar_rank_one_removes_one_direction_only():
    x, langs = _data(1)
    t = fit_lsar(x, langs, rank=1)
    assert round(np.trace(np.eye(t.A.shape[0]) - t.A)) == 1
    M_after, _ = language_means(t(x), langs)
    assert np.abs(M_after - M_after.mean(1, keepdims=True)).max() > 0.1


def test_lsar_matches_independent_construction():
    """Independent derivation (least-norm point of the means' affine hull, full rank): the removed subspace is
    the span of {m_j - m_0}."""
    x, langs = _data(2)
    M, _ = language_means(x, langs)
    diffs = M[:, 1:] - M[:, :1]
    Q, _ = np.linalg.qr(diffs)
    np.testing.assert_allclose(fit_lsar(x, langs).A, np.eye(M.shape[0]) - Q @ Q.T, atol=1e-8)


def test_leace_zeroes_erasure_loss_and_probe():
    x, langs = _data(3)
    ids, languages = language_ids(langs)
    t = fit_leace(x, langs)
    before = float(erasure_loss(torch.tensor(x, dtype=torch.float64), torch.tensor(ids), len(languages)))
    after = float(erasure_loss(torch.tensor(t(x), dtype=torch.float64), torch.tensor(ids), len(languages)))
    assert before > 0.2 and after < 1e-5, (before, after)
    acc_after = probe_accuracy(*_split(t(x), langs))
    assert acc_after < 0.5


def test_needs_two_languages():
    x, _ = _data()
    with pytest.raises(ValueError, match="at least 2 languages"):
        fit_lsar(x[:10], ["en"] * 10)
    with pytest.raises(ValueError, match="at least 2 languages"):
        fit_leace(x[:10], ["en"] * 10)

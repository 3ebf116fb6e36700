"""The LANCER losses against independent references (numpy, closed forms, concept-erasure's LEACE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lancer_dist.losses import (
    LocalCollectives,
    contrastive_loss,
    correlation_stats,
    erasure_loss,
    lancer_loss,
    language_correlation,
)


def _lang_data(n=200, k=12, langs=5, seed=0, strength=1.0):
    rng = np.random.default_rng(seed)
    lang = rng.integers(0, langs, size=n)
    x = rng.normal(size=(n, k))
    x[:, :langs] += strength * np.eye(langs)[lang]  # the first dims encode language
    return torch.tensor(x), torch.tensor(lang)


def test_language_correlation_matches_numpy_corrcoef():
    x, lang = _lang_data()
    rho = language_correlation(x, lang, 5, eps=0.0).numpy()
    z = np.eye(5)[lang.numpy()]
    for i in range(x.shape[1]):
        for j in range(5):
            ref = np.corrcoef(x[:, i].numpy(), z[:, j])[0, 1]
            assert rho[i, j] == pytest.approx(ref, abs=1e-12)
    # with the default eps the difference is at the eps level
    rho_eps = language_correlation(x, lang, 5).numpy()
    assert np.abs(rho_eps - rho).max() < 1e-7


def test_erasure_loss_is_mean_absolute_correlation():
    x, lang = _lang_data(seed=3)
    z = np.eye(5)[lang.numpy()]
    ref = np.mean([abs(np.corrcoef(x[:, i].numpy(), z[:, j])[0, 1]) for i in range(12) for j in range(5)])
    assert float(erasure_loss(x, lang, 5)) == pytest.approx(ref, abs=1e-7)


def test_float32_input_keeps_dtype_and_accuracy():
    x, lang = _lang_data(seed=4)
    l64 = erasure_loss(x, lang, 5)
    l32 = erasure_loss(x.float() + 1000.0, lang, 5)  # a large offset: float64 statistics avoid cancellation
    assert l32.dtype == torch.float32
    assert float(l32) == pytest.approx(float(l64), abs=1e-4)


def test_absent_language_and_constant_dimension_are_finite():
    x, lang = _lang_data(n=40, k=6, langs=3, seed=1)
    x[:, 4] = 3.0  # a constant embedding dimension
    x.requires_grad_(True)
    loss = erasure_loss(x, lang, 5)  # languages 3 and 4 never occur
    loss.backward()
    rho = language_correlation(x.detach(), lang, 5)
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert torch.all(rho[:, 3:] == 0) and torch.all(rho[4] == 0)


def test_erasure_gradient_matches_finite_differences():
    x, lang = _lang_data(n=30, k=4, langs=3, seed=2)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: erasure_loss(t, lang, 3), (x,), eps=1e-6, atol=1e-6)


def test_statistics_are_additive():
    """Summing the statistics of two halves gives the statistics (and correlation) of the whole batch."""
    x, lang = _lang_data(n=50, seed=5)
    a = correlation_stats(x[:20], lang[:20], 5).flatten()
    b = correlation_stats(x[20:], lang[20:], 5).flatten()
    full = correlation_stats(x, lang, 5).flatten()
    assert torch.allclose(a + b, full, atol=1e-10)
    halves = language_correlation(
        x[:20], lang[:20], 5, sum_fn=lambda t: t + correlation_stats(x[20:], lang[20:], 5).flatten()
    )
    assert torch.allclose(halves, language_correlation(x, lang, 5), atol=1e-12)


def test_leace_erased_embeddings_have_zero_erasure_loss():
    """Independent check of the definition: LEACE (concept-erasure) zeroes the cross-covariance, so L_C ~ 0."""
    from concept_erasure import LeaceFitter

    x, lang = _lang_data(n=400, k=16, langs=6, seed=7, strength=2.0)
    z = torch.nn.functional.one_hot(lang, 6).double()
    before = float(erasure_loss(x, lang, 6))
    fitter = LeaceFitter.fit(x, z)
    erased = fitter.eraser(x)
    after = float(erasure_loss(erased, lang, 6))
    assert before > 0.1
    assert after <= 1e-5, after


def test_contrastive_loss_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, generator=g, dtype=torch.float64)
    p = torch.randn(7, 5, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 3, 6])
    t = 0.5
    s = (q @ p.T / t).numpy()
    ref = np.mean([-(s[i, pos[i]] - np.log(np.exp(s[i]).sum())) for i in range(3)])
    assert float(contrastive_loss(q, p, pos, temperature=t)) == pytest.approx(ref, abs=1e-12)
    per_query = contrastive_loss(q, p, pos, temperature=t, reduction="none")
    assert per_query.shape == (3,)
    with pytest.raises(ValueError, match="positive_index"):
        contrastive_loss(q, p, pos[:2])


def test_lancer_loss_single_process_is_the_weighted_sum():
    g = torch.Generator().manual_seed(1)
    q, p = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
    )
    x, lang = _lang_data(n=32, k=6, langs=4, seed=9)
    out = lancer_loss(
        q, p, 2, x, lang, 4, temperature=0.1, erasure_weight=0.5, collectives=LocalCollectives()
    )
    lr = contrastive_loss(q, p, torch.arange(4) * 2, temperature=0.1)
    lc = erasure_loss(x, lang, 4)
    assert float(out.loss) == pytest.approx(float(lr + 0.5 * lc), abs=1e-12)
    assert float(out.total) == pytest.approx(float(lr + 0.5 * lc), abs=1e-12)
    assert out.num_queries == 4 and out.num_passages == 8
    # lambda = 0: L_C is still reported, but does not enter the loss
    base = lancer_loss(q, p, 2, x, lang, 4, temperature=0.1, erasure_weight=0.0)
    assert float(base.erasure) == pytest.approx(float(lc), abs=1e-12)
    assert float(base.loss) == pytest.approx(float(lr), abs=1e-12)


def test_bad_language_ids_are_rejected():
    x, lang = _lang_data(n=10, langs=3)
    with pytest.raises(ValueError, match=r"language ids must lie in \[0, 2\)"):
        erasure_loss(x, lang, 2)

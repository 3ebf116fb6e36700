"""The language probe: recovers linearly encoded language, drops to chance once LEACE erases it, and reports the
same loss / accuracy as a numpy recomputation from the fitted coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from concept_erasure import LeaceEraser

from lancer_dist.train.probe import LanguageProbe, probe_curve_png

LANGS = ["ar", "de", "en", "hi", "zh"]
DIM = 24


def _synthetic(n_train: int = 60, n_test: int = 60, shift: float = 1.5, seed: int = 0):
    """Texts '<lang>-<i>' whose embeddings are N(0, I) noise plus a per-language mean (language is linear)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(LANGS), DIM)) * shift
    table: dict[str, np.ndarray] = {}
    train, test = [], []
    for k, lang in enumerate(LANGS):
        for i in range(n_train + n_test):
            text = f"{lang}-{i}"
            table[text] = means[k] + rng.normal(size=DIM)
            (train if i < n_train else test).append((text, lang))
    return train, test, table


def _encoder(table: dict[str, np.ndarray]):
    return lambda texts: np.stack([table[t] for t in texts])


def test_probe_recovers_linear_language_and_matches_numpy():
    train, test, table = _synthetic()
    probe = LanguageProbe(train, test, seed=0)
    out = probe.evaluate(_encoder(table))
    assert out["probe_test_accuracy"] > 0.97
    assert out["probe_chance"] == pytest.approx(1 / len(LANGS))
    assert out["probe_num_languages"] == len(LANGS)

    # Independent recomputation of the reported numbers from the fitted scaler + coefficients with numpy.
    scaler, lr = probe.classifier[0], probe.classifier[-1]
    x_train = np.stack([table[t] for t, _ in train])
    x_test = np.stack([table[t] for t, _ in test])
    mu, sd = x_train.mean(0), x_train.std(0)
    np.testing.assert_allclose(scaler.mean_, mu, rtol=1e-10)

    def softmax_probs(x):
        z = ((x - mu) / sd) @ lr.coef_.T + lr.intercept_
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    y_train = np.array([LANGS.index(lang) for _, lang in train])
    y_test = np.array([LANGS.index(lang) for _, lang in test])
    p_train, p_test = softmax_probs(x_train), softmax_probs(x_test)
    loss = -np.mean(np.log(np.clip(p_train[np.arange(len(y_train)), y_train], 1e-15, 1)))
    assert out["probe_train_loss"] == pytest.approx(loss, rel=1e-6, abs=1e-9)
    assert out["probe_test_accuracy"] == pytest.approx(np.mean(p_test.argmax(1) == y_test))
    assert out["probe_train_accuracy"] == pytest.approx(np.mean(p_train.argmax(1) == y_train))

    # L_C over every probe passage against a numpy Pearson correlation, and its floor for that N
    from lancer_dist.losses import null_abs_correlation

    x_all = np.concatenate([x_train, x_test])
    y_all = np.concatenate([y_train, y_test])
    rho = np.corrcoef(np.concatenate([x_all, np.eye(len(LANGS))[y_all]], axis=1).T)[:DIM, DIM:]
    assert out["probe_erasure_abs"] == pytest.approx(np.abs(rho).mean(), rel=1e-6)
    assert out["probe_erasure_floor"] == pytest.approx(null_abs_correlation(len(y_all)))
    assert out["probe_erasure_over_floor"] > 5  # a strong language signal: far above the floor


def test_probe_drops_to_chance_after_leace():
    train, test, table = _synthetic(n_train=80, n_test=200)
    texts = [t for t, _ in train + test]
    x = torch.tensor(np.stack([table[t] for t in texts]), dtype=torch.float64)
    z = torch.nn.functional.one_hot(torch.tensor([LANGS.index(t.split("-")[0]) for t in texts]), len(LANGS))
    # LEACE fitted on both splits removes every linear trace of language (class means become equal).
    eraser = LeaceEraser.fit(x, z.to(torch.float64))
    erased = dict(zip(texts, eraser(x).numpy(), strict=True))

    probe = LanguageProbe(train, test, seed=0)
    before = probe.evaluate(_encoder(table))
    after = probe.evaluate(_encoder(erased))
    chance = 1 / len(LANGS)
    assert before["probe_test_accuracy"] > 0.97
    assert after["probe_test_accuracy"] < chance + 0.12, after
    # The classifier's job got harder: its training loss rises towards log(num_languages).
    assert after["probe_train_loss"] > before["probe_train_loss"] + 0.5
    assert after["probe_train_loss"] > 0.6 * np.log(len(LANGS))


def test_probe_accepts_torch_tensors_and_is_deterministic():
    train, test, table = _synthetic(n_train=20, n_test=10, shift=0.3)
    probe = LanguageProbe(train, test, seed=3)
    enc = _encoder(table)
    a = probe.evaluate(lambda texts: torch.tensor(enc(texts), dtype=torch.float32))
    b = probe.evaluate(lambda texts: torch.tensor(enc(texts), dtype=torch.float32))
    assert a == b


def test_from_pool_is_balanced_disjoint_and_validates():
    pool = [(f"{lang} text {i}", lang) for lang in LANGS for i in range(12)] + [
        ("de text 0", "de")
    ]  # a duplicate
    probe = LanguageProbe.from_pool(pool, train_per_language=5, test_per_language=3, seed=1)
    assert len(probe.train_texts) == 5 * len(LANGS) and len(probe.test_texts) == 3 * len(LANGS)
    assert not set(probe.train_texts) & set(probe.test_texts)
    assert np.bincount(probe.y_train).tolist() == [5] * len(LANGS)
    again = LanguageProbe.from_pool(pool, train_per_language=5, test_per_language=3, seed=1)
    assert again.train_texts == probe.train_texts
    with pytest.raises(ValueError, match=r"need 13 distinct texts per language"):
        LanguageProbe.from_pool(pool, train_per_language=10, test_per_language=3)
    with pytest.raises(ValueError, match=r"record 1"):
        LanguageProbe([("a", "en"), ("b",), ("c", "de")], [("d", "en")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"do not occur in the train split"):
        LanguageProbe([("a", "en"), ("b", "de")], [("c", "fr")])
    with pytest.raises(ValueError, match=r"expected \(3, dim\)"):
        LanguageProbe([("a", "en"), ("b", "de")], [("c", "de")]).evaluate(lambda texts: np.zeros((2, 4)))


def test_probe_curve_png(tmp_path):
    hist = {
        "baseline": [
            {"step": s, "probe_train_loss": 0.1 + 0.01 * s, "probe_test_accuracy": 0.99, "probe_chance": 0.2}
            for s in (0, 10, 20)
        ],
        "lancer": [
            {
                "step": s,
                "probe_train_loss": 0.1 + 0.05 * s,
                "probe_test_accuracy": 0.99 - 0.03 * s,
                "probe_chance": 0.2,
            }
            for s in (0, 10, 20)
        ],
    }
    out = probe_curve_png(hist, tmp_path / "probe" / "curve.png", title="probe")
    single = probe_curve_png(hist["lancer"], tmp_path / "single.png")
    from PIL import Image

    for path in (out, single):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] > 600 and im.size[1] > 250
            # Not a blank canvas: the curves add non-white pixels.
            assert len(np.unique(np.asarray(im.convert("L")))) > 10

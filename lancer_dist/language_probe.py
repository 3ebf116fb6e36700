"""THE language-ID probe (paper §5.3 Fig. 4, Table 1): one function for training and for ``lancer eval``.

:func:`fit_language_probe` fits a multinomial logistic regression on standardised embeddings of a train split and
scores it on a held-out test split. Two things make its figure worth reading (issue #13):

* the regularisation strength C is chosen by stratified k-fold cross-validation ON THE TRAIN SPLIT only
  (``LogisticRegressionCV``, log loss, a fixed grid ``PROBE_CS``): with tens of passages per language and hundreds of
  dimensions an unregularised fit separates its training set perfectly whatever the embeddings, and a fixed C
  suits one embedding space and not the next. The features are standardised with statistics of the whole train
  split before the folds are cut (no labels are involved);
* the test accuracy comes with a 95 % Wilson score interval (:func:`wilson_interval`), so two runs' accuracies can be
  compared: intervals a few points wide need several hundred test passages (about +- 3.4 points at 50 % with 832).

Pure numpy + scikit-learn; nothing here knows about models, ranks or trackers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PROBE_CS", "ProbeFit", "fit_language_probe", "population_erasure", "wilson_interval"]

# The inverse-regularisation grid searched by cross-validation (1e-4 ... 1e2).
PROBE_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95 % by default; no continuity correction)."""
    if n <= 0:
        raise ValueError(f"the interval needs at least one trial, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ProbeFit:
    test_accuracy: float
    ci_low: float  # 95 % Wilson interval of the test accuracy
    ci_high: float
    test_correct: int
    test_size: int
    train_accuracy: float
    train_loss: float  # mean log loss on the train split (Fig. 4 left)
    test_loss: float
    C: float  # the regularisation chosen by cross-validation on the train split
    cv_folds: int
    chance: float  # 1 / number of languages
    languages: list[str]
    classifier: Any  # the fitted sklearn Pipeline (scaler + logistic regression)

    def as_metrics(self, prefix: str = "probe_") -> dict[str, float]:
        return {
            f"{prefix}test_accuracy": self.test_accuracy,
            f"{prefix}test_accuracy_low": self.ci_low,
            f"{prefix}test_accuracy_high": self.ci_high,
            f"{prefix}test_size": float(self.test_size),
            f"{prefix}train_accuracy": self.train_accuracy,
            f"{prefix}train_loss": self.train_loss,
            f"{prefix}test_loss": self.test_loss,
            f"{prefix}C": self.C,
            f"{prefix}chance": self.chance,
            f"{prefix}num_languages": float(len(self.languages)),
        }


def fit_language_probe(
    x_train: np.ndarray,
    y_train: Sequence[Any],
    x_test: np.ndarray,
    y_test: Sequence[Any],
    *,
    cv_folds: int = 5,
    Cs: Sequence[float] = PROBE_CS,
    seed: int = 0,
    max_iter: int = 2000,
    n_jobs: int = 1,
) -> ProbeFit:
    """Fit the probe on (x_train [N, D], y_train [N] labels) with C chosen by CV on the train split; score on the test
    split. ``cv_folds`` is capped by the rarest training language's count (at least 2 of each are needed).
    ``n_jobs`` processes fit the folds at once (scikit-learn's ``n_jobs``; 0 = the CPUs this process may use)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr = np.asarray(x_train, np.float64)
    x_te = np.asarray(x_test, np.float64)
    languages = sorted({str(v) for v in y_train})
    if len(languages) < 2:
        raise ValueError(f"the probe needs at least 2 languages in its training split, got {languages}")
    unknown = sorted({str(v) for v in y_test} - set(languages))
    if unknown:
        raise ValueError(f"the probe's test languages {unknown} do not occur in its training split")
    if len(y_test) == 0:
        raise ValueError("the probe's test split is empty")
    index = {lang: i for i, lang in enumerate(languages)}
    ytr = np.array([index[str(v)] for v in y_train])
    yte = np.array([index[str(v)] for v in y_test])
    if x_tr.shape[0] != ytr.size or x_te.shape[0] != yte.size:
        raise ValueError(
            f"probe: {x_tr.shape[0]} / {x_te.shape[0]} train / test embeddings for {ytr.size} / {yte.size} labels"
        )
    folds = min(cv_folds, int(np.bincount(ytr).min()))
    if folds < 2:
        raise ValueError(
            "the probe's cross-validation needs at least 2 training passages of every language, got "
            + str({lang: int(c) for lang, c in zip(languages, np.bincount(ytr), strict=True)})
        )
    # lbfgs on more than two classes fits the multinomial (softmax) model
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=list(Cs),
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="neg_log_loss",
            max_iter=max_iter,
            random_state=seed,
            n_jobs=min(folds, n_jobs if n_jobs > 0 else _usable_cpus()),
            **_new_attributes(),
        ),
    )
    try:
        clf.fit(x_tr, ytr)
    finally:
        if clf[-1].n_jobs > 1:
            # joblib keeps its worker processes for reuse; end them, so that no process outlives the fit
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
    labels = np.arange(len(languages))
    p_tr = clf.predict_proba(x_tr)
    p_te = clf.predict_proba(x_te)
    correct = int((p_te.argmax(1) == yte).sum())
    lo, hi = wilson_interval(correct, yte.size)
    return ProbeFit(
        test_accuracy=correct / yte.size,
        ci_low=lo,
        ci_high=hi,
        test_correct=correct,
        test_size=int(yte.size),
        train_accuracy=float((p_tr.argmax(1) == ytr).mean()),
        train_loss=float(log_loss(ytr, p_tr, labels=labels)),
        test_loss=float(log_loss(yte, p_te, labels=labels)),
        C=float(np.ravel(clf[-1].C_)[0]),
        cv_folds=folds,
        chance=1.0 / len(languages),
        languages=languages,
        classifier=clf,
    )


def population_erasure(x: np.ndarray, labels: Sequence[Any]) -> dict[str, float]:
    """L_C (mean |rho|, the paper's form) of a whole probe set, with its noise floor for that N and their ratio.

    The probe set holds hundreds of passages where a training step's erasure batch holds tens, so its floor is far
    lower and the ratio says how much language signal the embedding space holds, not how noisy one batch was."""
    import torch

    from lancer_dist.losses import erasure_terms

    names = sorted({str(v) for v in labels})
    index = {lang: i for i, lang in enumerate(names)}
    lang = torch.tensor([index[str(v)] for v in labels], dtype=torch.long)
    terms = erasure_terms(torch.as_tensor(np.asarray(x, np.float64)), lang, len(names))
    abs_ = float(terms.mean_abs)
    return {
        "erasure_abs": abs_,
        "erasure_floor": terms.floor,
        "erasure_over_floor": abs_ / terms.floor if terms.floor > 0 else float("nan"),
    }


def _usable_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _new_attributes() -> dict[str, Any]:
    """``use_legacy_attributes=False`` where scikit-learn has it (1.8+; it warns on every fit otherwise); ``C_`` is
    read so that both layouts work."""
    import inspect

    from sklearn.linear_model import LogisticRegressionCV

    params = inspect.signature(LogisticRegressionCV).parameters
    return {"use_legacy_attributes": False} if "use_legacy_attributes" in params else {}

"""Post-hoc language debiasing of any encoder's embeddings (the paper's LSAR and LEACE baselines, §4.3).

Both are affine maps ``x' = x @ A + c`` (:class:`Affine`), fitted once on multilingual passages with language
labels and then applied to every query and passage embedding (inside each search shard, so the stored embeddings
stay untouched).

* LSAR (Xie et al., 2022, "Discovering Low-rank Subspaces for Language-agnostic Multilingual Representations"):
  the language means M [D, L] are split into a shared component and a rank-r language-specific subspace by a
  low-rank approximation of the centred means (SVD); the shared component is re-chosen as the point of the fitted
  affine hull closest to the origin, the specific subspace is the span of the means minus that point, and every
  embedding is projected onto its orthogonal complement: ``x' = x (I - U_r U_r^T)``. With the default rank (the number
  of languages) the fitted hull is exact and the projected language means all coincide. Directions with a zero
  singular value carry no language signal and are dropped, so the effective rank is at most L - 1.
* LEACE (Belrose et al., 2023): the closed-form least-squares concept eraser of the ``concept-erasure`` package, with
  the one-hot language as the concept; afterwards no linear classifier beats a constant one on the fitting data
  and every dimension's covariance with every language indicator is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Affine", "fit_leace", "fit_lsar", "language_ids", "language_means"]


@dataclass
class Affine:
    """``x' = x @ A + c`` for embeddings x [N, D]; A [D, D], c [D] (float64 kept for fitting accuracy)."""

    A: np.ndarray
    c: np.ndarray
    name: str = "affine"

    def __call__(self, x_ND: np.ndarray) -> np.ndarray:
        x = np.asarray(x_ND, dtype=np.float32)
        return (x @ self.A.astype(np.float32) + self.c.astype(np.float32)).astype(np.float32)

    @staticmethod
    def identity(dim: int) -> Affine:
        return Affine(np.eye(dim), np.zeros(dim), "identity")


def language_ids(langs: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """String labels -> (int ids [N], sorted distinct languages)."""
    languages = sorted(set(langs))
    index = {lang: i for i, lang in enumerate(languages)}
    return np.array([index[lang] for lang in langs], dtype=np.int64), languages


def language_means(x_ND: np.ndarray, langs: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-language mean embeddings M [D, L] (columns in sorted language order) and the languages."""
    x = np.asarray(x_ND, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(langs):
        raise ValueError(f"x must be [N, D] with N = len(langs) = {len(langs)}, got shape {x.shape}")
    ids, languages = language_ids(langs)
    means = np.stack([x[ids == j].mean(0) for j in range(len(languages))], axis=1)
    return means, languages


def fit_lsar(x_ND: np.ndarray, langs: Sequence[str], rank: int = 0, tol: float = 1e-6) -> Affine:
    """Fit LSAR on embeddings x [N, D] with language labels; ``rank`` 0 = the number of languages."""
    W_DL, languages = language_means(x_ND, langs)
    D, L = W_DL.shape
    if L < 2:
        raise ValueError(f"LSAR needs passages of at least 2 languages, got {languages}")
    k = L if rank <= 0 else min(rank, L)
    ones_L = np.ones(L)
    # 1. Shared component + rank-k approximation of the centred means.
    wc_D = W_DL @ ones_L / L
    U, S, Vt = np.linalg.svd(W_DL - np.outer(wc_D, ones_L), full_matrices=False)
    Ws_DK, Gamma_LK = U[:, :k], Vt[:k].T * S[:k]
    fit_DL = np.outer(wc_D, ones_L) + Ws_DK @ Gamma_LK.T
    # 2. Re-choose the shared component as the point of the fitted affine hull nearest the origin
    #    (orthogonal to the hull's directions), so it is not removed with the language subspace.
    wc_new = np.linalg.pinv(fit_DL).T @ ones_L
    wc_new /= (wc_new**2).sum()
    specific_DL = fit_DL - np.outer(wc_new, ones_L)
    # 3. The language-specific subspace: the top-k left singular vectors of what remains.
    U2, S2, _ = np.linalg.svd(specific_DL, full_matrices=False)
    keep = S2[:k] > tol * max(float(S2[0]), 1e-300)
    Us_DR = U2[:, :k][:, keep]
    A = np.eye(D) - Us_DR @ Us_DR.T
    return Affine(A, np.zeros(D), "lsar")


def fit_leace(x_ND: np.ndarray, langs: Sequence[str]) -> Affine:
    """Fit LEACE (``concept_erasure.LeaceFitter``) with one-hot language labels as the concept."""
    import torch
    from concept_erasure import LeaceFitter

    ids, languages = language_ids(langs)
    if len(languages) < 2:
        raise ValueError(f"LEACE needs passages of at least 2 languages, got {languages}")
    x = torch.as_tensor(np.asarray(x_ND), dtype=torch.float64)
    z = torch.nn.functional.one_hot(torch.as_tensor(ids), len(languages)).to(torch.float64)
    eraser = LeaceFitter.fit(x, z).eraser
    D = x.shape[1]
    # The eraser is affine: read A and c off by applying it to 0 and to the identity.
    c = eraser(torch.zeros(1, D, dtype=torch.float64))[0]
    A = eraser(torch.eye(D, dtype=torch.float64)) - c
    return Affine(A.numpy(), c.numpy(), "leace")

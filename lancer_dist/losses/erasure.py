"""L_C: the language concept-erasure loss of paper §3.4, from all-reducible sufficient statistics.

For embeddings X [N, k] and one-hot language labels Z [N, n] the paper penalises the Pearson correlation between
every embedding dimension X_i and every language indicator Z_j:

    Sigma_XZ = E[(X - mean X)(Z - mean Z)^T]            (unbiased: divided by N - 1)
    rho_ij   = Sigma_XZ[i, j] / (sigma_X[i] * sigma_Z[j] + eps)
    L_C      = 1 / (n k) * sum_ij |rho_ij|

with sigma the unbiased standard deviations. ``eps`` (default 1e-8) is *our* addition to the paper's definition: it
keeps the loss finite when a language is absent from the batch (sigma_Z[j] = 0, and then Sigma_XZ[:, j] = 0 too,
so rho = 0) or an embedding dimension is constant (sigma_X[i] = 0). Standard deviations of zero variance are
defined as 0 with a zero gradient, so the gradients stay finite as well.

Everything is computed from the sufficient statistics count N, sum X, sum X^2, sum Z (= sum Z^2 for one-hot
labels) and sum X Z^T: small tensors ([k], [n], [k, n]) that are summed across ranks, so the correlation of the
GLOBAL batch costs one all-reduce of (2k + n + kn + 1) numbers, independent of the batch size. The statistics are
accumulated in float64 by default (cancellation in sum X^2 - (sum X)^2 / N is a float32 hazard).

Forms of the loss (``loss.erasure_form``; the paper's ``abs`` is the default)
------------------------------------------------------------------------------
* ``abs``:      L_C = mean_ij |rho_ij|                                 (paper §3.4)
* ``squared``:  mean_ij rho_ij^2
* ``debiased``: mean_ij ((N - 1) rho_ij^2 - 1) / (N - 2)   (Ezekiel's adjusted r^2; needs N >= 3)

The noise floor
---------------
With no language signal at all a sample correlation is not 0: for N rows it is spread around 0 with
E[r^2] = 1 / (N - 1) EXACTLY, for any data, when the labels are assigned at random (the permutation distribution of
Pearson's r has mean 0 and variance 1 / (N - 1)). When X is Gaussian and independent of Z (any fixed non-constant
Z, e.g. balanced one-hot columns), r is the cosine between a uniformly random direction of the (N - 1)-dimensional
centred space and a fixed one, so its density is (1 - r^2)^((N - 4) / 2) / B(1/2, (N - 2) / 2) and

    E|r| = Gamma((N - 1) / 2) / (sqrt(pi) * Gamma(N / 2))          ( ~ sqrt(2 / (pi (N - 1))) for large N )

(:func:`null_abs_correlation`: 0.1123 at N = 52, 0.0788 at N = 104, 0.0500 at N = 256). So each form has an
expectation under "no signal": E|r| for ``abs``, 1 / (N - 1) for ``squared``, and 0 for ``debiased`` (which is why it
is called so: it reads 0 at the floor). N is the GLOBAL batch: the floor is another reason the statistics must be
global. ``squared`` and ``debiased`` differ only by an affine map with slope (N - 1) / (N - 2): their gradients
point the same way; ``abs`` weighs every cell's gradient equally (sign(rho)), so it keeps pushing on cells that
are pure sampling noise, while the squared forms push in proportion to rho. tests/unit/test_erasure_floor.py checks
the floors by simulation; docs/science.md has the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# Sums a tensor across ranks with gradient (lancer_dist.dist.all_reduce_with_grad); identity in one process.
SumFn = Callable[[Tensor], Tensor]

ErasureForm = Literal["abs", "squared", "debiased"]
ERASURE_FORMS: tuple[str, ...] = ("abs", "squared", "debiased")


@dataclass
class CorrelationStats:
    """Sufficient statistics of (X [N, k], one-hot Z [N, n])."""

    count: Tensor  # [] number of rows N
    sum_x: Tensor  # [k]
    sum_x2: Tensor  # [k]
    sum_z: Tensor  # [n]  (also sum Z^2, Z being 0/1)
    sum_xz: Tensor  # [k, n]

    def flatten(self) -> Tensor:
        """All statistics in one flat vector (one collective instead of five)."""
        return torch.cat(
            [self.count.reshape(1), self.sum_x, self.sum_x2, self.sum_z, self.sum_xz.reshape(-1)],
        )

    @staticmethod
    def unflatten(flat: Tensor, k: int, n: int) -> CorrelationStats:
        sizes = [1, k, k, n, k * n]
        count, sx, sx2, sz, sxz = torch.split(flat, sizes)
        return CorrelationStats(count.reshape(()), sx, sx2, sz, sxz.reshape(k, n))

    def reduce(self, sum_fn: SumFn | None) -> CorrelationStats:
        """Sum the statistics over ranks with ``sum_fn`` (gradient preserving); identity when None."""
        if sum_fn is None:
            return self
        k, n = self.sum_xz.shape
        return CorrelationStats.unflatten(sum_fn(self.flatten()), k, n)


def _one_hot(languages: Tensor, num_languages: int, dtype: torch.dtype) -> Tensor:
    if languages.dim() != 1:
        raise ValueError(f"languages must be a 1-d tensor of integer ids, got shape {tuple(languages.shape)}")
    if languages.numel() and (int(languages.min()) < 0 or int(languages.max()) >= num_languages):
        raise ValueError(
            f"language ids must lie in [0, {num_languages}), got min {int(languages.min())}, "
            f"max {int(languages.max())}"
        )
    return torch.nn.functional.one_hot(languages.long(), num_languages).to(dtype)


def correlation_stats(
    x: Tensor, languages: Tensor, num_languages: int, dtype: torch.dtype = torch.float64
) -> CorrelationStats:
    """Local sufficient statistics of embeddings ``x`` [N, k] and integer language ids ``languages`` [N]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, k], got shape {tuple(x.shape)}")
    if languages.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but languages has {languages.shape[0]}")
    x_NK = x.to(dtype)
    z_NL = _one_hot(languages.to(x.device), num_languages, dtype)
    return CorrelationStats(
        count=torch.tensor(float(x.shape[0]), dtype=dtype, device=x.device),
        sum_x=x_NK.sum(0),
        sum_x2=(x_NK * x_NK).sum(0),
        sum_z=z_NL.sum(0),
        sum_xz=x_NK.T @ z_NL,
    )


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with sqrt(v <= 0) = 0 and a zero (not infinite or NaN) gradient there."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def correlation_from_stats(stats: CorrelationStats, eps: float = 1e-8) -> Tensor:
    """The [k, n] Pearson correlation matrix from (global) sufficient statistics."""
    n = stats.count
    if float(n.detach()) < 2:
        raise ValueError(
            f"the correlation needs at least 2 rows in the (global) batch, got {float(n.detach()):.0f}"
        )
    mean_x = stats.sum_x / n
    mean_z = stats.sum_z / n
    cov_KL = (stats.sum_xz - n * torch.outer(mean_x, mean_z)) / (n - 1)
    var_x = (stats.sum_x2 - n * mean_x * mean_x) / (n - 1)
    var_z = (stats.sum_z - n * mean_z * mean_z) / (n - 1)
    std_x = _safe_sqrt(var_x)
    std_z = _safe_sqrt(var_z)
    return cov_KL / (torch.outer(std_x, std_z) + eps)


def language_correlation(
    x: Tensor,
    languages: Tensor,
    num_languages: int,
    *,
    eps: float = 1e-8,
    sum_fn: SumFn | None = None,
) -> Tensor:
    """Pearson correlation [k, n] between each embedding dimension of ``x`` [N, k] and each one-hot language column.

    Args:
        x: [N, k] embeddings.
        languages: [N] integer language ids, each < ``num_languages``.
        num_languages: n, the number of one-hot columns (absent languages give a zero column).
        eps: added to sigma_X * sigma_Z (see the module docstring).
        sum_fn: sums the statistics across ranks with gradient (``lancer_dist.dist.all_reduce_with_grad``); then
            the correlation is that of the global batch. None = this process's batch only.

    Returns a [k, n] tensor in float64 (the statistics' dtype); cast as needed.
    """
    stats = correlation_stats(x, languages, num_languages).reduce(sum_fn)
    return correlation_from_stats(stats, eps)


def null_abs_correlation(n: float) -> float:
    """E|r| of a Pearson correlation over ``n`` rows with no signal (Gaussian X independent of Z; module docstring):
    Gamma((n - 1) / 2) / (sqrt(pi) Gamma(n / 2)). 1 at n = 2 (two points always correlate perfectly)."""
    if n < 2:
        raise ValueError(f"the correlation needs at least 2 rows, got {n}")
    return math.exp(math.lgamma((n - 1) / 2) - math.lgamma(n / 2)) / math.sqrt(math.pi)


def null_expectation(form: str, n: float) -> float:
    """The expected value of the erasure loss ``form`` per non-degenerate cell when there is no language signal."""
    if form == "abs":
        return null_abs_correlation(n)
    if form == "squared":
        return 1.0 / (n - 1)
    if form == "debiased":
        return 0.0
    raise ValueError(f"erasure form must be one of {ERASURE_FORMS}, got {form!r}")


def erasure_from_correlation(
    rho_KL: Tensor, count: float, form: str = "abs", live_KL: Tensor | None = None
) -> Tensor:
    """Reduce a [k, n] correlation matrix over ``count`` rows to the scalar loss of the given form.

    ``live_KL`` (bool [k, n], default all) marks the cells that can correlate at all; the debiased form counts the
    others (rho = 0 by construction: an absent language, a constant dimension) as 0 rather than -1 / (N - 2), so
    that it reads 0 with no language signal whatever languages the batch holds."""
    if form == "abs":
        return rho_KL.abs().mean()
    if form == "squared":
        return (rho_KL * rho_KL).mean()
    if form == "debiased":
        if count < 3:
            raise ValueError(
                f"the debiased erasure loss needs at least 3 rows in the (global) batch, got {count}"
            )
        adj_KL = ((count - 1) * rho_KL * rho_KL - 1) / (count - 2)
        if live_KL is not None:
            adj_KL = torch.where(live_KL, adj_KL, torch.zeros_like(adj_KL))
        return adj_KL.mean()
    raise ValueError(f"erasure form must be one of {ERASURE_FORMS}, got {form!r}")


@dataclass
class ErasureTerms:
    """The erasure loss of one (global) batch with what it takes to read it."""

    loss: Tensor  # [] the loss of the chosen form (with autograd when the input had it)
    mean_abs: Tensor  # [] mean |rho| (the paper's L_C), detached
    floor: float  # E[mean |rho|] with no language signal for this batch's N and degenerate cells
    count: float  # N, the global number of rows


def erasure_terms_from_stats(stats: CorrelationStats, form: str = "abs", eps: float = 1e-8) -> ErasureTerms:
    """The loss of ``form`` from (global) statistics, mean |rho|, and its noise floor.

    The floor is E|r| for N rows (:func:`null_abs_correlation`) times the fraction of cells that can correlate
    at all: cells of an absent (or all-rows) language or a constant dimension have rho = 0 by construction."""
    rho_KL = correlation_from_stats(stats, eps)
    n = float(stats.count.detach())
    with torch.no_grad():
        # a dimension is constant when its variance is at rounding level of its second moment
        var_x = stats.sum_x2 - stats.sum_x * stats.sum_x / stats.count
        live_x = var_x > 1e-12 * stats.sum_x2.abs() / stats.count
        live_z = (stats.sum_z > 0) & (stats.sum_z < stats.count)
        live_KL = torch.outer(live_x, live_z)
    loss = erasure_from_correlation(rho_KL, n, form, live_KL)
    return ErasureTerms(
        loss=loss,
        mean_abs=rho_KL.detach().abs().mean(),
        floor=null_abs_correlation(n) * float(live_KL.double().mean()),
        count=n,
    )


def erasure_stats_gradient(
    stats: CorrelationStats, form: str = "abs", eps: float = 1e-8
) -> tuple[ErasureTerms, CorrelationStats]:
    """The erasure terms of (global, detached) statistics and the gradient of the loss w.r.t. each statistic.

    For micro-batched erasure (``lancer_dist.train.erasure_chunks``): since every statistic is a sum over rows,
    ``(correlation_stats(x_chunk, ...).flatten() * grad.flatten()).sum()`` has, w.r.t. ``x_chunk``, exactly the
    gradient of the loss of the whole batch w.r.t. those rows. The count's gradient is returned but unused (N does
    not depend on x)."""
    k, n = stats.sum_xz.shape
    flat = stats.flatten().detach().requires_grad_(True)
    with torch.enable_grad():
        terms = erasure_terms_from_stats(CorrelationStats.unflatten(flat, k, n), form, eps)
        (grad,) = torch.autograd.grad(terms.loss, flat)
    terms.loss = terms.loss.detach()
    return terms, CorrelationStats.unflatten(grad, k, n)


def erasure_terms(
    x: Tensor,
    languages: Tensor,
    num_languages: int,
    *,
    form: str = "abs",
    eps: float = 1e-8,
    sum_fn: SumFn | None = None,
) -> ErasureTerms:
    """:func:`erasure_terms_from_stats` on the statistics of ``x`` [N, k] (summed over ranks by ``sum_fn``)."""
    stats = correlation_stats(x, languages, num_languages).reduce(sum_fn)
    return erasure_terms_from_stats(stats, form, eps)


def erasure_loss(
    x: Tensor,
    languages: Tensor,
    num_languages: int,
    *,
    eps: float = 1e-8,
    sum_fn: SumFn | None = None,
    form: str = "abs",
) -> Tensor:
    """L_C = mean absolute Pearson correlation between embedding dimensions and language labels (paper §3.4);
    ``form`` selects a variant (module docstring).

    Same arguments as :func:`language_correlation`; returns a scalar in ``x``'s dtype.
    """
    return erasure_terms(x, languages, num_languages, form=form, eps=eps, sum_fn=sum_fn).loss.to(x.dtype)

"""N ranks with per-rank batch B/N == one process with batch B: loss, input gradients, parameters after a step.

Every test runs real processes on a gloo group (127.0.0.1) in float64 and compares to a single-process reference
on the concatenated batch, to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from lancer_dist.dist import ProcessGroupCollectives
from lancer_dist.losses import contrastive_loss, erasure_loss, lancer_loss, null_abs_correlation
from tests.distributed.harness import run_distributed

TOL = 1e-10
G = 3  # group size: 1 positive + 2 hard negatives
D = 8
NUM_LANG = 4


def _retrieval_data(b: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, D, generator=g, dtype=dtype)
    p = torch.randn(b * G, D, generator=g, dtype=dtype)
    return q, p


def _erasure_data(m: int, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, D, generator=g, dtype=dtype)
    lang = torch.randint(0, NUM_LANG, (m,), generator=g)
    x = x + 0.7 * torch.nn.functional.one_hot(lang, D).to(dtype)  # language-correlated dims
    return x, lang


def _slices(sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


# ---- the per-rank programs (module level: spawned processes import them) ----------------------------------------


def _rank_lancer(
    rank: int,
    world: int,
    q_sizes: list[int],
    x_sizes: list[int],
    weight: float,
    dtype_name: str,
    form: str = "abs",
):
    dtype = getattr(torch, dtype_name)
    q, p = _retrieval_data(sum(q_sizes), dtype=dtype)
    x, lang = _erasure_data(sum(x_sizes), dtype=dtype)
    qs, xs = _slices(q_sizes)[rank], _slices(x_sizes)[rank]
    ps = slice(qs.start * G, qs.stop * G)
    q_r = q[qs].clone().requires_grad_(True)
    p_r = p[ps].clone().requires_grad_(True)
    x_r = x[xs].clone().requires_grad_(True)
    out = lancer_loss(
        q_r,
        p_r,
        G,
        x_r,
        lang[xs],
        NUM_LANG,
        temperature=0.5,
        erasure_weight=weight,
        erasure_form=form,
        collectives=ProcessGroupCollectives(),
    )
    out.loss.backward()
    # Data-parallel training averages gradients over ranks: divide by world size.
    return {
        "total": out.total,
        "retrieval": out.retrieval,
        "erasure": out.erasure,
        "gq": q_r.grad / world,
        "gp": p_r.grad / world,
        "gx": (x_r.grad if x_r.grad is not None else torch.zeros_like(x_r)) / world,
        "pool": out.num_passages,
        "erasure_abs": out.erasure_abs,
        "floor": out.erasure_floor,
    }


def _reference_lancer(q_sizes, x_sizes, weight, dtype=torch.float64, form="abs"):
    q, p = _retrieval_data(sum(q_sizes), dtype=dtype)
    x, lang = _erasure_data(sum(x_sizes), dtype=dtype)
    q.requires_grad_(True)
    p.requires_grad_(True)
    x.requires_grad_(True)
    b = q.shape[0]
    lr = contrastive_loss(q, p, torch.arange(b) * G, temperature=0.5)
    lc = erasure_loss(x if weight > 0 else x.detach(), lang, NUM_LANG, form=form)
    total = lr + weight * lc
    total.backward()
    return {
        "total": total.detach(),
        "retrieval": lr.detach(),
        "erasure": lc.detach(),
        "gq": q.grad,
        "gp": p.grad,
        "gx": x.grad if x.grad is not None else torch.zeros_like(x),
        "q_sizes": q_sizes,
        "x_sizes": x_sizes,
    }


def _compare(results, ref, tol):
    q_sl = _slices(ref["q_sizes"])
    x_sl = _slices(ref["x_sizes"])
    worst = 0.0
    for r, res in enumerate(results):
        for key in ("total", "retrieval", "erasure"):
            worst = max(worst, float((res[key] - ref[key]).abs()))
        ps = slice(q_sl[r].start * G, q_sl[r].stop * G)
        worst = max(worst, float((res["gq"] - ref["gq"][q_sl[r]]).abs().max()))
        worst = max(worst, float((res["gp"] - ref["gp"][ps]).abs().max()))
        if res["gx"].numel():
            worst = max(worst, float((res["gx"] - ref["gx"][x_sl[r]]).abs().max()))
        assert res["pool"] == sum(ref["q_sizes"]) * G
    assert worst <= tol, f"max abs difference {worst:.3e} > {tol:.0e}"
    return worst


@pytest.mark.parametrize("world", [2, 3])
def test_contrastive_with_gathered_negatives(tmp_path, world):
    q_sizes, x_sizes = [2] * world, [4] * world
    res = run_distributed(_rank_lancer, world, tmp_path, q_sizes, x_sizes, 0.0, "float64")
    ref = _reference_lancer(q_sizes, x_sizes, 0.0)
    _compare(res, ref, TOL)
    assert all(float(r["gx"].abs().max()) == 0.0 for r in res)  # weight 0: no erasure gradient


@pytest.mark.parametrize("world", [2, 3])
def test_erasure_loss_with_all_reduced_statistics(tmp_path, world):
    # Erasure-only comparison: the retrieval part is exact too, so compare the sum with a large weight as well.
    q_sizes, x_sizes = [1] * world, [5] * world
    res = run_distributed(_rank_lancer, world, tmp_path, q_sizes, x_sizes, 1.0, "float64")
    ref = _reference_lancer(q_sizes, x_sizes, 1.0)
    _compare(res, ref, TOL)
    # The erasure loss is the global one on every rank (not an average of per-rank correlations).
    assert all(abs(float(r["erasure"] - ref["erasure"])) <= TOL for r in res)
    assert float(ref["erasure"]) > 0.05


def test_unequal_per_rank_batches_are_exact(tmp_path):
    q_sizes, x_sizes = [1, 2, 3], [3, 5, 2]
    res = run_distributed(_rank_lancer, 3, tmp_path, q_sizes, x_sizes, 1.0, "float64")
    _compare(res, _reference_lancer(q_sizes, x_sizes, 1.0), TOL)


def test_float32_difference_is_small(tmp_path):
    """float32: the same comparison holds to ~1e-6 (documented in docs/design.md)."""
    q_sizes, x_sizes = [4, 4], [8, 8]
    res = run_distributed(_rank_lancer, 2, tmp_path, q_sizes, x_sizes, 1.0, "float32")
    ref = _reference_lancer(q_sizes, x_sizes, 1.0, dtype=torch.float32)
    worst = _compare(res, ref, 1e-5)
    print(f"float32 max abs difference: {worst:.2e}")


@pytest.mark.parametrize("form", ["abs", "squared", "debiased"])
def test_every_erasure_form_is_global(tmp_path, form):
    """Each form of L_C (and the logged mean |rho| and floor) is that of the global batch: 2 ranks with unequal
    erasure batches == one process on the concatenation, loss and gradients to 1e-10 in float64."""
    q_sizes, x_sizes = [2, 1], [7, 5]
    res = run_distributed(_rank_lancer, 2, tmp_path, q_sizes, x_sizes, 1.0, "float64", form)
    ref = _reference_lancer(q_sizes, x_sizes, 1.0, form=form)
    _compare(res, ref, TOL)
    x, lang = _erasure_data(sum(x_sizes))
    ref_abs = float(erasure_loss(x, lang, NUM_LANG, form="abs"))
    for r in res:
        assert abs(r["erasure_abs"] - ref_abs) <= TOL
        assert r["floor"] == pytest.approx(null_abs_correlation(12), abs=1e-15)  # N = 12 global, not 7 or 5
    # the forms are different functions (a test that passed one form's reference to another would fail)
    others = {f: float(erasure_loss(x, lang, NUM_LANG, form=f)) for f in ("abs", "squared", "debiased")}
    assert len({round(v, 6) for v in others.values()}) == 3

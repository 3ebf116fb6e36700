"""Micro-batched erasure under real DDP on 2 gloo ranks == one process on the full batch (float64, 1e-10), dropout ON.

Each rank runs what the trainer's ``loss.erasure_chunk`` step runs: the two-pass erasure over its micro-batches with
every backward under ``DDP.no_sync``, then the retrieval forward + backward (the synced one, which averages the
accumulated gradients over ranks). The reference, in one process, encodes every rank's micro-batches WITH autograd
(from that rank's seed, in the same order: the same dropout masks), then that rank's queries and passages, and
back-propagates the plain one-shot ``lancer_loss`` on the concatenated global batch.
"""

from __future__ import annotations

import pytest
import torch

from lancer_dist.dist import ProcessGroupCollectives
from lancer_dist.losses import lancer_loss
from lancer_dist.train.erasure_chunks import chunked_erasure_backward
from tests.distributed.harness import run_distributed
from tests.erasure_chunk_cases import NUM_LANG, G, erasure_batch, grads, passages, tiny_model, token_batch

TOL = 1e-10
B, M, CHUNK = 4, 12, 4  # global queries, global erasure passages, micro-batch


def _global():  # type: ignore[no-untyped-def]
    return token_batch(B, 6, 1), token_batch(B * G, 9, 2), erasure_batch(M)


def _share(rank: int, world: int):  # type: ignore[no-untyped-def]
    (qi, qm), (pi, pm), (xi, xm, lang) = _global()
    b, m = B // world, M // world
    qs, ps, xs = (
        slice(rank * b, (rank + 1) * b),
        slice(rank * b * G, (rank + 1) * b * G),
        slice(rank * m, (rank + 1) * m),
    )
    return (qi[qs], qm[qs]), (pi[ps], pm[ps]), (xi[xs], xm[xs], lang[xs])


FORMS = ("abs", "squared", "debiased")


def _rank_program(rank: int, world: int):
    """One spawn for every form (a spawn costs seconds): the step per form, gradients zeroed in between."""
    return {form: _rank_step(rank, world, form) for form in FORMS}


def _rank_step(rank: int, world: int, form: str):  # type: ignore[no-untyped-def]
    from torch.nn.parallel import DistributedDataParallel as DDP

    (qi, qm), (pi, pm), (xi, xm, lang) = _share(rank, world)
    model = tiny_model(dropout=0.1)
    ddp = DDP(model)
    with torch.no_grad():
        diff = float((passages(model)(xi, xm) - passages(model)(xi, xm)).abs().max())
    pg = ProcessGroupCollectives()
    torch.manual_seed(100 + rank)
    terms = chunked_erasure_backward(
        passages(model),
        lambda ids, mask: ddp(passage_input_ids=ids, passage_attention_mask=mask)[1],
        xi,
        xm,
        lang,
        NUM_LANG,
        CHUNK,
        form=form,
        collectives=pg,
        context=ddp.no_sync,
    )
    qe, pe, _ = ddp(qi, qm, pi, pm)
    out = lancer_loss(qe, pe, G, None, None, NUM_LANG, temperature=0.2, collectives=pg)
    out.loss.backward()
    return {
        "erasure": terms.loss,
        "retrieval": out.retrieval,
        "grads": grads(model),
        "dropout_diff": diff,
        "floor": terms.floor,
    }


def _reference(world: int, form: str):  # type: ignore[no-untyped-def]
    model = tiny_model(dropout=0.1)
    xs, qs, ps = [], [], []
    for r in range(world):
        (qi, qm), (pi, pm), (xi, xm, _) = _share(r, world)
        torch.manual_seed(100 + r)
        xs += [passages(model)(xi[i : i + CHUNK], xm[i : i + CHUNK]) for i in range(0, xi.shape[0], CHUNK)]
        q, p, _ = model(qi, qm, pi, pm)
        qs.append(q)
        ps.append(p)
    lang = _global()[2][2]
    out = lancer_loss(
        torch.cat(qs), torch.cat(ps), G, torch.cat(xs), lang, NUM_LANG, temperature=0.2, erasure_form=form
    )
    out.loss.backward()
    return out, grads(model)


def test_chunked_erasure_under_ddp_equals_one_process(tmp_path):
    results = run_distributed(_rank_program, 2, tmp_path)
    for form in FORMS:
        _check(form, [r[form] for r in results])


def _check(form: str, res: list) -> None:
    ref, ref_g = _reference(2, form)
    assert float(ref.erasure_abs) > 0.05
    for r in res:
        assert r["dropout_diff"] > 1e-3  # dropout is really on
        assert abs(float(r["erasure"] - ref.erasure)) <= TOL
        assert abs(float(r["retrieval"] - ref.retrieval)) <= TOL
        assert r["floor"] == pytest.approx(ref.erasure_floor, abs=1e-15)  # the floor of the global N = 12
        assert float((r["grads"] - ref_g).abs().max()) <= TOL

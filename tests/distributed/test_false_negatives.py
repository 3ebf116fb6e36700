"""False-negative masking across ranks: the same positive document on 2 ranks (gloo, 127.0.0.1, float64).

The masked loss and gradients of 2 processes equal (1e-10) one process on the full batch with masking, AND the
plain-torch loss of the deduplicated batch (each query's softmax over its kept columns only). The ids cross ranks
through ``lancer_dist.dist`` (``ProcessGroupCollectives.gather_strings``); without them the gathered copy on the
other rank would stay a negative and the comparison with the deduplicated reference would fail.
"""

from __future__ import annotations

from lancer_dist.dist import ProcessGroupCollectives
from lancer_dist.losses import lancer_loss
from tests.unit.test_false_negatives import G, T, _data, _reference_torch

TOL = 1e-10
# rank 0: q0 (positive d1), q1 (positive d2); rank 1: q2 (positive d1 again: the same document), q3 (d4, whose
# hard negative is d2 = q1's positive). One passage on rank 1 has no id.
DOC_IDS = ["d1", "a", "b", "d2", "c", "e", "d1", "f", "", "d4", "d2", "g"]
POSITIVES = [["d1"], ["d2"], ["d1"], ["d4"]]


def _rank_masked(rank: int, world: int):
    q, p = _data(4, seed=5)
    qs, ps = slice(rank * 2, rank * 2 + 2), slice(rank * 2 * G, (rank * 2 + 2) * G)
    q_r = q[qs].clone().requires_grad_(True)
    p_r = p[ps].clone().requires_grad_(True)
    out = lancer_loss(
        q_r,
        p_r,
        G,
        temperature=T,
        collectives=ProcessGroupCollectives(),
        passage_doc_ids=DOC_IDS[ps],
        query_positive_ids=POSITIVES[qs],
    )
    out.loss.backward()
    return {
        "retrieval": out.retrieval,
        "gq": q_r.grad / world,  # data-parallel averaging
        "gp": p_r.grad / world,
        "masked": out.negatives_masked,
        "no_id": out.passages_without_docid,
    }


def test_duplicate_positive_on_two_ranks_is_masked_exactly(tmp_path):
    from tests.distributed.harness import run_distributed

    res = run_distributed(_rank_masked, 2, tmp_path)
    # one process, full batch, masking on
    q, p = _data(4, seed=5)
    q1, p1 = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    one = lancer_loss(q1, p1, G, temperature=T, passage_doc_ids=DOC_IDS, query_positive_ids=POSITIVES)
    one.loss.backward()
    # the deduplicated batch, computed without any mask
    q2, p2 = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    ref = _reference_torch(q2, p2, DOC_IDS, POSITIVES)
    ref.backward()
    assert abs(float(one.retrieval) - float(ref.detach())) <= TOL
    for r, out in enumerate(res):
        qs, ps = slice(r * 2, r * 2 + 2), slice(r * 2 * G, (r * 2 + 2) * G)
        assert abs(float(out["retrieval"]) - float(ref.detach())) <= TOL
        for grad in (q1.grad, q2.grad):
            assert float((out["gq"] - grad[qs]).abs().max()) <= TOL
        for grad in (p1.grad, p2.grad):
            assert float((out["gp"] - grad[ps]).abs().max()) <= TOL
        # q0 and q2 mask each other's d1, q3 masks nothing, q1 masks q3's negative d2: 3 pairs, global count
        assert out["masked"] == one.negatives_masked == 3
        assert out["no_id"] == 1
    # the duplicate matters: without masking the loss differs
    plain = lancer_loss(q, p, G, temperature=T)
    assert abs(float(plain.retrieval) - float(ref.detach())) > 1e-3

"""False-negative masking against an independent reference: InfoNCE on the batch with the duplicate columns dropped,
computed per query in numpy (loss) and in plain torch over the kept columns only (gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lancer_dist.losses import NO_DOC, contrastive_loss, false_negative_mask, lancer_loss

G = 3
T = 0.5


def _data(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 6, generator=g, dtype=torch.float64),
        torch.randn(b * G, 6, generator=g, dtype=torch.float64),
    )


# 4 groups (positive first). d1 is q0's positive and reappears as q2's hard negative and q3's positive; q1's
# second stored positive d9 is q3's hard negative; q2's group has a passage without an id; q0's own group holds a
# second copy of its positive as a hard negative.
DOC_IDS = ["d1", "n1", "d1", "d2", "n2", "n3", "d3", "d1", "", "d1", "d9", "n4"]
POSITIVES = [["d1"], ["d2", "d9"], ["d3"], ["d1"]]


def _kept_columns(doc_ids, positives, b):
    """Which columns each query keeps, by the definition (not by the code under test)."""
    kept = []
    for i in range(b):
        pos = i * G
        kept.append(
            [j for j in range(len(doc_ids)) if j == pos or not doc_ids[j] or doc_ids[j] not in positives[i]]
        )
    return kept


def _reference_numpy(q, p, doc_ids, positives):
    s = (q @ p.T / T).numpy()
    out = []
    for i, cols in enumerate(_kept_columns(doc_ids, positives, q.shape[0])):
        row = s[i, cols]
        m = row.max()
        out.append(-(s[i, i * G] - (m + np.log(np.exp(row - m).sum()))))
    return float(np.mean(out))


def _reference_torch(q, p, doc_ids, positives):
    """Plain torch: each query's logsumexp over its kept columns only (no mask, no -inf)."""
    losses = []
    for i, cols in enumerate(_kept_columns(doc_ids, positives, q.shape[0])):
        s = q[i] @ p[cols].T / T
        losses.append(torch.logsumexp(s, 0) - q[i] @ p[i * G] / T)
    return torch.stack(losses).mean()


def test_mask_marks_exactly_the_duplicates():
    vocab = {d: k for k, d in enumerate(sorted({d for d in DOC_IDS if d} | {"d9"}))}
    doc = torch.tensor([vocab[d] if d else NO_DOC for d in DOC_IDS])
    pos_ids = torch.tensor([[vocab[d] for d in ps] + [NO_DOC] * (2 - len(ps)) for ps in POSITIVES])
    mask = false_negative_mask(pos_ids, doc, torch.arange(4) * G)
    expected = torch.zeros(4, 12, dtype=torch.bool)
    expected[0, [2, 7, 9]] = True  # q0 (d1): its own group's copy, q2's negative, q3's positive
    expected[1, [10]] = True  # q1 (d2, d9): q3's hard negative d9
    expected[3, [0, 2, 7]] = True  # q3 (d1): every other d1
    assert torch.equal(mask, expected)


def test_masked_loss_equals_the_deduplicated_batch():
    q, p = _data(4)
    q.requires_grad_(True)
    p.requires_grad_(True)
    out = lancer_loss(q, p, G, temperature=T, passage_doc_ids=DOC_IDS, query_positive_ids=POSITIVES)
    out.loss.backward()
    gq, gp = q.grad.clone(), p.grad.clone()
    q.grad = p.grad = None
    ref = _reference_torch(q, p, DOC_IDS, POSITIVES)
    ref.backward()
    assert abs(float(out.retrieval) - _reference_numpy(q.detach(), p.detach(), DOC_IDS, POSITIVES)) <= 1e-12
    assert abs(float(out.loss.detach()) - float(ref.detach())) <= 1e-12
    assert float((gq - q.grad).abs().max()) <= 1e-12 and float((gp - p.grad).abs().max()) <= 1e-12
    assert out.negatives_masked == 7 and out.passages_without_docid == 1
    # and it is a different loss from the unmasked one (the test can fail)
    plain = lancer_loss(q, p, G, temperature=T)
    assert abs(float(plain.retrieval) - float(out.retrieval)) > 1e-3
    assert plain.negatives_masked == 0 and plain.passages_without_docid == -1


def test_default_positive_is_the_positive_column_and_empty_ids_never_mask():
    q, p = _data(4, seed=2)
    out = lancer_loss(q, p, G, temperature=T, passage_doc_ids=DOC_IDS)  # positives: only the sampled one
    only = [[DOC_IDS[i * G]] for i in range(4)]
    assert abs(float(out.retrieval) - _reference_numpy(q, p, DOC_IDS, only)) <= 1e-12
    assert out.negatives_masked == 6
    # a batch without any ids: nothing masked, every passage counted, the paper's loss
    none = lancer_loss(q, p, G, temperature=T, passage_doc_ids=[""] * 12, query_positive_ids=[[""]] * 4)
    assert none.negatives_masked == 0 and none.passages_without_docid == 12
    assert float(none.retrieval) == pytest.approx(
        float(lancer_loss(q, p, G, temperature=T).retrieval), abs=1e-15
    )


def test_masking_the_positive_or_wrong_lengths_are_rejected():
    q, p = _data(2)
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[1, 3] = True
    with pytest.raises(ValueError, match="own positive"):
        contrastive_loss(q, p, torch.tensor([0, 3]), mask=bad)
    with pytest.raises(ValueError, match="6 passages but 5 document ids"):
        lancer_loss(q, p, G, passage_doc_ids=["a"] * 5)
    with pytest.raises(ValueError, match="2 queries but 1 positive-id lists"):
        lancer_loss(q, p, G, passage_doc_ids=["a"] * 6, query_positive_ids=[["a"]])

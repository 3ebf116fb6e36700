"""Micro-batched erasure (loss.erasure_chunk) == the one-shot loss on the same dropout masks, in one process.

The reference keeps the whole graph: the micro-batches are encoded WITH autograd in order from the same RNG state
(so each draws the masks the two-pass scheme draws in pass 1), L_C is computed once on the concatenation by the
library's plain ``erasure_loss``, and back-propagated. Dropout is ON (asserted), so a wrong RNG replay fails;
``test_without_rng_replay_the_gradients_differ`` shows that it would.
"""

from __future__ import annotations

import pytest
import torch

from lancer_dist.losses import erasure_loss
from lancer_dist.train import parallel
from lancer_dist.train.erasure_chunks import chunked_erasure_backward
from tests.erasure_chunk_cases import NUM_LANG, erasure_batch, grads, passages, tiny_model

TOL = 1e-10
M = 10


def _reference(model, ids, mask, lang, chunk, weight, form):
    torch.manual_seed(7)
    x = torch.cat([passages(model)(ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, M, chunk)])
    loss = erasure_loss(x, lang, NUM_LANG, form=form)
    (weight * loss).backward()
    return loss.detach(), grads(model), torch.rand(3)


def _chunked(model, ids, mask, lang, chunk, weight, form):
    torch.manual_seed(7)
    enc = passages(model)
    terms = chunked_erasure_backward(
        enc, enc, ids, mask, lang, NUM_LANG, chunk, erasure_weight=weight, form=form
    )
    return terms, grads(model), torch.rand(3)


@pytest.mark.parametrize(("chunk", "form"), [(3, "abs"), (4, "squared"), (1, "debiased"), (M, "abs")])
def test_chunked_erasure_equals_one_shot_with_dropout(chunk, form):
    ids, mask, lang = erasure_batch(M)
    model = tiny_model(dropout=0.1)
    with torch.no_grad():
        e1, e2 = passages(model)(ids, mask), passages(model)(ids, mask)
    assert float((e1 - e2).abs().max()) > 1e-3  # dropout is really on
    ref_loss, ref_g, ref_rng = _reference(model, ids, mask, lang, chunk, 0.7, form)
    model.zero_grad(set_to_none=True)
    terms, g, rng = _chunked(model, ids, mask, lang, chunk, 0.7, form)
    assert abs(float(terms.loss - ref_loss)) <= TOL
    assert float(ref_g.abs().max()) > 1e-4  # a real gradient
    assert float((g - ref_g).abs().max()) <= TOL
    assert torch.equal(rng, ref_rng)  # the RNG stream continues as after one encoding of the passages
    if form == "abs":
        assert abs(float(terms.mean_abs) - float(ref_loss)) <= TOL


def test_without_rng_replay_the_gradients_differ(monkeypatch):
    ids, mask, lang = erasure_batch(M)
    model = tiny_model(dropout=0.1)
    _, ref_g, _ = _reference(model, ids, mask, lang, 3, 1.0, "abs")
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(parallel.RngState, "restore", lambda self: None)
    _, g, _ = _chunked(model, ids, mask, lang, 3, 1.0, "abs")
    assert float((g - ref_g).abs().max()) > 1e-6


def test_weight_zero_measures_without_gradient():
    ids, mask, lang = erasure_batch(M)
    model = tiny_model(dropout=0.0)
    enc = passages(model)
    terms = chunked_erasure_backward(enc, enc, ids, mask, lang, NUM_LANG, 4, erasure_weight=0.0)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert float(terms.loss) == pytest.approx(
            float(erasure_loss(enc(ids, mask), lang, NUM_LANG)), abs=TOL
        )


def test_bad_chunk_size():
    ids, mask, lang = erasure_batch(4)
    enc = passages(tiny_model())
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_erasure_backward(enc, enc, ids, mask, lang, NUM_LANG, 0)

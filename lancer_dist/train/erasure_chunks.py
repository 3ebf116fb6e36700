"""Exact L_C over an erasure batch larger than one forward: statistics accumulated over micro-batches.

L_C is a function of the GLOBAL sufficient statistics S = (N, sum x, sum x^2, sum z, sum x z^T) only
(``lancer_dist.losses.erasure``), and every row enters S through a sum. So ``loss.erasure_chunk = c`` runs:

* pass 1, no graph: encode the erasure passages c at a time, recording each micro-batch's RNG state, and add up
  their statistics; sum them over ranks (one all-reduce of 2k + n + kn + 1 numbers); compute L_C(S) and
  g = dL_C / dS by autograd on those few numbers (``erasure_stats_gradient``);
* pass 2: re-encode each micro-batch WITH a graph, its RNG state replayed (the same dropout masks as in pass 1),
  and back-propagate the surrogate ``world_size * erasure_weight * <S(x_chunk), g>``. Its gradient w.r.t. the
  micro-batch's embeddings is exactly the one-shot loss's (chain rule through sums), hence so are the parameter
  gradients. The ``world_size`` factor matches ``lancer_dist.dist.all_reduce_with_grad``: each rank back-propagates
  N x its share and data parallelism averages over ranks.

Memory: one micro-batch's activations plus the statistics; not even the [M, D] embeddings are kept (gradient caching,
``train.grad_cache_chunk_size``, keeps those). Cost: every erasure passage is encoded twice. "Exact" means: equal to
the one-shot loss on the SAME dropout masks, those of the micro-batches encoded in order
(``tests/unit/test_erasure_chunks.py``, ``tests/distributed/test_erasure_chunks.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from lancer_dist.losses import CorrelationStats, ErasureTerms, correlation_stats, erasure_stats_gradient
from lancer_dist.losses.multitask import Collectives, LocalCollectives
from lancer_dist.train.parallel import RngState

__all__ = ["chunked_erasure_backward"]

Encode = Callable[[Tensor, Tensor], Tensor]


def chunked_erasure_backward(
    encode_no_grad: Encode,
    encode: Encode,
    input_ids: Tensor,
    attention_mask: Tensor,
    languages: Tensor,
    num_languages: int,
    chunk_size: int,
    *,
    erasure_weight: float = 1.0,
    form: str = "abs",
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    collectives: Collectives | None = None,
    backward: Callable[[Tensor], None] = lambda t: t.backward(),
    context: Callable[[], AbstractContextManager[object]] = nullcontext,
    device: torch.device | None = None,
) -> ErasureTerms:
    """Accumulate the erasure gradient of this rank's erasure passages into the parameters' ``.grad``.

    Args:
        encode_no_grad: (ids, mask) -> [c, D] embeddings for pass 1 (e.g. the unwrapped model).
        encode: the same for pass 2, through the data-parallel wrapper.
        input_ids, attention_mask: [m_r, L] this rank's erasure passages; languages: [m_r] their ids.
        chunk_size: passages per micro-batch (> 0).
        erasure_weight, form, eps: the loss (``lancer_dist.config.LossConfig``); with weight 0 nothing is
            back-propagated (pass 2 is skipped) and L_C is only measured.
        dtype: the dtype the embeddings are cast to before their statistics (the trainer's loss dtype).
        collectives: sums the statistics over ranks (None: one process).
        backward: back-propagates a surrogate (``accelerator.backward``); context: entered around each pass-2
            micro-batch's forward and backward (``accelerator.no_sync(model)`` so that DDP does not reduce yet).
        device: where the RNG states live (dropout draws from the device's generator).

    Returns the global loss (detached), mean |rho| and noise floor. The RNG state after the call is that after
    pass 1, as if the erasure passages had been encoded once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    c = collectives or LocalCollectives()
    dev = device or input_ids.device
    m = input_ids.shape[0]
    slices = [slice(i, min(i + chunk_size, m)) for i in range(0, m, chunk_size)]
    states: list[RngState] = []
    total: Tensor | None = None
    k = 0
    with torch.no_grad():
        for sl in slices:
            states.append(RngState(dev))
            x = encode_no_grad(input_ids[sl], attention_mask[sl]).to(dtype)
            k = x.shape[1]
            flat = correlation_stats(x, languages[sl], num_languages).flatten()
            total = flat if total is None else total + flat
    if total is None:
        raise ValueError("chunked_erasure_backward: this rank holds no erasure passages")
    stats = CorrelationStats.unflatten(c.sum_no_grad(total), k, num_languages)
    terms, grad = erasure_stats_gradient(stats, form, eps)
    if erasure_weight == 0:
        return terms
    g_flat = grad.flatten() * (erasure_weight * c.world_size)
    after = RngState(dev)
    for sl, st in zip(slices, states, strict=True):
        st.restore()
        with context():
            x = encode(input_ids[sl], attention_mask[sl]).to(dtype)
            surrogate = (correlation_stats(x, languages[sl], num_languages).flatten() * g_flat).sum()
            backward(surrogate)
    after.restore()
    return terms

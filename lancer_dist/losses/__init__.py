"""The LANCER losses (paper §3.4), pure functions of tensors; see each module's docstring.

* :func:`contrastive_loss` - L_R, InfoNCE against every passage given (minus masked false negatives:
  :func:`false_negative_mask`).
* :func:`language_correlation`, :func:`erasure_loss` - L_C from all-reducible sufficient statistics.
* :func:`lancer_loss` - L_R + lambda * L_C over the global batch, with a :class:`Collectives` reduction hook.
"""

from lancer_dist.losses.erasure import (
    CorrelationStats,
    correlation_from_stats,
    correlation_stats,
    erasure_loss,
    language_correlation,
)
from lancer_dist.losses.multitask import (
    Collectives,
    LocalCollectives,
    LossOutput,
    RetrievalTerm,
    group_positive_index,
    lancer_loss,
    retrieval_loss,
)
from lancer_dist.losses.retrieval import NO_DOC, contrastive_loss, false_negative_mask

__all__ = [
    "NO_DOC",
    "Collectives",
    "CorrelationStats",
    "LocalCollectives",
    "LossOutput",
    "RetrievalTerm",
    "contrastive_loss",
    "correlation_from_stats",
    "correlation_stats",
    "erasure_loss",
    "false_negative_mask",
    "group_positive_index",
    "lancer_loss",
    "language_correlation",
    "retrieval_loss",
]

"""The LANCER losses (paper §3.4), pure functions of tensors; see each module's docstring.

* :func:`contrastive_loss` - L_R, InfoNCE against every passage given (minus masked false negatives:
  :func:`false_negative_mask`).
* :func:`language_correlation`, :func:`erasure_loss`, :func:`erasure_terms` - L_C (three forms) from all-reducible
  sufficient statistics, with its noise floor :func:`null_abs_correlation`.
* :func:`lancer_loss` - L_R + lambda * L_C over the global batch, with a :class:`Collectives` reduction hook.
"""

from lancer_dist.losses.erasure import (
    ERASURE_FORMS,
    CorrelationStats,
    ErasureTerms,
    correlation_from_stats,
    correlation_stats,
    erasure_from_correlation,
    erasure_loss,
    erasure_stats_gradient,
    erasure_terms,
    erasure_terms_from_stats,
    language_correlation,
    null_abs_correlation,
    null_expectation,
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
    "ERASURE_FORMS",
    "NO_DOC",
    "Collectives",
    "CorrelationStats",
    "ErasureTerms",
    "LocalCollectives",
    "LossOutput",
    "RetrievalTerm",
    "contrastive_loss",
    "correlation_from_stats",
    "correlation_stats",
    "erasure_from_correlation",
    "erasure_loss",
    "erasure_stats_gradient",
    "erasure_terms",
    "erasure_terms_from_stats",
    "false_negative_mask",
    "group_positive_index",
    "lancer_loss",
    "language_correlation",
    "null_abs_correlation",
    "null_expectation",
    "retrieval_loss",
]

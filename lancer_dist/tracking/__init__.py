"""MLflow tracking, one package for training and evaluation.

- :mod:`~lancer_dist.tracking.tracker`: :class:`Tracker`, the facade the trainer and ``run_eval`` log through
  (rank-0 gating, redaction, MLflow's name and size limits).
- :mod:`~lancer_dist.tracking.outbox`: the on-disk journal, its delivery thread, :func:`upload_spool`.
- :mod:`~lancer_dist.tracking.cli`: ``lancer tracking upload``.

Importing this package does not import mlflow (the delivery thread does, when it first delivers).
"""

from lancer_dist.tracking.outbox import SPOOL_DIRNAME, resolve_tracking_uri, upload_spool
from lancer_dist.tracking.tracker import Tracker

__all__ = ["SPOOL_DIRNAME", "Tracker", "resolve_tracking_uri", "upload_spool"]

"""Process logging for the pipeline stages: one stderr handler on the root logger, added once.

Library modules log through ``logging.getLogger(__name__)`` and never print; what a command prints to stdout is its
product (the metrics table, a JSON summary). Training calls :func:`setup_logging` with its rank, the evaluation verbs
without one.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(rank: int | None = None) -> None:
    """Send INFO and above to stderr as ``[rank<r>] time level logger: message`` (no rank prefix when ``rank`` is
    None); idempotent, and a handler that an embedding application installed first is left alone."""
    prefix = f"[rank{rank}] " if rank is not None else ""
    root = logging.getLogger()
    if not any(getattr(h, "_lancer", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._lancer = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.setLevel(logging.INFO)

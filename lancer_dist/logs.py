"""Process logging for the pipeline stages: one stderr handler on the root logger, added once.

Library modules log through ``logging.getLogger(__name__)`` and never print; what a command prints to stdout is its
product (the metrics table, a JSON summary). Training calls :func:`setup_logging` with its rank, the evaluation verbs
without one.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

from lancer_dist.redact import redact

__all__ = ["setup_logging"]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment, not the one at set-up (like :data:`logging.lastResort`): a stream
    swapped and closed since (an embedding application's, a test's capture) is never written to. Everything it
    emits is redacted - the message, an attached traceback and, when an emit fails, the logging-error report, whose
    traceback carries the exception being handled at the call (an MLflow error naming the tracking URI with its
    password, for example)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def handleError(self, record: logging.LogRecord) -> None:
        if not (logging.raiseExceptions and sys.stderr):
            return
        try:
            sys.stderr.write("--- Logging error ---\n" + redact(traceback.format_exc()))
            sys.stderr.write(
                redact(
                    f"while logging {record.name} {record.levelname} from {record.pathname}:{record.lineno}\n"
                )
            )
        except Exception:  # nothing left to report to
            pass


def setup_logging(rank: int | None = None) -> None:
    """Send INFO and above to stderr as ``[rank<r>] time level logger: message`` (no rank prefix when ``rank`` is
    None); idempotent, and a handler that an embedding application installed first is left alone."""
    prefix = f"[rank{rank}] " if rank is not None else ""
    root = logging.getLogger()
    if not any(getattr(h, "_lancer", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter(prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._lancer = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.setLevel(logging.INFO)

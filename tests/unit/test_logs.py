"""The process log handler (lancer_dist.logs): writes to the stderr of the moment and never lets a secret through,
not even in the report of a failed emit (whose traceback carries the exception being handled at the log call).

The CI failure this guards against: a handler set up while an earlier test's capture stream was sys.stderr kept
writing to that (closed) stream; the emit failed, and logging's own error report printed the traceback of the
MLflow error being handled - the tracking URI with its password - to the new stderr."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from lancer_dist.logs import setup_logging

SECRET = "pw-Xy7-secret"
URI = f"http://alice:{SECRET}@127.0.0.1:5000"


@pytest.fixture
def fresh_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    root.handlers = [h for h in root.handlers if not getattr(h, "_lancer", False)]
    try:
        yield root
    finally:
        root.handlers = saved
        root.setLevel(level)


def _stderr_with_lancer_logging(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Make sys.stderr a StringIO and set lancer's handler up while it is. Called in the test body: pytest's own
    capture swaps sys.stderr again between a fixture's set-up and the test."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging()
    return stream


def _ours(root: logging.Logger) -> logging.Handler:
    (h,) = [h for h in root.handlers if getattr(h, "_lancer", False)]
    return h


def test_the_handler_follows_sys_stderr_after_a_swap_and_close(
    fresh_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _stderr_with_lancer_logging(monkeypatch)
    logging.getLogger("lancer.test").info("one")
    assert "one" in err.getvalue()
    err.close()  # the stream the handler was set up with is gone
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("lancer.test").info("two")
    out = second.getvalue()
    assert "two" in out and "Logging error" not in out, out


def test_messages_and_tracebacks_are_redacted(
    fresh_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _stderr_with_lancer_logging(monkeypatch)
    log = logging.getLogger("lancer.test")
    log.warning("store %s is down", URI)
    try:
        try:
            raise ConnectionError(f"API request to {URI}/api/2.0/mlflow/runs/get failed")
        except ConnectionError as e:
            raise RuntimeError("delivery failed") from e
    except RuntimeError:
        log.exception("while delivering")
    out = err.getvalue()
    assert "alice:***@127.0.0.1:5000" in out and "API request to" in out and "delivery failed" in out, out
    assert SECRET not in out, out


def test_a_failed_emit_reports_without_the_secret(
    fresh_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", True)
    err = _stderr_with_lancer_logging(monkeypatch)
    h = _ours(fresh_root)

    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise ValueError("I/O operation on closed file.")

    log = logging.getLogger("lancer.test")
    try:
        raise ConnectionError(f"API request to {URI}/api/2.0/mlflow/experiments/get-by-name failed")
    except ConnectionError:
        # the handler's stream fails while an exception naming the secret is being handled (its context)
        monkeypatch.setattr(sys, "stderr", Broken())
        log.warning("tracking unreachable")
        report_stream = err
        monkeypatch.setattr(sys, "stderr", report_stream)
        # emit again through a stream that fails only on the message: handleError reports to the stderr of then
        record = log.makeRecord(
            "lancer.test", logging.WARNING, __file__, 1, "%d apples", ("not a number",), None
        )
        h.handle(record)
    out = err.getvalue()
    assert "Logging error" in out and "get-by-name" in out, out
    assert SECRET not in out, out

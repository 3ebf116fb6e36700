"""The on-disk outbox behind :class:`lancer_dist.tracking.Tracker`: a journal, its delivery thread, and a later upload.

Every logging call of the tracker appends one JSON line to a journal in ``<run_dir>/mlflow_spool/journal.jsonl``
(files to upload are copied to ``mlflow_spool/files/`` first, so later changes to the originals do not matter) and
returns: the training thread never talks to MLflow. A background thread (:class:`_Outbox`) delivers the journal in
order through an explicit :class:`mlflow.tracking.MlflowClient` (no global active-run state), coalescing consecutive
metric records into ``log_batch`` calls of up to 1000 values, and records how far it got in
``mlflow_spool/state.json`` (byte offset, run id). When a delivery fails for a transient reason (connection refused,
timeout, 5xx, a locked sqlite file) it warns once per outage, keeps everything, retries every
``tracking.retry_seconds`` and continues where it stopped when the server is back. Memory stays bounded (the thread
holds at most one batch); the buffered data lives on disk.

What could not be delivered when a run ended stays in the spool; :func:`upload_spool` (the command
``lancer tracking upload <run_dir> [--tracking-uri URI]``) delivers it later.

Records the server rejects as invalid (not transient) are logged as errors, counted and skipped, so one bad record
cannot block the rest. Deliveries are at-least-once: a retried batch whose first attempt did reach the server is
deduplicated by MLflow for metrics and params; an artifact is simply uploaded again.

HTTP settings: the delivery thread is the only place that waits for the server, so short requests are best: unless
already set, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` becomes 10 s and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 0 (the outbox
retries itself) for an ``http(s)`` tracking URI.

Secrets: the tracking URI in messages and in the spool state goes through ``redact_uri``; error text through
``redact``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancer_dist.fileio import atomic_write_json
from lancer_dist.redact import redact, redact_uri

__all__ = ["SPOOL_DIRNAME", "resolve_tracking_uri", "upload_spool"]

log = logging.getLogger(__name__)

SPOOL_DIRNAME = "mlflow_spool"
_JOURNAL = "journal.jsonl"
_STATE = "state.json"
_FILES = "files"

# MLflow's limits (mlflow.utils.validation); copied so the training thread does not import mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_VALID_NAME = re.compile(r"^[/\w.\- :]*$")
_TRUNCATED = "...[truncated]"

# MLflow error codes that no retry can fix: the record is reported and skipped. Every other failure (connection
# errors, timeouts, 5xx, authentication, a locked database) is treated as an outage and retried.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
    "INVALID_REQUEST",
    "ENDPOINT_NOT_FOUND",
}


# --------------------------------------------------------------------------------------------------------------
# URIs and value normalisation
# --------------------------------------------------------------------------------------------------------------


def resolve_tracking_uri(tracking_uri: str, run_dir: str | Path) -> str:
    """``""`` -> ``sqlite:///<abs run_dir>/mlflow.db``: the store lives in the run's output directory, where a user
    looks for the run's results (``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db``; artifacts in
    ``<output_dir>/mlartifacts``); anything else unchanged. Set ``tracking.tracking_uri`` to one store (a server, or
    a shared sqlite file) to see several runs side by side."""
    if tracking_uri:
        return tracking_uri
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


def _artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, new experiments keep artifacts next to the database (MLflow's default is ./mlruns under
    whatever the current directory is); servers and file stores decide for themselves."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _truncate(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_value(v: Any) -> str:
    if isinstance(v, str):
        s = v
    elif isinstance(v, list | tuple | dict):
        s = json.dumps(v, default=str)
    else:
        s = str(v)
    return _truncate(s, MAX_PARAM_VAL_LENGTH)


def _check_name(name: str, what: str) -> str:
    name = str(name)
    norm = posixpath.normpath(name)
    if (
        not name
        or not _VALID_NAME.match(name)
        or norm != name
        or name.startswith("/")
        or norm.startswith("..")
    ):
        raise ValueError(
            f"invalid MLflow {what} name {name!r}: use letters, digits, _ - . / : and spaces, no empty path parts"
        )
    if len(name) > MAX_ENTITY_KEY_LENGTH:
        raise ValueError(
            f"MLflow {what} name longer than {MAX_ENTITY_KEY_LENGTH} characters: {name[:60]!r}..."
        )
    return name


class _Rejected(Exception):
    """A spool record that cannot be delivered by retrying (no run to log to, a missing artifact copy)."""

    error_code = "INVALID_STATE"


def _is_transient(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    if code is not None:
        return code not in _PERMANENT_CODES
    # Network and file-system trouble (requests' errors are OSErrors) and sqlalchemy's operational errors.
    return isinstance(exc, OSError | TimeoutError | ConnectionError) or type(exc).__name__ in {
        "OperationalError",
        "DisconnectionError",
    }


# --------------------------------------------------------------------------------------------------------------
# The outbox: journal writer (training thread) + in-order delivery (background thread or upload_spool)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """What is still in the journal: counts by kind."""

    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    other: int = 0

    @property
    def empty(self) -> bool:
        return not (self.metrics or self.params or self.tags or self.artifacts or self.other)

    def describe(self) -> str:
        parts = [
            f"{n} {what}"
            for n, what in [
                (self.metrics, "metric values"),
                (self.params, "params"),
                (self.tags, "tags"),
                (self.artifacts, "artifacts"),
                (self.other, "run start/end records"),
            ]
            if n
        ]
        return ", ".join(parts) or "nothing"


class _Outbox:
    """The spool directory: ``journal.jsonl`` (append-only records), ``files/`` (artifact copies) and ``state.json``
    (delivered byte offset, current run id, skipped-record count)."""

    def __init__(self, spool: Path, tracking_uri: str, retry_seconds: float):
        self.spool = spool
        self.tracking_uri = tracking_uri
        self.retry_seconds = retry_seconds
        spool.mkdir(parents=True, exist_ok=True)
        (spool / _FILES).mkdir(exist_ok=True)
        self.journal_path = spool / _JOURNAL
        self.state_path = spool / _STATE
        state: dict[str, Any] = {}
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, ValueError) as e:
                log.warning(
                    "ignoring unreadable MLflow spool state %s (%s): the journal is delivered again",
                    self.state_path,
                    e,
                )
        self.run_id: str | None = state.get("run_id")
        self.experiment_id: str | None = state.get("experiment_id")
        self.skipped: int = int(state.get("skipped", 0))
        self._writer = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the outbox)
        self._end = self._writer.tell()
        offset = int(state.get("offset", 0))
        if offset > self._end:  # the journal was removed after a complete delivery: nothing is pending
            offset = 0
        self.offset = offset
        self._reader = open(self.journal_path, encoding="utf-8")  # noqa: SIM115
        self._cv = threading.Condition()
        self._seq = 0
        self._attempted_end = offset
        self._resumed = False
        self._client: Any = None
        self._kick = False
        self._stop = False
        self.down = False
        self.closed = False
        self._thread: threading.Thread | None = None
        self.save_state()  # the spool is recognisable (and uploadable) from its first record on

    # ---- writer side (training thread) ------------------------------------------------------------------

    def append(self, kind: str, **data: Any) -> int:
        """Add one record; returns the journal offset at which it is delivered."""
        line = json.dumps({"kind": kind, **data}, allow_nan=True) + "\n"
        with self._cv:
            self._writer.write(line)
            self._writer.flush()
            self._end = self._writer.tell()
            self._cv.notify_all()
            return self._end

    def new_file_slot(self, name: str) -> Path:
        """A fresh directory under files/ for an artifact copy (unique within this spool)."""
        with self._cv:
            self._seq += 1
            slot = self.spool / _FILES / f"{time.time_ns()}-{self._seq}"
        slot.mkdir(parents=True)
        return slot / name

    @property
    def end(self) -> int:
        with self._cv:
            return self._end

    # ---- waiting ---------------------------------------------------------------------------------------

    def wait_delivered(self, target: int, timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            self._kick = True  # someone waits: retry now instead of after retry_seconds
            self._cv.notify_all()
            while self.offset < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._stop and not self._thread_alive():
                    return False
                self._cv.wait(timeout=0.2 if remaining is None else min(remaining, 0.2))
            return True

    def wait_attempted(self, target: int, timeout_s: float) -> None:
        """Wait until the record ending at ``target`` was tried at least once (delivered, or found the server down)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._attempted_end < target and self.offset < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cv.wait(timeout=min(remaining, 0.2))

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- delivery ----------------------------------------------------------------------------------------

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, name="lancer-mlflow-delivery", daemon=True)
        self._thread.start()

    def stop_thread(self, timeout_s: float) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def run(self, deadline: float | None = None) -> bool:
        """Deliver until stopped (thread mode) or, with ``deadline``, until the journal is empty or time is up.

        Returns True when everything written so far has been delivered.
        """
        while True:
            with self._cv:
                if self._stop:
                    return self.offset >= self._end
                if self.offset >= self._end:
                    if deadline is not None:
                        return True
                    self._cv.wait(timeout=1.0)
                    continue
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                batch, batch_end = self._read_batch()
            except ValueError:  # the files were closed under a thread that outlived finish()'s wait
                if self.closed:
                    return False
                raise
            if not batch:  # a partial line (cannot happen with the lock, but never spin on it)
                time.sleep(0.05)
                continue
            try:
                self._deliver(batch)
            except Exception as e:
                transient = _is_transient(e)
                if transient and not self.down:
                    self.down = True
                    log.warning(
                        "MLflow tracking at %s is unreachable (%s: %s). Training continues; records are kept in "
                        "%s and delivered when it is back (retrying every %.1f s).",
                        redact_uri(self.tracking_uri),
                        type(e).__name__,
                        redact(str(e))[:300],
                        self.spool,
                        self.retry_seconds,
                    )
                with self._cv:
                    self._attempted_end = max(self._attempted_end, batch_end)
                    self._cv.notify_all()
                if not transient:
                    self._skip(batch, e)
                    self._commit(batch_end)
                    continue
                with self._cv:
                    self._kick = False
                    until = time.monotonic() + self.retry_seconds
                    while not (self._kick or self._stop):
                        remaining = until - time.monotonic()
                        if deadline is not None:
                            remaining = min(remaining, deadline - time.monotonic())
                        if remaining <= 0:
                            break
                        self._cv.wait(timeout=remaining)
                    self._kick = False
                continue
            if self.down:
                self.down = False
                log.warning(
                    "MLflow tracking at %s is reachable again; delivering the buffered records.",
                    redact_uri(self.tracking_uri),
                )
            self._commit(batch_end)

    def _read_batch(self) -> tuple[list[dict[str, Any]], int]:
        """The next record, or a run of consecutive metric records with at most MAX_METRICS_PER_BATCH values."""
        with self._cv:
            end = self._end
        batch: list[dict[str, Any]] = []
        self._reader.seek(self.offset)
        pos = self.offset
        n_metrics = 0
        while pos < end:
            line = self._reader.readline()
            if not line.endswith("\n"):
                break
            rec = json.loads(line)
            if batch and (rec["kind"] != "metrics" or batch[0]["kind"] != "metrics"):
                break
            if rec["kind"] == "metrics":
                if batch and n_metrics + len(rec["m"]) > MAX_METRICS_PER_BATCH:
                    break
                n_metrics += len(rec["m"])
            batch.append(rec)
            pos = self._reader.tell()
            if rec["kind"] != "metrics":
                break
        return batch, pos

    def _commit(self, end: int) -> None:
        with self._cv:
            self.offset = end
            self._attempted_end = max(self._attempted_end, end)
            self._cv.notify_all()
        self.save_state()

    def save_state(self) -> None:
        atomic_write_json(
            self.state_path,
            {
                "offset": self.offset,
                "run_id": self.run_id,
                "experiment_id": self.experiment_id,
                "skipped": self.skipped,
                "tracking_uri": redact_uri(self.tracking_uri),
            },
        )

    def _skip(self, batch: list[dict[str, Any]], e: BaseException) -> None:
        n = sum(len(r.get("m", ())) or 1 for r in batch)
        self.skipped += n
        log.error(
            "MLflow rejected %d %s record(s) at %s (%s: %s); skipped (%d skipped so far in this spool).",
            n,
            batch[0]["kind"],
            redact_uri(self.tracking_uri),
            type(e).__name__,
            redact(str(e))[:500],
            self.skipped,
        )
        for rec in batch:
            if rec["kind"] == "artifact":
                self._remove_copy(rec)

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        kind = batch[0]["kind"]
        if kind == "start":
            self._start_run(batch[0])
            return
        if self.run_id is None:
            raise _Rejected("no MLflow run to log to (its creation was rejected)")
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        if kind == "metrics":
            metrics = [
                Metric(key=k, value=float(v), timestamp=int(r["ts"]), step=int(r["step"]))
                for r in batch
                for k, v in r["m"].items()
            ]
            client.log_batch(self.run_id, metrics=metrics)
        elif kind == "params":
            params = dict(batch[0]["p"])
            if self._resumed:
                params = self._params_for_resumed_run(params)
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in batch[0]["t"].items()]
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(self.run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        elif kind == "artifact":
            rec = batch[0]
            local = self.spool / rec["file"]
            if not local.exists():
                raise _Rejected(f"spooled artifact copy {local} is missing")
            if local.is_dir():
                client.log_artifacts(self.run_id, str(local), rec.get("artifact_path"))
            else:
                client.log_artifact(self.run_id, str(local), rec.get("artifact_path"))
            self._remove_copy(rec)
        elif kind == "end":
            client.set_terminated(self.run_id, status=batch[0]["status"], end_time=int(batch[0]["ts"]))
        else:
            raise _Rejected(f"unknown spool record kind {kind!r}")

    def _remove_copy(self, rec: dict[str, Any]) -> None:
        slot = (self.spool / rec["file"]).parent
        if slot.parent == self.spool / _FILES:
            shutil.rmtree(slot, ignore_errors=True)

    def _start_run(self, rec: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        client = self.client
        resume = rec.get("resume")
        target = self.run_id if resume == "auto" else resume
        if target:
            try:
                client.get_run(target)
            except MlflowException as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "MLflow run %s does not exist at %s; starting a new run",
                    target,
                    redact_uri(self.tracking_uri),
                )
            else:
                client.update_run(target, status="RUNNING")
                client.set_tag(target, "lancer.resumed_at_ms", str(rec["ts"]))
                self.run_id, self._resumed = target, True
                return
        exp = client.get_experiment_by_name(rec["experiment"])
        if exp is None:
            try:
                exp_id = client.create_experiment(
                    rec["experiment"], artifact_location=_artifact_location(self.tracking_uri)
                )
            except MlflowException as e:
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(rec["experiment"]).experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                log.warning("restoring the deleted MLflow experiment %r to log into it", rec["experiment"])
                client.restore_experiment(exp_id)
        run = client.create_run(
            exp_id,
            run_name=rec.get("run_name") or None,
            tags=rec.get("tags") or None,
            start_time=int(rec["ts"]),
        )
        self.run_id, self.experiment_id, self._resumed = run.info.run_id, exp_id, False

    def _params_for_resumed_run(self, params: dict[str, str]) -> dict[str, str]:
        """MLflow params are immutable: log only new keys; a changed value is reported and kept as a tag."""
        from mlflow.entities import RunTag

        existing = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            log.warning(
                "resumed MLflow run %s: params changed since it started (kept as tags resumed.<key>): %s",
                self.run_id,
                sorted(changed),
            )
            tags = [
                RunTag(_truncate(f"resumed.{k}", MAX_ENTITY_KEY_LENGTH), _truncate(v, MAX_TAG_VAL_LENGTH))
                for k, v in changed.items()
            ]
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        return {k: v for k, v in params.items() if k not in existing}

    # ---- bookkeeping -------------------------------------------------------------------------------------

    def pending(self) -> _Pending:
        """Count what lies between the delivered offset and the end of the journal."""
        out = _Pending()
        with open(self.journal_path, encoding="utf-8") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break
                rec = json.loads(line)
                kind = rec["kind"]
                if kind == "metrics":
                    out.metrics += len(rec["m"])
                elif kind == "params":
                    out.params += len(rec["p"])
                elif kind == "tags":
                    out.tags += len(rec["t"])
                elif kind == "artifact":
                    out.artifacts += 1
                else:
                    out.other += 1
        return out

    def close(self, clean: bool) -> None:
        """Close the files; with ``clean`` (everything delivered) drop the journal and copies, keep state.json."""
        with self._cv:
            self.closed = True
            self._writer.close()
            self._reader.close()
        if clean:
            with contextlib.suppress(FileNotFoundError):
                self.journal_path.unlink()
            shutil.rmtree(self.spool / _FILES, ignore_errors=True)
            self.offset = 0
            self.save_state()


# --------------------------------------------------------------------------------------------------------------
# Uploading a spool later
# --------------------------------------------------------------------------------------------------------------


def upload_spool(
    run_dir: str | Path,
    tracking_uri: str | None = None,
    timeout_s: float | None = None,
    retry_seconds: float = 5.0,
) -> bool:
    """Deliver what a finished (or crashed) run left in ``<run_dir>/mlflow_spool``; True when nothing is left.

    ``tracking_uri`` defaults to the URI recorded in the spool (recorded only when it holds no credentials).
    """
    spool = Path(run_dir).resolve() / SPOOL_DIRNAME
    state_path = spool / _STATE
    if not state_path.is_file():
        raise FileNotFoundError(f"no MLflow spool in {run_dir} (expected {state_path})")
    if tracking_uri is None:
        recorded = json.loads(state_path.read_text()).get("tracking_uri") or ""
        if "***" in recorded:
            raise ValueError(f"the spool's tracking URI is redacted ({recorded}); pass tracking_uri")
        tracking_uri = recorded
    if not (spool / _JOURNAL).is_file():
        return True
    if tracking_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    box = _Outbox(spool, tracking_uri, retry_seconds)
    before = box.pending()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    done = box.run(deadline=deadline if deadline is not None else math.inf)
    box.close(clean=done)
    if done:
        log.warning(
            "uploaded %s from %s to %s (run %s)",
            before.describe(),
            spool,
            redact_uri(tracking_uri),
            box.run_id,
        )
    else:
        log.error(
            "could not upload everything from %s to %s: %s left",
            spool,
            redact_uri(tracking_uri),
            box.pending().describe(),
        )
    return done

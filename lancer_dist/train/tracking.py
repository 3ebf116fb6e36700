"""MLflow tracking: rank 0 only, and a tracking server that goes away never stalls or kills training.

:class:`Tracker` is the single owner of rank-0 gating for tracking: on every other rank (and when tracking is
disabled) each method is a no-op that touches no file and imports nothing.

Outage tolerance - an on-disk outbox
------------------------------------
Every logging call on rank 0 appends one JSON line to a journal in ``<run_dir>/mlflow_spool/journal.jsonl`` (files
to upload are copied to ``mlflow_spool/files/`` first, so later changes to the originals do not matter) and returns:
the training thread never talks to MLflow. A background thread delivers the journal in order through an explicit
:class:`mlflow.tracking.MlflowClient` (no global active-run state), coalescing consecutive metric records into
``log_batch`` calls of up to 1000 values, and records how far it got in ``mlflow_spool/state.json`` (byte offset,
run id). When a delivery fails for a transient reason (connection refused, timeout, 5xx, a locked sqlite file) it
warns once per outage, keeps everything, retries every ``tracking.retry_seconds`` and continues where it stopped when
the server is back. Memory stays bounded (the thread holds at most one batch); the buffered data lives on disk.

``finish()`` waits (up to a timeout) for the journal to be delivered. What could not be delivered stays in the spool,
and a log message says how to upload it later::

    python -m lancer_dist.train.tracking upload <run_dir> [--tracking-uri URI]

Records the server rejects as invalid (not transient) are logged as errors, counted and skipped, so one bad record
cannot block the rest. Deliveries are at-least-once: a retried batch whose first attempt did reach the server is
deduplicated by MLflow for metrics and params; an artifact is simply uploaded again.

Resume: the run id is kept in ``mlflow_spool/state.json``. ``start(resume_run_id="auto")`` continues the run this
``run_dir`` last logged to (even one whose creation is still waiting in the journal), ``start(resume_run_id=ID)`` a
given run; :meth:`Tracker.stored_run_id` reads the id.

HTTP settings: the delivery thread is the only place that waits for the server, so short requests are best: unless
already set, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` becomes 10 s and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 0 (the tracker
retries itself) for an ``http(s)`` tracking URI.

Secrets never reach MLflow or the logs: params, tags and logged dicts go through ``lancer_dist.redact.redact_mapping``,
logged text through ``redact``, tracking URIs in messages and in the spool state through ``redact_uri``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancer_dist.config import TrackingConfig, flatten
from lancer_dist.fileio import atomic_write_json
from lancer_dist.redact import redact, redact_mapping, redact_uri

__all__ = ["Tracker", "resolve_tracking_uri", "upload_spool"]

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
# The tracker
# --------------------------------------------------------------------------------------------------------------


def _env_rank() -> int:
    from lancer_dist import dist

    if dist.is_initialized():
        return dist.get_rank()
    # Before the process group exists (launcher environment), RANK still tells rank 0 apart.
    return int(os.environ.get("RANK", "0"))


class Tracker:
    """MLflow tracking for one training run, active on rank 0 only.

    Args:
        cfg: the ``tracking`` section of the run config.
        run_dir: the run's output directory; the spool lives in ``<run_dir>/mlflow_spool`` and the default sqlite
            store in ``<run_dir>/mlflow.db``.
        enabled: overrides ``cfg.enabled``.
        rank: this process's global rank; ``None`` = :func:`lancer_dist.dist.get_rank` (or ``$RANK`` before the
            process group exists).
        start_timeout_s: how long :meth:`start` waits for the run id (the run is created later if the store is down);
            ``None`` = ``cfg.start_timeout_s``.
        finish_timeout_s: default of :meth:`finish`'s wait for the last records; ``None`` = ``cfg.finish_timeout_s``.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        run_dir: str | Path,
        enabled: bool | None = None,
        rank: int | None = None,
        start_timeout_s: float | None = None,
        finish_timeout_s: float | None = None,
    ):
        self.cfg = cfg
        self.rank = _env_rank() if rank is None else rank
        self.enabled = cfg.enabled if enabled is None else enabled
        self.active = bool(self.enabled) and self.rank == 0
        self.run_dir = Path(run_dir).resolve()
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri, self.run_dir)
        self.spool_dir = self.run_dir / SPOOL_DIRNAME
        self.start_timeout_s = cfg.start_timeout_s if start_timeout_s is None else start_timeout_s
        self.finish_timeout_s = cfg.finish_timeout_s if finish_timeout_s is None else finish_timeout_s
        self._outbox: _Outbox | None = None
        self._finished = False
        self._io_error_reported = False

    # ---- lifecycle ---------------------------------------------------------------------------------------

    @staticmethod
    def stored_run_id(run_dir: str | Path) -> str | None:
        """The MLflow run id a tracker of ``run_dir`` last delivered to (None if none was created yet)."""
        state = Path(run_dir) / SPOOL_DIRNAME / _STATE
        try:
            return json.loads(state.read_text()).get("run_id")
        except (OSError, ValueError):
            return None

    @property
    def run_id(self) -> str | None:
        """The current run id (None on other ranks, or while the run's creation waits for the store)."""
        return self._outbox.run_id if self._outbox is not None else None

    def start(
        self, params: Mapping[str, Any], run_name: str | None = None, resume_run_id: str | None = None
    ) -> str | None:
        """Open (or, with ``resume_run_id``, continue) a run and log ``params``; returns the run id if known yet.

        ``params`` may be nested (the resolved config as a dict): it is flattened with dotted keys, secrets are
        redacted and values are truncated to MLflow's 6000 characters. ``resume_run_id="auto"`` continues the run
        this ``run_dir`` logged to before, if any.
        """
        if not self.active:
            return None
        if self._outbox is not None:
            raise RuntimeError("Tracker.start() was already called")
        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self._outbox = _Outbox(self.spool_dir, self.tracking_uri, self.cfg.retry_seconds)
        if self._outbox.offset < self._outbox.end:
            log.warning(
                "MLflow spool %s holds %s from an earlier process; delivering it first",
                self.spool_dir,
                self._outbox.pending().describe(),
            )
        flat = flatten(dict(params)) if any(isinstance(v, dict) for v in params.values()) else dict(params)
        flat = redact_mapping(flat)
        clean = {_truncate(str(k), MAX_ENTITY_KEY_LENGTH): _param_value(v) for k, v in flat.items()}
        tags = {"lancer.run_dir": str(self.run_dir)}
        end = self._outbox.append(
            "start",
            experiment=self.cfg.experiment,
            run_name=run_name or self.cfg.run_name or None,
            resume=resume_run_id,
            tags=tags,
            ts=int(time.time() * 1000),
        )
        self._outbox.append("params", p=clean)
        self._outbox.start_thread()
        self._outbox.wait_attempted(end, self.start_timeout_s)
        if self._outbox.run_id is None or self._outbox.offset < end:
            log.warning(
                "MLflow run not created yet (%s unreachable); it is created when the store is back",
                redact_uri(self.tracking_uri),
            )
            return None
        return self._outbox.run_id

    def _box(self) -> _Outbox | None:
        if not self.active:
            return None
        if self._outbox is None:
            raise RuntimeError("call Tracker.start() before logging")
        if self._finished:
            raise RuntimeError("Tracker.finish() was already called")
        return self._outbox

    def _append(self, box: _Outbox, kind: str, **data: Any) -> None:
        try:
            box.append(kind, **data)
        except OSError as e:
            # A full or broken local disk must not kill training either; the checkpoint writer will say more.
            if not self._io_error_reported:
                self._io_error_reported = True
                log.error(
                    "cannot write the MLflow spool %s (%s); tracking records are being lost",
                    self.spool_dir,
                    e,
                )

    # ---- logging -----------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (already reduced over ranks). Returns at once; delivery is asynchronous."""
        box = self._box()
        if box is None:
            return
        m = {_check_name(k, "metric"): float(v) for k, v in metrics.items()}
        self._append(box, "metrics", step=int(step), ts=int(time.time() * 1000), m=m)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        box = self._box()
        if box is None:
            return
        t = redact_mapping({_check_name(k, "tag"): v for k, v in tags.items()})
        self._append(box, "tags", t={k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in t.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under ``artifact_path``; a copy is taken now."""
        box = self._box()
        if box is None:
            return
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {src}")
        try:
            dst = box.new_file_slot(src.name)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        except OSError as e:
            if not self._io_error_reported:
                self._io_error_reported = True
                log.error(
                    "cannot copy %s into the MLflow spool %s (%s); it is not logged", src, self.spool_dir, e
                )
            return
        self._append(box, "artifact", file=str(dst.relative_to(box.spool)), artifact_path=artifact_path)

    def log_model_dir(self, path: str | Path, artifact_path: str = "model") -> None:
        """Upload a saved model directory (e.g. ``BiEncoder.save_pretrained``) as ``artifact_path/``."""
        box = self._box()
        if box is None:
            return
        src = Path(path)
        if not src.is_dir():
            raise NotADirectoryError(f"model directory to log does not exist: {src}")
        try:
            dst = box.new_file_slot(src.name)
            shutil.copytree(src, dst)
        except OSError as e:
            log.error(
                "cannot copy %s into the MLflow spool %s (%s); the model is not logged",
                src,
                self.spool_dir,
                e,
            )
            return
        self._append(box, "artifact", file=str(dst.relative_to(box.spool)), artifact_path=artifact_path)

    def _log_generated(self, name: str, write: Any) -> None:
        box = self._box()
        if box is None:
            return
        name = _check_name(name, "artifact")
        artifact_dir, base = posixpath.split(name)
        try:
            dst = box.new_file_slot(base)
            write(dst)
        except OSError as e:
            log.error(
                "cannot write %s into the MLflow spool %s (%s); it is not logged", name, self.spool_dir, e
            )
            return
        self._append(
            box, "artifact", file=str(dst.relative_to(box.spool)), artifact_path=artifact_dir or None
        )

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """Log a dict as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact named ``name``."""

        def write(dst: Path) -> None:
            if dst.suffix in (".yaml", ".yml"):
                import yaml

                dst.write_text(yaml.safe_dump(redact_mapping(d), sort_keys=False))
            else:
                dst.write_text(json.dumps(redact_mapping(d), indent=2, default=str, allow_nan=True))

        self._log_generated(name, write)

    def log_text(self, text: str, name: str) -> None:
        self._log_generated(name, lambda dst: dst.write_text(redact(text)))

    def log_figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure (rendered now, e.g. ``probe/curve.png``)."""
        self._log_generated(name, lambda dst: fig.savefig(dst, dpi=120, bbox_inches="tight"))

    # ---- delivery ----------------------------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything logged so far is delivered (at most ``timeout_s``); True if it was."""
        if not self.active or self._outbox is None:
            return True
        box = self._outbox
        return box.wait_delivered(box.end, timeout_s)

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``), waiting up to ``timeout_s`` (default
        ``finish_timeout_s``) for delivery. What is still undelivered then stays in the spool, with a log message
        saying how to upload it."""
        if not self.active or self._outbox is None or self._finished:
            return
        box = self._outbox
        self._append(box, "end", status=status, ts=int(time.time() * 1000))
        self._finished = True
        done = self.flush(self.finish_timeout_s if timeout_s is None else timeout_s)
        # The delivery thread ends after its current request (bounded by MLFLOW_HTTP_REQUEST_TIMEOUT).
        box.stop_thread(timeout_s=float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")) + 5)
        done = done or box.offset >= box.end
        if done:
            box.close(clean=True)
            if box.skipped:
                log.error(
                    "MLflow run %s: %d record(s) were rejected by the store and skipped (see earlier errors)",
                    box.run_id,
                    box.skipped,
                )
            return
        pending = box.pending()
        box.close(clean=False)
        log.error(
            "MLflow tracking at %s: %s could not be delivered (run %s). They are kept in %s; upload them when the "
            "store is reachable with:  python -m lancer_dist.train.tracking upload %s%s",
            redact_uri(self.tracking_uri),
            pending.describe(),
            box.run_id or "<not created yet>",
            self.spool_dir,
            self.run_dir,
            "" if self.tracking_uri == redact_uri(self.tracking_uri) else " --tracking-uri <URI>",
        )

    def undelivered(self) -> dict[str, int]:
        """Counts of records not yet delivered (after :meth:`finish`: what was left in the spool)."""
        if not self.active or self._outbox is None:
            return {}
        p = self._outbox.pending() if self._outbox.journal_path.exists() else _Pending()
        return {
            "metrics": p.metrics,
            "params": p.params,
            "tags": p.tags,
            "artifacts": p.artifacts,
            "other": p.other,
        }


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


def register(sub: Any, name: str = "tracking-upload") -> None:
    """Add ``tracking-upload RUN_DIR [--tracking-uri URI]`` to an argparse sub-parser set (``lancer`` verb modules)."""
    up = sub.add_parser(
        name,
        help="deliver the MLflow records a tracking outage left in <run_dir>/mlflow_spool",
        description=upload_spool.__doc__,
    )
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the spool")
    up.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds (default: never)"
    )
    up.add_argument("--retry-seconds", type=float, default=5.0)
    up.set_defaults(func=_upload_cmd)


def _upload_cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ok = upload_spool(args.run_dir, args.tracking_uri, args.timeout, args.retry_seconds)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m lancer_dist.train.tracking upload RUN_DIR [--tracking-uri URI]``."""
    parser = argparse.ArgumentParser(prog="python -m lancer_dist.train.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register(sub, name="upload")
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

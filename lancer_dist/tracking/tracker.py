"""MLflow tracking for training and evaluation: rank 0 only, and a tracking server that goes away never stalls or
kills a run.

:class:`Tracker` is the single owner of rank-0 gating for tracking: on every other rank (and when tracking is
disabled) each method is a no-op that touches no file and imports nothing. On rank 0 each call appends a record to the
on-disk outbox (:mod:`lancer_dist.tracking.outbox`) and returns; a background thread delivers it.

``finish()`` waits (up to a timeout) for the journal to be delivered. What could not be delivered stays in the spool,
and a log message says how to upload it later::

    lancer tracking upload <run_dir> [--tracking-uri URI]

Resume: the run id is kept in ``mlflow_spool/state.json``. ``start(resume_run_id="auto")`` continues the run this
``run_dir`` last logged to (even one whose creation is still waiting in the journal), ``start(resume_run_id=ID)`` a
given run; :meth:`Tracker.stored_run_id` reads the id.

Secrets never reach MLflow or the logs: params, tags and logged dicts go through ``lancer_dist.redact.redact_mapping``,
logged text through ``redact``, tracking URIs in messages through ``redact_uri``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lancer_dist.config import TrackingConfig, flatten
from lancer_dist.redact import redact, redact_mapping, redact_uri
from lancer_dist.tracking.outbox import (
    _STATE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_TAG_VAL_LENGTH,
    SPOOL_DIRNAME,
    _check_name,
    _Outbox,
    _param_value,
    _Pending,
    _truncate,
    resolve_tracking_uri,
)

__all__ = ["Tracker"]

log = logging.getLogger(__name__)


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
            "store is reachable with:  lancer tracking upload %s%s",
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

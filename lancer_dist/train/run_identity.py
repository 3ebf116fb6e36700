"""Which MLflow run a resumed checkpoint continues: only this output directory's own.

The trainer state of a checkpoint records the MLflow run id. A checkpoint copied from another run (another
output directory, another machine) must not continue *that* run: it would append this job's metrics to someone
else's run and mark it RUNNING again. So each output directory gets a random fingerprint, kept in
``<output_dir>/run_fingerprint.json`` together with the directory's resolved path, and every checkpoint records
it. On resume, the run id is used only when the checkpoint's fingerprint is this directory's; otherwise the
weights, optimizer and data position are still loaded, a warning says why, and a new MLflow run is started.

A copied output directory (its ``run_fingerprint.json`` names another path) gets a fresh fingerprint too, so a
copy never continues the original's run either.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("lancer.train")

FINGERPRINT_FILE = "run_fingerprint.json"

__all__ = ["FINGERPRINT_FILE", "resume_run_id", "run_fingerprint"]


def run_fingerprint(output_dir: str | Path, create: bool = True) -> str | None:
    """This output directory's fingerprint; made (with ``create``) when absent or when the file was copied from
    another directory. Only rank 0 (holding the output-dir lock) creates it."""
    out = Path(output_dir).resolve()
    path = out / FINGERPRINT_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("output_dir") == str(out) and isinstance(data.get("fingerprint"), str):
            return str(data["fingerprint"])
        if create:
            log.warning(
                "%s was written for %s, not %s (a copied output directory): this directory gets a new run "
                "fingerprint, and resumed checkpoints start a new MLflow run",
                path,
                data.get("output_dir"),
                out,
            )
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("unreadable %s (%s): making a new run fingerprint", path, e)
    if not create:
        return None
    fp = uuid.uuid4().hex
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(
        json.dumps(
            {
                "fingerprint": fp,
                "output_dir": str(out),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
        )
    )
    tmp.replace(path)
    return fp


def resume_run_id(state: dict[str, Any], fingerprint: str | None, checkpoint: Path) -> str | None:
    """The ``resume_run_id`` for :meth:`Tracker.start` after loading ``checkpoint`` (whose trainer state is
    ``state``): its run id (or ``"auto"`` when it has none yet) for this directory's own checkpoint, None (a new
    run) for a foreign one."""
    theirs = state.get("run_fingerprint")
    if fingerprint is not None and theirs == fingerprint:
        return state.get("run_id") or "auto"
    log.warning(
        "checkpoint %s was written by another run (run fingerprint %s, this output directory's is %s): its "
        "weights, optimizer and data position are loaded, but its MLflow run %s is not continued; a new run is "
        "started",
        checkpoint,
        theirs or "<none: written by an older lancer>",
        fingerprint,
        state.get("run_id"),
    )
    return None

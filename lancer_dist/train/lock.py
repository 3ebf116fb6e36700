"""One training job per output directory: an exclusive lock file ``<output_dir>/.lancer.lock``.

Two ``lancer train`` on the same ``output_dir`` would overwrite each other's checkpoints, final model and MLflow
run. The first job creates the lock file with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+),
holding JSON: pid, the process start time (from ``/proc``, so a recycled pid is not mistaken for the holder),
hostname, start date and, under SLURM, the job id. A second job finds it and is refused with an error naming the
directory and the holder.

A lock left by a crashed run is taken over, with a warning, when its holder is provably gone:

* same host, and the pid is dead or now belongs to another process (start time differs);
* same SLURM job id as ours: SLURM starts a requeued job only after its previous incarnation has ended, possibly
  on another node, so the old holder is dead even though its host differs.

A holder on another host outside SLURM cannot be checked from here: the error says so, and how to remove the lock.

Under torchrun only global rank 0 takes the lock (``output_dir`` is one directory on a filesystem shared by every
node, so a lock per node would lock out the other nodes); every rank learns the outcome before anything is written
(:func:`acquire_for_job`), so a refused job fails on every rank instead of hanging in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".lancer.lock"

__all__ = ["LOCK_NAME", "OutputDirLock", "OutputDirLocked", "acquire_for_job"]


class OutputDirLocked(RuntimeError):
    """Another live job holds the output directory."""


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): with the pid, identifies one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed process whose parent died too stays a zombie until init reaps it (in a container, PID 1 may never):
    # it holds its pid but runs nothing, so it holds no lock.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@dataclass
class OutputDirLock:
    """The lock of one output directory. :meth:`acquire` raises :class:`OutputDirLocked` when a live job holds it."""

    output_dir: Path

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / LOCK_NAME

    def _mine(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "proc_start": _proc_start_time(pid),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content; ``{}`` when it is unreadable or half written, None when there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is certainly gone, or None when it may be alive."""
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return f"it belongs to an earlier run of this SLURM job {job} (requeued)"
        if holder.get("host") != socket.gethostname():
            return None
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return None
        if not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        start = holder.get("proc_start")
        if start is not None and _proc_start_time(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return
            with self._guard():
                # Under the guard, re-read: two jobs that both saw the same stale lock must not both take it over.
                holder = self.holder()
                if holder is None:
                    continue
                if holder == {}:
                    raise OutputDirLocked(
                        f"output directory {self.output_dir} is locked by {self.path}, which is unreadable or being "
                        "written; if no job uses this directory, remove that file"
                    )
                reason = self.stale_reason(holder)
                if reason is None:
                    raise OutputDirLocked(
                        f"output directory {self.output_dir} is in use by another training job: pid "
                        f"{holder.get('pid')} on host {holder.get('host')}"
                        + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
                        + f", started {holder.get('started')} (lock file {self.path}). Use another output_dir, "
                        "or, if that job is certainly dead (e.g. on another host), remove the lock file."
                    )
                log.warning(
                    "taking over the stale lock %s of pid %s on %s started %s: %s",
                    self.path,
                    holder.get("pid"),
                    holder.get("host"),
                    holder.get("started"),
                    reason,
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        raise OutputDirLocked(f"could not take the lock {self.path} (other jobs keep taking it)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._mine(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    @contextlib.contextmanager
    def _guard(self) -> Any:
        # flock on the directory itself: serialises take-overs without creating a file
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def release(self) -> None:
        """Remove the lock if this process holds it (a lock taken over by someone else is left alone)."""
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def acquire_for_job(output_dir: str | Path, rank: int) -> OutputDirLock | None:
    """Global rank 0 takes the lock; every rank learns the outcome, and every rank raises if it was refused.

    Returns the lock on rank 0 (to :meth:`OutputDirLock.release` at the end), None on the other ranks.
    """
    from lancer_dist import dist

    lock = OutputDirLock(Path(output_dir)) if rank == 0 else None
    error: str | None = None
    if lock is not None:
        try:
            lock.acquire()
        except OutputDirLocked as e:
            error = str(e)
    # every rank gets rank 0's verdict (a no-op without a process group)
    error = dist.broadcast_object(error, src=0)  # type: ignore[assignment]
    if error:
        raise OutputDirLocked(error)
    return lock

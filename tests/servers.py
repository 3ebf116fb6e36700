"""Real servers for tests: an MLflow tracking server, a 2-node SLURM cluster and a 2-node Ray cluster on 127.0.0.1.

Every server binds to 127.0.0.1 on ports picked free at start time, keeps its state in a directory the caller owns
(``tmp_path``), and is stopped by the ids of the processes this harness started (process groups, never ``ray stop``
or a kill by name). Each class raises ``pytest.skip`` with the reason when its binary is missing; SLURM comes from
``scripts/install_schedulers.sh`` (Debian packages), Ray and MLflow from pip.

Use them as context managers or through the fixtures at the bottom (import the fixture into a test module)::

    from tests.servers import MlflowServer, SlurmCluster, RayCluster

    def test_x(tmp_path):
        with MlflowServer(tmp_path / "mlflow") as mlf, SlurmCluster(tmp_path / "slurm") as slurm:
            job = slurm.sbatch(script_text, "--nodes=2")
            assert slurm.wait(job)["JobState"] == "COMPLETED"

Measured start times on a 2-core machine: SLURM ~1 s, Ray head + worker ~15 s, MLflow server ~12-28 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "FileHttpServer",
    "MlflowServer",
    "RayCluster",
    "SlurmCluster",
    "free_port",
    "free_ports",
    "mlflow_server",
    "port_block",
    "ray_cluster",
    "slurm_cluster",
    "stop_process_group",
]

_VENV_BIN = Path(sys.executable).parent
# Ports handed out in this process: two calls never return the same port even before either is bound.
_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now and was not handed out before by this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port found")


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


# Fixed-port servers (Ray's nodes) take their ports from blocks BELOW the kernel's ephemeral range and ABOVE Ray's
# default worker range: the kernel never hands a port of such a block to a bind(0) or an outgoing connection (so
# ``free_port()`` and every client socket on the host stay out of it), and a local ``ray.init()`` elsewhere on the
# host (workers on 10002-19999 by default) never lands in it either.
_RAY_DEFAULT_WORKER_PORTS = (10002, 19999)
_BLOCKS: list[range] = []


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))  # Ray binds its node address, or all addresses
        except OSError:
            return False
    return True


def port_block(n: int, rng: Any = None) -> range:
    """``n`` consecutive ports, all free now, outside the ephemeral range and Ray's default worker range, and
    disjoint from every block this process handed out before. Callers split a block between the components of
    one server, so the ports they pass are distinct by construction (no two components, and no worker range,
    can collide).
    """
    import random

    rng = rng or random.SystemRandom()
    eph_lo, eph_hi = _ephemeral_range()
    lo = max(1024, _RAY_DEFAULT_WORKER_PORTS[1] + 1)
    # Usable windows: between Ray's default worker range and the ephemeral range, and above the ephemeral range.
    windows = [(lo, eph_lo - 1), (eph_hi + 1, 65535)]
    windows = [(a, b) for a, b in windows if b - a + 1 >= n]
    if not windows:
        raise RuntimeError(f"no port window of {n} ports outside the ephemeral range {eph_lo}-{eph_hi}")
    for _ in range(200):
        a, b = rng.choice(windows)
        start = rng.randrange(a, b - n + 2)
        block = range(start, start + n)
        if any(block.start < g.stop and g.start < block.stop for g in _BLOCKS):
            continue
        if all(_bindable(p) for p in block):
            _BLOCKS.append(block)
            return block
    raise RuntimeError(f"no free block of {n} ports found")


def _which(name: str) -> str | None:
    # Prefer the virtual environment's entry points (mlflow, ray) over anything else on PATH.
    cand = _VENV_BIN / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _require(name: str, why: str) -> str:
    path = _which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH: {why}")
    return path


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (read from /proc; processes that left the group are found too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields after the last ')' are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _pids_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment has ``name=value`` (the ones a test cluster started, and their children)."""
    needle = f"{name}={value}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with ``start_new_session=True``: its process group and every descendant.

    Sends ``sig`` to the group, waits up to ``timeout`` s, then SIGKILLs whatever is left (descendants that moved to
    another group included). Only ids of processes this harness started (and their children) are signalled.
    """
    if proc.poll() is not None and not _descendants(proc.pid):
        return
    pids = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(p) for p in pids):
            break
        time.sleep(0.1)
    pids += [p for p in _descendants(proc.pid) if p not in pids]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _start(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[Any]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: stop_process_group() ends it and its children
        )


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------------------


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and a local artifact store under ``root``.

    ``.uri`` is the tracking URI; ``.stop()`` / ``.start()`` / ``.restart()`` keep the SAME port and store, so a
    test can take the server away and bring it back (the trainer's outage test).
    """

    def __init__(self, root: str | os.PathLike[str], port: int | None = None, timeout: float = 120.0):
        self.exe = _require("mlflow", "pip install mlflow (scripts/install.sh)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.timeout = timeout
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            self.exe, "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--serve-artifacts",
        ]  # fmt: skip
        self.proc = _start(cmd, self.log, env=env, cwd=self.root)
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.timeout} s:\n{_tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            # uvicorn's graceful shutdown can take >10 s with idle keep-alive clients; the sqlite store is
            # consistent after every request, so a short grace period is enough.
            stop_process_group(self.proc, timeout=5)
            self.proc = None

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# A static file server (webdataset shards over http://)
# --------------------------------------------------------------------------------------------------------------


class FileHttpServer:
    """``python -m http.server`` serving ``directory`` on 127.0.0.1 (a separate process, started ~0.5 s).

    ``.url`` is the base URL; ``.requests()`` the paths of the GET requests served so far (from its log), so a
    test can tell that data really came over HTTP.
    """

    def __init__(self, directory: str | os.PathLike[str], log: str | os.PathLike[str], timeout: float = 30.0):
        self.directory = Path(directory)
        self.log = Path(log)
        self.port = free_port()
        self.timeout = timeout
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FileHttpServer:
        cmd = [sys.executable, "-u", "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
               "--directory", str(self.directory)]  # fmt: skip
        self.proc = _start(cmd, self.log)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"http.server exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"http.server not listening after {self.timeout} s:\n{_tail(self.log)}")

    def requests(self) -> list[tuple[str, int]]:
        """``(path, status)`` of every GET request logged so far."""
        import re

        pattern = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d+)')
        return [(m[1], int(m[2])) for m in pattern.finditer(_tail(self.log, 10**8))]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=5)
            self.proc = None

    def __enter__(self) -> FileHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------------------

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class SlurmCluster:
    """slurmctld + ``nodes`` emulated slurmd nodes (node1, node2, ...) on 127.0.0.1, configured under ``root``.

    Follows ENVIRONMENT.md: auth/none, proctrack/linuxproc, task/none, no accounting. ``.env`` holds
    ``SLURM_CONF`` for the client commands (sbatch, squeue, scontrol); ``.run(...)`` runs one with it.
    """

    def __init__(
        self, root: str | os.PathLike[str], nodes: int = 2, cpus_per_node: int = 2, timeout: float = 30.0
    ):
        for exe in ("slurmctld", "slurmd", "sbatch", "scontrol"):
            _require(exe, "run scripts/install_schedulers.sh as root (Debian slurmctld slurmd slurm-client)")
        if os.geteuid() != 0:
            # slurmd launches job steps as the submitting user (setuid), which needs root.
            pytest.skip("the SLURM test cluster needs root (slurmd starts jobs as their user)")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.timeout = timeout
        self.conf = self.root / "slurm.conf"
        self.ctld_port, *node_ports = free_ports(1 + nodes)
        self.node_ports = dict(zip(self.nodes, node_ports))
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        host = socket.gethostname()
        user = _user()
        state = self.root / "state"
        state.mkdir(exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
        # A unique cluster name per instance: slurmctld refuses a StateSaveLocation written by another cluster.
        lines = [
            f"ClusterName=lancer{self.ctld_port}",
            # Job ids differ between clusters started at the same time (things keyed by job id never collide).
            f"FirstJobId={1000 + self.ctld_port * 10}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            # Job credentials live 120 s by default, and a requeued job waits that long before it may start again;
            # 10 s keeps the preemption test short.
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}",
            # cgroup plugins fail in containers (the job "completes" while the node drains): ENVIRONMENT.md.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=10",
            "MinJobAge=600",
            "SchedulerParameters=sched_interval=1",
            # Emulated nodes share one host; jobs see the NodeAddr (127.0.0.1), the names do not resolve.
            *[
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.node_ports[n]} "
                f"CPUs={self.cpus_per_node} State=UNKNOWN"
                for n in self.nodes
            ],
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> SlurmCluster:
        self._write_conf()
        self.procs["slurmctld"] = _start(
            [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)],
            self.root / "slurmctld.out",
            env=self.env,
        )
        for n in self.nodes:
            self.procs[n] = _start(
                [_which("slurmd") or "slurmd", "-D", "-N", n, "-f", str(self.conf)],
                self.root / f"slurmd-{n}.out",
                env=self.env,
            )
        try:
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    log = self.root / ("slurmctld.log" if name == "slurmctld" else f"slurmd-{name}.log")
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{_tail(log)}")
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            last = r.stdout + r.stderr
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"SLURM nodes not idle after {self.timeout} s: {last}\n{_tail(self.root / 'slurmctld.log')}"
        )

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster."""
        exe = _which(cmd[0]) or cmd[0]
        r = subprocess.run([exe, *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(
        self, script: str | os.PathLike[str], *args: str, cwd: str | os.PathLike[str] | None = None
    ) -> int:
        """Submit a batch script (a path, or the script text) and return the job id."""
        if isinstance(script, str) and script.startswith("#!"):
            path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.root)[1])
            path.write_text(script)
        else:
            path = Path(script)
        r = subprocess.run(
            [_which("sbatch") or "sbatch", "--parsable", *args, str(path)],
            env=self.env,
            cwd=cwd or self.root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        out: dict[str, str] = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def wait(self, job_id: int, timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job reaches a terminal state; returns its final ``scontrol show job`` record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {info}")

    def wait_state(self, job_id: int, states: set[str], timeout: float = 120.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} never reached {states}: {info}")

    def stop(self) -> None:
        if not self.procs:
            return
        # Jobs still running (a test that failed half-way) are cancelled first; slurmstepd detaches from slurmd, so
        # whatever survives is found below by the SLURM_CONF of this cluster in its environment.
        with contextlib.suppress(Exception):
            ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False, timeout=15)
        # scontrol shutdown stops slurmctld and every slurmd it knows; then make sure by pid.
        with contextlib.suppress(Exception):
            self.run(["scontrol", "shutdown"], check=False, timeout=15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.2)
        for p in self.procs.values():
            stop_process_group(p, timeout=5)
        self.procs = {}
        leftovers = _pids_with_env("SLURM_CONF", str(self.conf))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in leftovers):
                time.sleep(0.2)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# --------------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------------


class RayCluster:
    """A Ray head (``ray start --head --block``) plus ``workers`` worker nodes on this host.

    Ports: every node gets its own block from ``port_block`` (outside the kernel's ephemeral range and Ray's default
    worker range, free when picked); its component ports and its ``--min/--max-worker-port`` range are disjoint
    slices of it, so no two components of a node, no two nodes, and no ``free_port()`` elsewhere can collide.

    Ray binds its GCS and raylets to the host's address (it rewrites 127.0.0.1 on purpose); ``.address`` gives it.
    Authentication is disabled (``RAY_AUTH_MODE=disabled``: a local test cluster bound to 127.0.0.1); the dashboard
    (Jobs API) listens on 127.0.0.1:``dashboard_port``. ``RAY_TMPDIR`` is a short directory under /tmp (Ray's unix
    socket paths must stay under 107 bytes, which pytest's tmp_path can exceed); it is removed at stop.
    Stopped by process ids, never ``ray stop`` (which would end every Ray process on the host).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        workers: int = 1,
        cpus_per_node: int = 1,
        object_store_bytes: int = 200 * 1024**2,
        memory_bytes: int = 3 * 1024**3,
        timeout: float = 120.0,
    ):
        self.exe = _require("ray", "pip install 'ray[default,train]' (scripts/install.sh)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        # The memory each node offers to the scheduler: nodes sharing one host would each claim all of it.
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        # One port block per node (see port_block): its components' ports and its worker range are disjoint slices.
        self._head_block = port_block(self._BLOCK)
        self.gcs_port, self.dashboard_port, self.client_server_port = self._head_block[6:9]
        self.tmpdir = Path(tempfile.mkdtemp(prefix="lray", dir="/tmp"))
        self.procs: list[subprocess.Popen[Any]] = []
        self.env = dict(
            os.environ,
            RAY_TMPDIR=str(self.tmpdir),
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            # A test cluster has nothing to drain: without this, SIGTERM waits 30 s per node.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # Job entrypoints run `python ...` with the nodes' PATH: make it this environment's interpreter.
            PATH=f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env.pop("RAY_ADDRESS", None)
        # Ray rewrites 127.0.0.1 to the host's routable address for its own GCS / raylet ports (on purpose, see
        # ray._private.services.resolve_ip_for_localhost); the dashboard and Jobs API stay on 127.0.0.1.
        self.node_ip = _node_ip()

    @property
    def address(self) -> str:
        """The GCS address (for ``ray.init(address=...)`` and ``ray start --address``)."""
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The Jobs API address (for ``JobSubmissionClient`` and ``lancer submit ray --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    # Per node: 6 component ports, 3 more on the head (GCS, dashboard, client server), then the worker range (one
    # port per worker process alive at a time; Ray returns a port to its pool when the worker exits).
    WORKER_PORTS = 100
    _BLOCK = 9 + WORKER_PORTS

    @staticmethod
    def _node_ports(block: range) -> list[str]:
        return [
            "--node-manager-port", str(block[0]),
            "--object-manager-port", str(block[1]),
            "--dashboard-agent-listen-port", str(block[2]),
            "--dashboard-agent-grpc-port", str(block[3]),
            "--metrics-export-port", str(block[4]),
            "--runtime-env-agent-port", str(block[5]),
            "--min-worker-port", str(block[9]), "--max-worker-port", str(block[-1]),
        ]  # fmt: skip

    def start(self) -> RayCluster:
        common = [
            "--block",
            "--num-cpus", str(self.cpus_per_node),
            "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_bytes),
            "--memory", str(self.memory_bytes),
            "--disable-usage-stats",
        ]  # fmt: skip
        head = [
            self.exe, "start", "--head",
            "--port", str(self.gcs_port),
            "--ray-client-server-port", str(self.client_server_port),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard", "true",
            *common, *self._node_ports(self._head_block),
        ]  # fmt: skip
        try:
            self.procs.append(_start(head, self.root / "ray-head.log", env=self.env))
            self._wait(lambda: self._dashboard_up(), "Ray dashboard")
            for i in range(self.workers):
                block = port_block(self._BLOCK)
                cmd = [self.exe, "start", "--address", self.address, *common, *self._node_ports(block)]
                self.procs.append(_start(cmd, self.root / f"ray-worker{i + 1}.log", env=self.env))
            self._wait(lambda: self._alive_nodes() >= 1 + self.workers, f"{1 + self.workers} Ray nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    log = self.root / ("ray-head.log" if i == 0 else f"ray-worker{i}.log")
                    raise RuntimeError(f"ray start exited with {p.returncode}:\n{_tail(log)}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not up after {self.timeout} s:\n{_tail(self.root / 'ray-head.log')}")

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def nodes(self) -> list[dict[str, Any]]:
        """The raylets the dashboard knows (``nodeId``, ``state``, ``isHeadNode``, ...); [] when it does not answer."""
        import json

        try:
            with urllib.request.urlopen(self.dashboard_url + "/nodes?view=summary", timeout=5) as r:
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return [n.get("raylet", {}) for n in data.get("data", {}).get("summary", [])]

    def alive_node_ids(self) -> set[str]:
        return {n["nodeId"] for n in self.nodes() if n.get("state") == "ALIVE" and "nodeId" in n}

    def _alive_nodes(self) -> int:
        return len(self.alive_node_ids())

    def stop(self) -> None:
        # Workers first, then the head; ``ray start --block`` tears its node down on SIGTERM, and the group kill
        # (plus descendants) catches whatever is left.
        for p in reversed(self.procs):
            stop_process_group(p, timeout=20)
        self.procs = []
        # Anything of this cluster that left the process tree (daemonised helpers) still has its RAY_TMPDIR.
        leftovers = _pids_with_env("RAY_TMPDIR", str(self.tmpdir))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# Fixtures (import them into a test module: ``from tests.servers import mlflow_server``)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path / "mlflow") as srv:
        yield srv


@pytest.fixture
def slurm_cluster(tmp_path: Path) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path / "slurm") as cluster:
        yield cluster


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    with RayCluster(tmp_path / "ray") as cluster:
        yield cluster

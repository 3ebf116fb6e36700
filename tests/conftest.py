"""Session fixtures shared by every test: the offline real backbone and Bible data, built on demand.

Both are cached under ``${LANCER_CACHE}`` (default ``<repo>/.cache/lancer``), so only the first session on a machine
pays for them (~20-60 s for the full model conversion, a few seconds for the small Bible data); parallel sessions
wait on a lock instead of building twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

# Every process the tests start inherits this marker (the harness passes os.environ on), so the session can find
# whatever is still running when it ends, daemonised or re-parented helpers included.
SESSION_MARK = "LANCER_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{uuid.uuid4().hex}")


def _marked_processes(value: str) -> dict[int, str]:
    needle = f"{SESSION_MARK}={value}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if "multiprocessing.resource_tracker" in cmd or "loky.backend.resource_tracker" in cmd:
            continue  # this session's own helper (Python's, or joblib's for the probe's folds): it ends with it
        found[int(entry)] = cmd[:200]
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Report and end every process the tests left running: a leaked server or rank would keep CI's output open
    after pytest returns."""
    value = os.environ.get(SESSION_MARK)
    if not value or not value.startswith(f"{os.getpid()}-") or not os.path.isdir("/proc"):
        return  # a nested pytest (a test running pytest) leaves this to the outer session
    left = _marked_processes(value)
    if not left:
        return
    print(f"\n[lancer tests] {len(left)} process(es) still running at the end of the session; ending them:")
    for pid, cmd in sorted(left.items()):
        print(f"  pid {pid}: {cmd}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_processes(value):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _marked_processes(value):
            time.sleep(0.2)


# Small enough to build in seconds, large enough that every collection has queries with relevant documents.
TEST_BIBLE_OPTIONS: dict = {
    "passages_per_language": 40,
    "probe_per_language": 16,
    "eval_queries": 24,
    "eval_distractors": 40,
    "negatives": 3,
    "max_groups": 200,
    "max_records_per_shard": 100,
}


@pytest.fixture(scope="session")
def e5_model_dir() -> Path:
    """The full converted multilingual-e5-small (12 layers, 250,002-token tokenizer); also the tokenizer of
    configs/tiny.yaml."""
    from lancer_dist.offline import ensure_backbone

    return ensure_backbone()


@pytest.fixture(scope="session")
def bible_data() -> Path:
    """A small Bible data directory: ``erasure/``, ``probe/`` (passages shards), ``retrieval/`` (groups shards),
    ``eval/<name>/`` (BEIR), ``summary.json``, ``splits.json``."""
    from lancer_dist.offline import ensure_bible_data
    from lancer_dist.paths import cache_dir

    return ensure_bible_data(cache_dir() / "data" / "bible-test", **TEST_BIBLE_OPTIONS)


@pytest.fixture(scope="session")
def e5_small_model_dir(bible_data: Path) -> Path:
    """multilingual-e5-small shrunk for fast CPU tests: first 2 layers, vocabulary pruned to the test Bible data
    (every text of ``bible_data`` tokenizes exactly as with the full tokenizer)."""
    from lancer_dist.offline import ensure_backbone

    return ensure_backbone(layers=2, prune_from=[bible_data])

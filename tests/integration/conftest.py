"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def ray_env() -> Iterator[None]:
    """One local Ray instance per test module (2 CPUs); ``run_eval`` and the encoder pool join it instead of
    starting their own. Shut down, and its temp dir removed, when the module ends."""
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = tempfile.mkdtemp(prefix="lray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

"""The memory estimates of the scaling guide (lancer_dist/train/memory.py) against the papers they come from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_zero_memory_matches_the_zero_paper():
    """ZeRO paper (Rajbhandari et al. 2020), Figure 1: 7.5B parameters, 64 GPUs: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB."""
    from lancer_dist.train.memory import activation_bytes, model_state_bytes, table

    gb = 1e9
    psi = 7.5e9
    assert model_state_bytes(psi, 64, 0) / gb == pytest.approx(120, rel=1e-3)
    assert model_state_bytes(psi, 64, 1) / gb == pytest.approx(31.4, rel=1e-2)
    assert model_state_bytes(psi, 64, 2) / gb == pytest.approx(16.6, rel=1e-2)
    assert model_state_bytes(psi, 64, 3) / gb == pytest.approx(1.88, rel=1e-2)
    assert model_state_bytes(psi, 64, 3, offload=True) == pytest.approx(
        2 * psi / 64
    )  # only sharded grads stay
    # Korthikanti et al. 2022: s*h*(34 + 5*a*s/h) bytes per layer and sequence; linear in sequences and layers.
    from lancer_dist.train.memory import Backbone

    bb = Backbone("x", 1e8, 2, 64, 4)
    assert activation_bytes(bb, 1, 16, False) == 2 * 16 * 64 * (34 + 5 * 4 * 16 / 64)
    assert activation_bytes(bb, 3, 16, False) == 3 * activation_bytes(bb, 1, 16, False)
    assert activation_bytes(bb, 1, 16, True) < activation_bytes(bb, 1, 16, False)
    assert table().count("\n") == 10  # header, rule, 9 plans (the table of docs/cluster.md)


def test_the_scaling_guide_in_the_docs_is_the_printed_table():
    """docs/cluster.md shows exactly what ``python -m lancer_dist.train.memory`` prints (a changed estimate shows)."""
    out = subprocess.run(
        [sys.executable, "-m", "lancer_dist.train.memory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in (REPO / "docs" / "cluster.md").read_text()

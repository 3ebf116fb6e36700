"""Every config file that a doc, template or launcher names exists and loads (what ``lancer config show`` does), and
every recipe states its hardware, memory and time as estimates (issue #11)."""

from __future__ import annotations

import re

import pytest

from lancer_dist.config import load_config
from lancer_dist.paths import repo_root

ROOT = repo_root()
NAMED = re.compile(r"configs/[A-Za-z0-9_.-]+\.yaml")
SOURCES = ["README.md", "docs", "cluster", "launchers", "scripts"]


def _named_configs() -> set[str]:
    names: set[str] = set()
    for src in SOURCES:
        base = ROOT / src
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for f in files:
            try:
                names |= set(NAMED.findall(f.read_text(errors="ignore")))
            except OSError:
                continue
    return names


def test_docs_and_templates_name_configs():
    # the scan itself finds what it must (the SLURM template and docs/cluster.md name these two)
    assert {"configs/run.yaml", "configs/xlmr-large.yaml"} <= _named_configs()


@pytest.mark.parametrize(
    "name", sorted(_named_configs() | {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")})
)
def test_config_file_exists_and_loads(name):
    path = ROOT / name
    assert path.is_file(), f"{name} is named by a doc or template but does not exist"
    cfg = load_config(path)
    assert cfg.name


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("tiny", "quickstart"))
)
def test_recipes_state_hardware_memory_time_as_estimates_or_measured(path):
    head = path.read_text().split("\nname:")[0]
    for key in ("# Hardware:", "# Memory:", "# Time:"):
        assert key in head, f"{path.name}: no '{key}' line in its header"
    lines = {
        key: next(ln for ln in head.splitlines() if ln.startswith(key)) for key in ("# Memory:", "# Time:")
    }
    # either the header says its figures are estimates, or each of the two lines says it was measured
    assert "ESTIMATES, not measurements" in head or all("MEASURED" in ln for ln in lines.values()), head

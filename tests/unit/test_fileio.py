"""lancer_dist.fileio.atomic_open: a reader sees the old file or the new one, never a part; an error leaves the
old file and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lancer_dist.fileio import atomic_open, atomic_write_json


def test_atomic_open_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    atomic_write_json(path, {"old": 1})
    with atomic_open(path) as f:
        f.write("new ")
        assert path.read_text() == '{"old": 1}'  # not replaced while the block runs
        f.write("text")
    assert path.read_text() == "new text"
    with pytest.raises(RuntimeError), atomic_open(path, "wb") as f:
        f.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "new text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]  # the temporary file is gone

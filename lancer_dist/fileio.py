"""Small file helpers shared by training, evaluation and tracking: atomic writes and progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_json", "atomic_write_text", "progress"]


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO[Any]]:
    """A file to write ``path`` through, so that a reader sees the old file or the new one, never a part: a
    temporary file beside it (unique per process), renamed onto ``path`` (``os.replace``) when the block ends
    without an error, removed when it raises. ``mode``: "w" (UTF-8 text) or "wb". ``fsync``: flush to disk before
    the rename (checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, fsync=fsync) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, *, fsync: bool = False, indent: int | None = None) -> None:
    """:func:`atomic_write_text` of ``obj`` as JSON (non-ASCII kept as is)."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent), fsync=fsync)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None: ...
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def progress(
    desc: str, unit: str, total: int, initial: int = 0, enabled: bool = True, unit_scale: bool = False
) -> Any:
    """A tqdm bar on stderr (or a no-op with the same methods when ``enabled`` is false, e.g. on ranks > 0).
    ``unit_scale``: counts shown as 1.2k, 3.4M (passages), not for a few thousand steps."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        dynamic_ncols=True,
        file=sys.stderr,
    )

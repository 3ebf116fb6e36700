"""Well-known locations. ``LANCER_CACHE`` (default ``<repo or cwd>/.cache/lancer``) holds the offline model and data
built on demand (never committed). Config strings may use ``${LANCER_CACHE}`` and any other ``${ENV_VAR}``."""

from __future__ import annotations

import os
import re
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    env = os.environ.get("LANCER_CACHE")
    if env:
        return Path(env)
    root = repo_root()
    base = root if (root / "pyproject.toml").is_file() else Path.cwd()
    return base / ".cache" / "lancer"


def expand(value: str) -> str:
    """Replace ``${VAR}`` by the environment variable (``LANCER_CACHE`` has a default); unknown ones raise."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "LANCER_CACHE":
            return str(cache_dir())
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return _VAR.sub(sub, value)

"""Starting / joining Ray for the evaluation verbs."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ensure_ray"]


def ensure_ray(address: str = "", num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Join Ray if it is not initialised yet; returns True when this call started it (the caller shuts it down).

    ``address``: "" = ``$RAY_ADDRESS`` when set, else a new local instance (never silently attach to some other
    job's cluster on the same host); "auto" = the cluster this host belongs to; or ``host:port``.
    """
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, **kwargs}
    if addr == "local" and num_cpus is not None:
        opts["num_cpus"] = num_cpus
    ray.init(address=addr, **opts)
    return True

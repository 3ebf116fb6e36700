"""Model references that are either local directories or Hugging Face hub ids.

Training loads through transformers' ``from_pretrained`` with the model section's hub options (``revision``,
``cache_dir``, ``trust_remote_code``); evaluation, whose (Ray) workers load a directory, first resolves a hub id to
its local snapshot with :func:`resolve_model_dir`. On machines without the hub, ``HF_HUB_OFFLINE=1`` makes both read
a populated cache (``cache_dir`` / ``HF_HOME``) and fail fast instead of retrying the network.
``trust_remote_code`` stays off unless the config turns it on: code shipped with a model is executed only then.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lancer_dist.config import ConfigError

__all__ = ["hub_kwargs", "looks_like_hub_id", "resolve_model_dir"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_hub_id(ref: str) -> bool:
    """``name`` or ``owner/name`` (no leading ``.`` or ``/``, no ``..``): what the hub accepts as a repository id."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref


def hub_kwargs(
    revision: str | None = None, cache_dir: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Keyword arguments for transformers' ``from_pretrained`` (unset options left to transformers' defaults)."""
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kw["revision"] = revision
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    return kw


def resolve_model_dir(
    ref: str, field_name: str, *, revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local model directory for ``ref``: the directory itself, or the hub snapshot of ``ref`` at ``revision``
    (downloaded into ``cache_dir`` / the hub cache, or read from it under ``HF_HUB_OFFLINE=1``). Anything else is a
    :class:`ConfigError` naming ``field_name``."""
    if Path(ref).is_dir():
        return Path(ref)
    if not looks_like_hub_id(ref):
        raise ConfigError(field_name, ref, "an existing encoder / transformers model directory or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, revision=revision, cache_dir=cache_dir))
    except Exception as e:  # no such repo / revision, no network and nothing cached, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            field_name,
            ref,
            f"an existing model directory, or a hub id reachable or cached (revision {revision or 'main'}): {first}",
        ) from None

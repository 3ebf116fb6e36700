"""Keep secrets out of logs, sbatch scripts, Ray job metadata and MLflow params.

A secret is
* the value of an environment variable whose name says it is one (``MLFLOW_TRACKING_TOKEN``, ``*_PASSWORD``,
  ``*_TOKEN``, ``*_SECRET``, ``*_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, ...),
* the password in a URI's user-info (``https://user:pass@host``; a lone user-info such as ``https://TOKEN@host`` is
  treated as a token),
* the value in a ``name=value`` / ``name: value`` / ``"name": "value"`` pair or a URI query parameter whose name is
  a secret name, or in a ``--password VALUE`` style flag.

``redact(text)`` replaces all of them by ``***``; ``redact_uri(uri)`` only the URI parts; ``redact_mapping(d)``
walks a (nested) mapping, blanking values under secret keys and redacting every string. The trainer's tracking
module calls ``redact_mapping`` on params and ``redact`` on logged text; the cluster front-ends call them on everything they
print or write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "is_secret_name",
    "redact",
    "redact_mapping",
    "redact_uri",
    "secret_env_names",
    "secret_values",
]

REDACTED = "***"

# Words that make a variable / key / flag name a secret. Matched as whole "words" of the name (split on _ - . and
# case changes are not considered), so TOKENIZER / max_tokens / passage are not secrets, but HF_TOKEN, db_password,
# SECRET_KEY, apiKey-less names like "api_key" and "AUTH" are.
_SECRET_WORDS = (
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "PASS",
    "SECRET",
    "APIKEY",
    "API_KEY",
    "ACCESS_KEY",
    "PRIVATE_KEY",
    "CREDENTIAL",
    "CREDENTIALS",
    "AUTH",
    "AUTHORIZATION",
    "SESSION_KEY",
)
_WORD_SPLIT = re.compile(r"[_\-.]+")
# Names that contain a secret word but hold no secret.
_NOT_SECRET = {"MLFLOW_TRACKING_USERNAME", "RAY_AUTH_MODE", "MLFLOW_TRACKING_AUTH", "PWD", "OLDPWD"}


def is_secret_name(name: str) -> bool:
    """Whether a variable / key / flag name denotes a secret (case-insensitive, by whole words of the name)."""
    upper = name.strip().lstrip("-").upper().replace("-", "_")
    if not upper or upper in _NOT_SECRET:
        return False
    words = [w for w in _WORD_SPLIT.split(upper) if w]
    joined = "_".join(words)
    for sw in _SECRET_WORDS:
        parts = sw.split("_")
        n = len(parts)
        if any(words[i : i + n] == parts for i in range(len(words) - n + 1)):
            return True
        # camelCase / run-together names: apiKey, accesstoken, dbpassword
        if n == 1 and len(sw) >= 5 and joined.endswith(sw):
            return True
    return False


def _environ_snapshot() -> dict[str, str]:
    """A copy of os.environ that tolerates other threads (e.g. MLflow's telemetry) changing it meanwhile."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    raw = list(os.environ._data.items())  # type: ignore[attr-defined]  # one C-level copy, atomic under the GIL
    return {os.fsdecode(k): os.fsdecode(v) for k, v in raw}


def secret_env_names(env: Mapping[str, str] | None = None) -> list[str]:
    env = _environ_snapshot() if env is None else env
    return sorted(k for k, v in env.items() if v and is_secret_name(k))


def secret_values(env: Mapping[str, str] | None = None, min_length: int = 4) -> list[str]:
    """Values of secret-named environment variables (longest first, so overlapping values redact fully)."""
    env = _environ_snapshot() if env is None else env
    vals = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= min_length}
    return sorted(vals, key=len, reverse=True)


# scheme://userinfo@ : userinfo = user[:password]; stop at '/', whitespace, quotes and '@'.
_URI_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@'\"]*)(?::(?P<pw>[^/\s@'\"]*))?@"
)
_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
# The key of a name=value, name: value, "name": "value" or name="value" pair; the value is matched separately from
# the key's end, so a secret pair inside another pair's value (--comment=password=x) is still found.
_KEY = re.compile(rf"(?P<q>[\"']?)(?P<name>{_NAME})(?P=q)\s*(?:=|:)\s*[\"']?")
_VALUE = re.compile(r"[^\s\"',;&}\]]+")
_AUTH_SCHEMES = ("bearer", "basic", "token", "digest")
# HTTP auth headers: the scheme word is kept, the credential goes.
_AUTH_HEADER = re.compile(
    r"(?i)(?P<pre>\bauthorization[\"']?\s*[:=]\s*[\"']?(?:bearer|basic|token|digest)\s+)(?P<val>[^\s\"',;]+)"
)
# --password VALUE / --token VALUE (a flag followed by a separate value).
_FLAG = re.compile(rf"(?P<pre>(?<![\w-])--?(?P<name>{_NAME})\s+)(?P<val>[^\s\-][^\s]*)")


def redact_uri(uri: str) -> str:
    """``scheme://user:pass@host/...`` -> ``scheme://user:***@host/...``; ``scheme://TOKEN@host`` ->
    ``scheme://***@host``; secret query parameters (``?token=...``) -> ``***``. Other text is unchanged."""

    def sub(m: re.Match[str]) -> str:
        user, pw = m.group("user"), m.group("pw")
        if pw is not None:
            return f"{m.group('scheme')}{user}:{REDACTED}@"
        return f"{m.group('scheme')}{REDACTED}@" if user else m.group(0)

    out = _URI_USERINFO.sub(sub, uri)
    return re.sub(
        rf"(?P<pre>[?&](?P<name>{_NAME})=)(?P<val>[^&#\s]+)",
        lambda m: m.group("pre") + REDACTED if is_secret_name(m.group("name")) else m.group(0),
        out,
    )


def redact(text: str, env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> str:
    """Replace every secret in ``text`` by ``***``: values of secret environment variables (``env`` defaults to
    ``os.environ``), ``extra`` literal secrets, URI passwords, and values assigned to secret-named keys / flags."""
    if not text:
        return text
    out = text
    for v in sorted({*secret_values(env), *(e for e in extra if e)}, key=len, reverse=True):
        out = out.replace(v, REDACTED)
    out = redact_uri(out)
    out = _AUTH_HEADER.sub(lambda m: m.group("pre") + REDACTED, out)

    out = _redact_assignments(out)

    def flag(m: re.Match[str]) -> str:
        if not is_secret_name(m.group("name")) or m.group("val") == REDACTED:
            return m.group(0)
        return m.group("pre") + REDACTED

    return _FLAG.sub(flag, out)


def _redact_assignments(text: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _KEY.finditer(text):
        if m.start() < pos or not is_secret_name(m.group("name")):
            continue
        v = _VALUE.match(text, m.end())
        # Auth schemes are handled by _AUTH_HEADER (the credential follows the scheme word).
        if v is None or v.group(0) == REDACTED or v.group(0).lower() in _AUTH_SCHEMES:
            continue
        parts += [text[pos : v.start()], REDACTED]
        pos = v.end()
    parts.append(text[pos:])
    return "".join(parts)


def redact_mapping(d: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``d`` (nested mappings / lists walked) where values under secret-named keys become ``***`` and
    every string is passed through :func:`redact`. Non-string leaves (numbers, booleans, None) are kept."""

    def walk(key: str | None, v: Any) -> Any:
        if key is not None and is_secret_name(key) and v not in (None, "", {}, []):
            return REDACTED
        if isinstance(v, Mapping):
            return {k: walk(str(k), vv) for k, vv in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(walk(None, x) for x in v)
        if isinstance(v, str):
            return redact(v, env)
        return v

    return {k: walk(str(k), v) for k, v in d.items()}

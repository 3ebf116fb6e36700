"""``lancer <verb> ...``: thin entry points over library code.

Each verb group lives in its own module with a ``register(subparsers)`` function that adds its sub-parsers and sets
``func`` to a callable taking the parsed namespace. Verb modules import heavy libraries (torch, ray, faiss) inside
their handlers so that ``lancer --help`` stays fast.

This module knows the library's verbs only. The installed ``lancer`` program is this parser plus the cluster
front-ends' ``submit`` verb, composed by the front-end package (its ``cli.main`` passes its own module in
``verb_modules``): the front-ends depend on the library, never the other way round.
``python -m lancer_dist.cli`` (what torchrun, SLURM and Ray Jobs start on every node) has every verb but ``submit``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lancer_dist.config import ConfigError

# verb group -> module with register(subparsers)
VERB_MODULES = (
    "lancer_dist.cli_config",
    "lancer_dist.data.cli",
    "lancer_dist.train.cli",
    "lancer_dist.retrieval.cli",
    "lancer_dist.tracking.cli",
)


def build_parser(verb_modules: Sequence[str] = VERB_MODULES) -> argparse.ArgumentParser:
    """The ``lancer`` parser with the verb groups of ``verb_modules`` (each a module with ``register``)."""
    parser = argparse.ArgumentParser(
        prog="lancer",
        description="lancer-dist: distributed LANCER training and evaluation of multilingual dense retrievers.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in verb_modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None, verb_modules: Sequence[str] = VERB_MODULES) -> int:
    parser = build_parser(verb_modules)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.verb is None else 2
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"lancer: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        # An unexpected error still shows its traceback, but redacted: exception messages quote URIs and
        # settings (an MLflow error quotes the tracking URI with its password).
        import traceback

        from lancer_dist.redact import redact

        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``lancer <verb> ...``: thin entry points over library code.

Each verb group lives in its own module with a ``register(subparsers)`` function that adds its sub-parsers and sets
``func`` to a callable taking the parsed namespace. Verb modules import heavy libraries (torch, ray, faiss) inside
their handlers so that ``lancer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lancer_dist.config import ConfigError

# verb group -> module with register(subparsers)
VERB_MODULES = [
    "lancer_dist.cli_config",
    "lancer_dist.data.cli",
    "lancer_dist.train.cli",
    "lancer_dist.retrieval.cli",
    "lancer_dist.tracking.cli",
    "launchers.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lancer",
        description="lancer-dist: distributed LANCER training and evaluation of multilingual dense retrievers.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the verb group is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

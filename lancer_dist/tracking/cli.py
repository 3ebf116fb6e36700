"""``lancer tracking upload RUN_DIR [--tracking-uri URI]``: deliver the records a tracking outage left in a spool."""

from __future__ import annotations

import argparse
import logging
import sys

from lancer_dist.tracking.outbox import upload_spool


def register(sub: argparse._SubParsersAction) -> None:
    """``lancer tracking upload RUN_DIR [--tracking-uri URI]``."""
    p = sub.add_parser("tracking", help="MLflow tracking: deliver what an outage left behind")
    tsub = p.add_subparsers(dest="tracking_verb", metavar="<action>")
    up = tsub.add_parser(
        "upload",
        help="deliver the MLflow records a tracking outage left in <run_dir>/mlflow_spool",
        description=upload_spool.__doc__,
    )
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the spool")
    up.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds (default: never)"
    )
    up.add_argument("--retry-seconds", type=float, default=5.0)
    up.set_defaults(func=_upload_cmd)


def _upload_cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ok = upload_spool(args.run_dir, args.tracking_uri, args.timeout, args.retry_seconds)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1

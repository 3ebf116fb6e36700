"""``lancer config show --config FILE key=value ...``: print the resolved, validated config as YAML."""

from __future__ import annotations

import argparse

import yaml

from lancer_dist.config import config_to_dict, load_config
from lancer_dist.redact import redact_mapping


def _show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    # Secrets (a tracking URI's password, a token under a secret-named key) are shown as ***.
    print(yaml.safe_dump(redact_mapping(config_to_dict(cfg)), sort_keys=False), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_verb", metavar="<action>")
    show = csub.add_parser("show", help="print the resolved, validated config")
    show.add_argument("--config", required=False, default=None, help="YAML run config")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    show.set_defaults(func=_show)

"""``lancer data ...``: write shards, build the offline Bible data and backbone, read benchmark layouts.

Sub-verbs are contributed by modules with ``register(data_subparsers)``; heavy imports stay inside handlers.
"""

from __future__ import annotations

import argparse
import importlib

DATA_VERB_MODULES = [
    "lancer_dist.data.cli_shards",  # lancer data passages | groups | inspect
    "lancer_dist.offline.cli",  # lancer data backbone | bible | collection
    "lancer_dist.retrieval.cli_mine",  # lancer data mine
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training shards, offline data and evaluation collections")
    dsub = p.add_subparsers(dest="data_verb", metavar="<action>")
    for name in DATA_VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(dsub)

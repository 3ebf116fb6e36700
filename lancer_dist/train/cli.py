"""``lancer train --config FILE [key=value ...]``: one process, or one rank under torchrun / accelerate launch."""

from __future__ import annotations

import argparse
import sys

from lancer_dist.config import load_config


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # bad configs fail here, before any process group starts
    from lancer_dist.train import PREEMPTED_EXIT_CODE
    from lancer_dist.train.checkpoint import CheckpointError
    from lancer_dist.train.lock import OutputDirLocked
    from lancer_dist.train.trainer import check_launch_config, train

    check_launch_config(cfg)
    from lancer_dist import dist

    try:
        result = train(cfg)
    except OutputDirLocked as e:  # every rank got rank 0's verdict and raised together
        print(f"lancer: error: {e}", file=sys.stderr)
        dist.shutdown()
        return 3
    except CheckpointError as e:  # disk full, a crafted or corrupt checkpoint: the message says which file
        print(f"lancer: error: {e}", file=sys.stderr)
        dist.shutdown(barrier=False)  # possibly this rank's own error: the others may never reach a barrier
        return 1
    except BaseException:
        dist.shutdown(barrier=False)
        raise
    dist.shutdown()  # this command's process owns its group (torchrun or alone): torn down before exit
    if result.preempted:
        print(
            f"preempted at step {result.step}; checkpoint saved, exiting {PREEMPTED_EXIT_CODE}",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    if result.run_id:
        print(f"MLflow run {result.run_id} (experiment '{cfg.tracking.experiment}')", file=sys.stderr)
    print(f"final model: {result.final_model}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LANCER bi-encoder (one process, or under torchrun)")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.erasure_weight=0")
    p.set_defaults(func=_train)

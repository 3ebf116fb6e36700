"""Issue 14, item 11 (rendering): a single-node SLURM job rendezvous on 127.0.0.1 through launchers.local_torchrun;
several nodes keep the head node's address (a loopback store would be unreachable from the other nodes)."""

from __future__ import annotations

from pathlib import Path

from launchers.slurm import SlurmJob, render_train_script

REPO = Path(__file__).resolve().parents[2]
CFG = str(REPO / "configs" / "tiny.yaml")


def test_single_node_slurm_script_binds_loopback() -> None:
    one = render_train_script(SlurmJob(config=CFG, nodes=1, workdir=str(REPO)), "tiny")
    assert "-m launchers.local_torchrun --nnodes=1" in one
    assert '--rdzv_endpoint="127.0.0.1:$RDZV_PORT"' in one and "torch.distributed.run" not in one
    two = render_train_script(SlurmJob(config=CFG, nodes=2, workdir=str(REPO)), "tiny")
    assert "-m torch.distributed.run --nnodes=2" in two and '--rdzv_endpoint="$HEAD_ADDR:$RDZV_PORT"' in two
    assert "local_torchrun" not in two

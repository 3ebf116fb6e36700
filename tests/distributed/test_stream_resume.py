"""Two real processes (gloo on 127.0.0.1), each with 2 DataLoader workers: every global step holds exactly m
passages per language across the ranks and is the one-process step (same keys, same order), queries are disjoint
across ranks, every rank's state is the same global state, and a stream resumed from that one state file yields
exactly the uninterrupted batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.distributed.harness import run_distributed

STEPS = 10
CUT = 4  # checkpoint after step 4


def _rank_fn(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from lancer_dist import dist
    from lancer_dist.data.stream import TrainStream
    from tests.unit.test_stream import make_cfg, make_tokenizer, same_batch

    assert dist.get_rank() == rank and dist.get_world_size() == world_size == 2
    tok = make_tokenizer()
    cfg = make_cfg(Path(root), **{"data.num_workers": 2, "train.steps": STEPS})
    full = list(TrainStream.from_config(cfg, tok, rank=dist.get_rank(), world_size=dist.get_world_size()))

    # global view of every step, gathered over the process group
    gathered = dist.all_gather_object([(b.step, b.erasure_keys, b.query_keys) for b in full])

    # interrupted run: consume steps 0..CUT, save the state (as a checkpoint would), resume in a new stream
    first = TrainStream.from_config(cfg, tok, rank=rank, world_size=world_size)
    it = iter(first)
    for _ in range(CUT + 1):
        next(it)
    del it
    ckpt = Path(root) / "stream.json"
    states = dist.all_gather_object(json.dumps(first.state_dict()))
    if rank == 0:
        ckpt.write_text(json.dumps(first.state_dict()))  # one global file, as the trainer writes it
    dist.barrier()
    resumed = TrainStream.from_config(cfg, tok, rank=rank, world_size=world_size, start_step=CUT + 1)
    resumed.load_state_dict(json.loads(ckpt.read_text()))
    rest = list(resumed)
    same = [same_batch(a, b) for a, b in zip(rest, full[CUT + 1 :], strict=True)]
    return {
        "gathered": gathered,
        "resumed_steps": [b.step for b in rest],
        "same": same,
        "languages": resumed.languages,
        "states_equal": len(set(states)) == 1,
    }


def test_two_ranks_two_workers_exact_balance_and_resume(tmp_path: Path) -> None:
    from tests.unit.test_stream import make_cfg

    make_cfg(tmp_path)  # writes the shards once, before the ranks start
    results = run_distributed(_rank_fn, 2, tmp_path, str(tmp_path), timeout_s=240)
    from lancer_dist.data.stream import TrainStream
    from tests.unit.test_stream import make_tokenizer

    one = list(
        TrainStream.from_config(
            make_cfg(tmp_path, **{"train.steps": STEPS}), make_tokenizer(), rank=0, world_size=1
        )
    )
    for res in results:
        assert res["states_equal"]
        assert res["resumed_steps"] == list(range(CUT + 1, STEPS))
        assert all(res["same"]) and len(res["same"]) == STEPS - CUT - 1
    gathered = results[0]["gathered"]
    assert gathered == results[1]["gathered"]
    langs = results[0]["languages"]
    for step in range(STEPS):
        per_rank = [gathered[r][step] for r in range(2)]
        assert all(s == step for s, _, _ in per_rank)
        keys = [k for _, e, _ in per_rank for k in e]
        assert Counter(k.split("-")[0] for k in keys) == dict.fromkeys(langs, 2)
        assert len({len(e) for _, e, _ in per_rank}) == 1
        queries = [q for _, _, qs in per_rank for q in qs]
        assert len(queries) == 4 == len(set(queries))
        # the 2-rank step is the one-process step, sliced
        assert keys == one[step].erasure_keys and queries == one[step].query_keys

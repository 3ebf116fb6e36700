"""How many (query, passage) pairs false-negative masking removes, on real group shards (ids only; no model).

Reads the global retrieval stream of a run with Q queries per step and groups of G (seed 0, shuffle buffer 256, as
the trainer would), and counts, per step, the pairs the mask removes (``LossOutput.negatives_masked``).

    python benchmarks/count_false_negatives.py SHARD_DIR Q G STEPS
"""

import json
import sys

import torch

from lancer_dist.data.shards import read_manifest
from lancer_dist.data.stream import StreamPlan, _GlobalReader
from lancer_dist.losses import lancer_loss

root, Q, G, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = read_manifest(root)
plan = StreamPlan(
    rank=0,
    world_size=1,
    num_roles=1,
    seed=0,
    shuffle_buffer=256,
    skip_bad=False,
    group_size=G,
    queries_per_step=Q,
    per_language=0,
    languages=[],
    erasure=None,
    retrieval=m,
    collator=None,
)
reader = _GlobalReader(plan)
masked = []
for _step in range(steps):
    out = {"ids": [], "pos": []}
    for _query in range(Q):
        key, rec, epoch = reader.subs["retrieval"].next()
        grp = reader._group(key, rec, epoch)
        out["ids"] += [p["docid"] for p in grp]
        out["pos"].append([p["docid"] for p in rec["positives"]])
    q = torch.zeros(Q, 2, dtype=torch.float64)
    p = torch.zeros(Q * G, 2, dtype=torch.float64)
    r = lancer_loss(q, p, G, passage_doc_ids=out["ids"], query_positive_ids=out["pos"])
    masked.append(r.negatives_masked)
print(
    json.dumps(
        {
            "data": root,
            "records": m.num_records,
            "Q": Q,
            "G": G,
            "steps": steps,
            "steps_with_masked": sum(1 for x in masked if x),
            "masked_total": sum(masked),
            "pairs_total": steps * Q * Q * G,
            "max_per_step": max(masked),
        }
    )
)

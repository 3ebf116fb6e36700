"""The full multi-task step on a tiny random encoder under real DDP (gloo, float64): N ranks x B/N == 1 x B.

Loss, gradients and the parameters after one AdamW step match one process on the concatenated batch to 1e-10,
with full fine-tuning, with LoRA adapters (PEFT; only the adapters train), and with only the top layer trained
(``model.train_layers``: frozen parameters are outside DDP's buckets) under DDP and under FSDP2.
"""

from __future__ import annotations

import pytest
import torch

from lancer_dist.config import LoraConfig
from lancer_dist.dist import ProcessGroupCollectives
from lancer_dist.losses import lancer_loss
from lancer_dist.model import BiEncoder
from tests.distributed.harness import run_distributed
from tests.tiny_models import tiny_bert_config, token_batch

G, NUM_LANG = 2, 3
TOL = 1e-10


def _model(shared: bool, lora: bool = False, train_layers: int | None = None) -> BiEncoder:
    torch.manual_seed(0)
    cfg = tiny_bert_config(
        shared_towers=shared,
        lora=LoraConfig(enabled=lora, r=4, alpha=8, target_modules=["query", "value"]),
        train_layers=train_layers,
    )
    model = BiEncoder.from_config(cfg).double()
    if lora:  # lora_B starts at zero, which would leave lora_A without gradient: start both non-trivial
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_B" in name:
                    prm.copy_(0.1 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return model


def _data(b: int, m: int):
    q = token_batch(b, 6, 1)
    p = token_batch(b * G, 9, 2)
    x = token_batch(m, 9, 3)
    lang = torch.arange(m) % NUM_LANG
    return q, p, x, lang


def _step(model, q, p, x, lang, collectives=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    qe, pe, xe = model(q[0], q[1], p[0], p[1], x[0], x[1])
    out = lancer_loss(
        qe, pe, G, xe, lang, NUM_LANG, temperature=0.2, erasure_weight=1.0, collectives=collectives
    )
    out.loss.backward()
    opt.step()
    params = torch.cat([_full(prm.detach()).reshape(-1) for prm in model.parameters()])
    return out, params


def _rank_program(
    rank: int,
    world: int,
    b: int,
    m: int,
    shared: bool,
    lora: bool = False,
    top: int | None = None,
    fsdp=False,
):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lancer_dist.dist import fsdp_shard
    from lancer_dist.train.parallel import fsdp_blocks

    q, p, x, lang = _data(b, m)
    bq, bx = b // world, m // world
    qs, ps, xs = (
        slice(rank * bq, (rank + 1) * bq),
        slice(rank * bq * G, (rank + 1) * bq * G),
        slice(rank * bx, (rank + 1) * bx),
    )
    model = _model(shared, lora, top)
    wrapped = fsdp_shard(model, fsdp_blocks(model), torch.device("cpu")) if fsdp else DDP(model)
    out, params = _step(
        wrapped,
        (q[0][qs], q[1][qs]),
        (p[0][ps], p[1][ps]),
        (x[0][xs], x[1][xs]),
        lang[xs],
        ProcessGroupCollectives(),
    )
    full = [_full(prm.grad) for prm in model.parameters() if prm.grad is not None]
    grads = torch.cat([g.reshape(-1) for g in full])
    return {
        "total": out.total,
        "retrieval": out.retrieval,
        "erasure": out.erasure,
        "params": params,
        "grads": grads,
    }


def _full(t):
    """A DTensor shard (FSDP2) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize(
    ("world", "shared", "lora", "top", "fsdp"),
    [
        (2, True, False, None, False),
        (3, True, False, None, False),
        (2, False, False, None, False),
        (2, True, True, None, False),
        (2, True, False, 1, False),
        (2, True, False, 1, True),
    ],
)
def test_ddp_step_equals_single_process(tmp_path, world, shared, lora, top, fsdp):
    b, m = 6, 12
    res = run_distributed(_rank_program, world, tmp_path, b, m, shared, lora, top, fsdp)
    model = _model(shared, lora, top)
    before = torch.cat([prm.detach().reshape(-1).clone() for prm in model.parameters()])
    q, p, x, lang = _data(b, m)
    ref, ref_params = _step(model, q, p, x, lang)
    ref_grads = torch.cat([prm.grad.reshape(-1) for prm in model.parameters() if prm.grad is not None])
    with_grad = [n for n, prm in model.named_parameters() if prm.grad is not None]
    if lora:  # only the adapters train, and all of them got a gradient
        assert with_grad == [n for n, prm in model.named_parameters() if ".lora_" in n]
        assert all(float(prm.grad.abs().max()) > 0 for n, prm in model.named_parameters() if ".lora_" in n)
    if top is not None:  # only the top layer (of 2) trains; every one of its parameters got a gradient
        assert with_grad == [n for n, prm in model.named_parameters() if ".layer.1." in n]
        assert all(float(model.get_parameter(n).grad.abs().max()) > 0 for n in with_grad)
    assert float(ref.erasure) > 0 and float(ref.retrieval) > 0
    assert float((ref_params - before).abs().max()) > 1e-4  # the step did move the parameters
    for r in res:
        for key in ("total", "retrieval", "erasure"):
            assert abs(float(r[key] - getattr(ref, key))) <= TOL, key
        assert float((r["grads"] - ref_grads).abs().max()) <= TOL
        assert float((r["params"] - ref_params).abs().max()) <= TOL

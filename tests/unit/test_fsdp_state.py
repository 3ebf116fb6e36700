"""The FSDP2 checkpoint format (lancer_dist/train/fsdp_state.py) in one process, and the FSDP2 block choice. The
2-rank sharded save, kill and resume are in tests/integration/test_fsdp.py."""

from __future__ import annotations

import json

import torch

from lancer_dist.model import BiEncoder
from lancer_dist.train.fsdp_state import FSDP_DIR, load_fsdp_state, save_fsdp_state
from lancer_dist.train.parallel import fsdp_blocks
from tests.tiny_models import tiny_bert_config, token_batch


def _step(model: BiEncoder, opt: torch.optim.Optimizer, seed: int) -> None:
    ids, mask = token_batch(6, 12, seed)
    q = model.encode(ids, mask, is_query=True)
    (q @ q.T).logsumexp(-1).sum().backward()
    opt.step()
    opt.zero_grad()


def test_fsdp_blocks_are_the_transformer_layers_innermost_first():
    model = BiEncoder.from_config(tiny_bert_config())
    names = [type(b).__name__ for b in fsdp_blocks(model)]
    assert names.count("BertLayer") == 2 and "BertEmbeddings" in names  # BertModel._no_split_modules
    mods = list(model.modules())
    assert [mods.index(b) for b in fsdp_blocks(model)] == sorted(
        (mods.index(b) for b in fsdp_blocks(model)), reverse=True
    )  # children before their parents: fully_shard must see the inner modules first


def test_fsdp_state_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    a = BiEncoder.from_config(tiny_bert_config()).double()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    _step(a, opt_a, 1)
    save_fsdp_state(tmp_path, a, opt_a)
    files = sorted(p.name for p in (tmp_path / FSDP_DIR).iterdir())
    assert files == ["rank00000.json", "rank00000.safetensors"]  # safetensors + JSON: no pickle
    meta = json.loads((tmp_path / FSDP_DIR / "rank00000.json").read_text())
    assert meta["world_size"] == 1 and not any(v["sharded"] for v in meta["tensors"].values())

    torch.manual_seed(1)  # different weights, fresh optimizer
    b = BiEncoder.from_config(tiny_bert_config()).double()
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    load_fsdp_state(tmp_path, b, opt_b)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["weight_decay"] == 0.1
    # the Adam moments and step came back: the next step is identical
    _step(a, opt_a, 2)
    _step(b, opt_b, 2)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n

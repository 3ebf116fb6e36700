"""``build_optimizer``'s weight-decay groups: matrices decay, biases and LayerNorm weights do not, judged by the
parameter's real shape. Under DeepSpeed ZeRO-3 (zero.Init) a parameter is an empty 1-D shard whose real shape is
``ds_shape``: judged by the shard, every matrix landed in the no-decay group and ZeRO-3 trained without weight decay
(tests/integration/test_family_matrix.py measures it end to end: relative update error 1.3e-2 against float64)."""

from __future__ import annotations

import torch

from lancer_dist.config import RunConfig
from lancer_dist.train.trainer import build_optimizer


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 3)
        self.LayerNorm = torch.nn.LayerNorm(3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def _groups(model: torch.nn.Module) -> tuple[set[int], set[int], float]:
    cfg = RunConfig()
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    return {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}, cfg.train.weight_decay


def test_matrices_decay_biases_and_layernorm_do_not_frozen_are_left_out():
    m = _Tiny()
    decay, no_decay, _ = _groups(m)
    assert decay == {id(m.dense.weight)}
    assert no_decay == {id(m.dense.bias), id(m.LayerNorm.weight), id(m.LayerNorm.bias)}


def test_a_zero3_partitioned_matrix_still_decays():
    m = _Tiny()
    # what zero.Init leaves on a rank: an empty 1-D tensor, the real shape in ds_shape
    for mod in (m.dense,):
        full = tuple(mod.weight.shape)
        mod.weight.data = torch.empty(0)
        mod.weight.ds_shape = torch.Size(full)  # type: ignore[attr-defined]
        mod.bias.data = torch.empty(0)
        mod.bias.ds_shape = torch.Size((full[0],))  # type: ignore[attr-defined]
    assert m.dense.weight.dim() == 1  # the shard alone would say "bias"
    decay, no_decay, _ = _groups(m)
    assert id(m.dense.weight) in decay and id(m.dense.bias) in no_decay

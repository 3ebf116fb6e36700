from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from lancer_dist.config import ModelConfig
from lancer_dist.model import BiEncoder, pool

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(backbone_config=TINY, tokenizer="x", dropout=0.0, **kw)


def test_model_code_never_imports_torch_distributed():
    for f in (REPO / "lancer_dist" / "model").rglob("*.py"):
        tree = ast.parse(f.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.startswith("torch.distributed") or n == "lancer_dist.dist" for n in names), f


def test_pooling_modes():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "cls"), h[:, 0])
    assert torch.allclose(pool(h, mask, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, mask, "mean")[1], h[1].mean(0))
    with pytest.raises(ValueError, match="pooler"):
        pool(h, mask, "pooler", None)


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_encode_shapes_normalisation_and_padding_invariance(pooling):
    torch.manual_seed(0)
    model = BiEncoder.from_config(_cfg(pooling=pooling, normalize=True)).eval()
    ids = torch.tensor([[2, 5, 6, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    e = model.encode(ids, mask)
    assert e.shape == (1, 8)
    assert torch.allclose(e.norm(dim=-1), torch.ones(1), atol=1e-6)
    e_short = model.encode(ids[:, :4], mask[:, :4])
    assert torch.allclose(e, e_short, atol=1e-5)  # padding does not change the embedding


def test_two_towers_start_equal_and_are_separate_parameters():
    torch.manual_seed(0)
    model = BiEncoder.from_config(_cfg(shared_towers=False, pooling="mean"))
    assert model.passage_backbone is not None
    ids, mask = torch.tensor([[2, 7, 3]]), torch.ones(1, 3, dtype=torch.long)
    assert torch.allclose(model.encode(ids, mask, is_query=True), model.encode(ids, mask, is_query=False))
    shared = BiEncoder.from_config(_cfg(pooling="mean"))
    n_two = sum(p.numel() for p in model.parameters())
    n_one = sum(p.numel() for p in shared.parameters())
    assert n_two == 2 * n_one


def test_score_scale_expresses_paper_and_authors_code():
    q = torch.tensor([[3.0, 4.0]])
    p = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    dot = BiEncoder(torch.nn.Identity(), pooling="cls", normalize=False, temperature=1.0)
    assert torch.allclose(dot.score(q, p), q @ p.T)
    cos10 = BiEncoder(torch.nn.Identity(), pooling="cls", normalize=True, temperature=0.1)
    qn, pn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    assert torch.allclose(cos10.score(qn, pn), 10 * qn @ pn.T)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = BiEncoder.from_config(_cfg(pooling="mean")).double()
    b = BiEncoder.from_config(_cfg(pooling="mean", gradient_checkpointing=True)).double()
    b.load_state_dict(a.state_dict())
    ids, mask = torch.tensor([[2, 7, 9, 3]]), torch.ones(1, 4, dtype=torch.long)
    for m in (a, b):
        m.train()
        m.encode(ids, mask).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-12)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BiEncoder.from_config(_cfg(pooling="mean", normalize=True)).eval()
    out = model.save_pretrained(tmp_path / "enc")
    assert (out / "modules.json").is_file() and (out / "lancer_encoder.json").is_file()
    loaded = BiEncoder.from_config(ModelConfig(name_or_path=str(out), pooling="mean", normalize=True)).eval()
    ids, mask = torch.tensor([[2, 7, 9, 3]]), torch.ones(1, 4, dtype=torch.long)
    assert torch.allclose(model.encode(ids, mask), loaded.encode(ids, mask), atol=1e-6)


def test_backbone_uses_sdpa_attention():
    from lancer_dist.config import ModelConfig
    from lancer_dist.model import BiEncoder

    cfg = ModelConfig(
        backbone_config={
            "model_type": "bert",
            "vocab_size": 50,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        tokenizer="unused",
    )
    model = BiEncoder.from_config(cfg)
    assert model.query_backbone.config._attn_implementation == "sdpa"

"""The bi-encoder: a transformers backbone, pooling, optional L2 normalisation. Returns embeddings, nothing else.

No distributed code lives here (parallelism is applied from outside by the trainer).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lancer_dist.config import ConfigError, ModelConfig

ENCODER_META = "lancer_encoder.json"


def pool(
    hidden_BTH: Tensor, attention_mask_BT: Tensor, pooling: str, pooler_output: Tensor | None = None
) -> Tensor:
    """Pool token states [B, T, H] into [B, H]: the first token (cls), the masked mean, or the backbone's pooler."""
    if pooling == "cls":
        return hidden_BTH[:, 0]
    if pooling == "mean":
        m_BT1 = attention_mask_BT.unsqueeze(-1).to(hidden_BTH.dtype)
        return (hidden_BTH * m_BT1).sum(1) / m_BT1.sum(1).clamp(min=1.0)
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("pooling 'pooler' needs a backbone with a pooler layer (pooler_output is None)")
        return pooler_output
    raise ValueError(f"unknown pooling {pooling!r}: expected 'cls', 'mean' or 'pooler'")


def _set_dropout(config: Any, p: float) -> None:
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "dropout",
        "attention_dropout",
        "classifier_dropout",
    ):
        if hasattr(config, name):
            setattr(config, name, p)


def build_backbone(cfg: ModelConfig, subdir: str | None = None) -> Any:
    """A transformers AutoModel: pretrained from ``cfg.name_or_path`` or random from ``cfg.backbone_config``."""
    from transformers import AutoConfig, AutoModel

    if cfg.backbone_config is not None:
        conf_dict = dict(cfg.backbone_config)
        model_type = conf_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **conf_dict)
        if cfg.dropout is not None:
            _set_dropout(config, cfg.dropout)
        return _without_unused_pooler(lambda **kw: AutoModel.from_config(config, **kw), cfg.pooling)
    path = cfg.name_or_path if subdir is None else str(Path(cfg.name_or_path) / subdir)
    kwargs: dict[str, Any] = {}
    with _names_field("model.name_or_path", cfg.name_or_path):
        if cfg.dropout is not None:
            config = AutoConfig.from_pretrained(path)
            _set_dropout(config, cfg.dropout)
            kwargs["config"] = config
        return _without_unused_pooler(
            lambda **kw: AutoModel.from_pretrained(path, **kwargs, **kw), cfg.pooling
        )


@contextlib.contextmanager
def _names_field(field_name: str, value: str) -> Iterator[None]:
    """A model or tokenizer that cannot be loaded (no such directory, no such hub id, no hub reachable) is a
    ConfigError naming the config field, not a transformers traceback."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            field_name, value, f"a transformers model directory or a reachable hub id ({first})"
        ) from None


def _without_unused_pooler(make: Any, pooling: str) -> Any:
    """Build the backbone without its pooler layer unless pooling is 'pooler': parameters that get no gradient
    would stall data-parallel gradient reduction (DDP buckets) and waste optimizer state. Attention is
    ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient kernels on GPU) where
    the architecture supports it, else the architecture's own."""

    def build(**kw: Any) -> Any:
        try:
            return make(attn_implementation="sdpa", **kw)
        except (ValueError, ImportError):  # an architecture without an SDPA implementation
            return make(**kw)

    if pooling == "pooler":
        return build()
    try:
        return build(add_pooling_layer=False)
    except TypeError:  # architectures without a pooler option
        return build()


class BiEncoder(nn.Module):
    """Query and passage encoder (shared Siamese backbone, or two towers).

    ``encode(input_ids, attention_mask, is_query)`` returns [B, H] embeddings; ``score(q, p)`` returns
    ``q @ p.T / temperature``.
    """

    def __init__(
        self,
        query_backbone: Any,
        passage_backbone: Any = None,
        *,
        pooling: str = "cls",
        normalize: bool = False,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.query_backbone: Any = query_backbone
        # None = shared towers (Siamese); registering the same module twice would duplicate its parameters.
        self.passage_backbone: Any = passage_backbone
        self.pooling = pooling
        self.normalize = normalize
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> BiEncoder:
        two_towers = not cfg.shared_towers
        if two_towers and cfg.backbone_config is None and (Path(cfg.name_or_path) / "query").is_dir():
            q, p = build_backbone(cfg, "query"), build_backbone(cfg, "passage")
        else:
            q = build_backbone(cfg)
            p = None
            if two_towers:
                p = build_backbone(cfg)
                p.load_state_dict(q.state_dict())  # two towers start from the same weights
        model = cls(q, p, pooling=cfg.pooling, normalize=cfg.normalize, temperature=cfg.temperature)
        if cfg.freeze_embeddings:
            for bb in model.backbones():
                emb = bb.get_input_embeddings()
                if emb is not None:
                    emb.weight.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def backbones(self) -> list[Any]:
        return [self.query_backbone] + ([self.passage_backbone] if self.passage_backbone is not None else [])

    @property
    def shared(self) -> bool:
        return self.passage_backbone is None

    @property
    def embedding_dim(self) -> int:
        return int(self.query_backbone.config.hidden_size)

    def gradient_checkpointing_enable(self) -> None:
        for bb in self.backbones():
            # non-reentrant checkpointing: works with DDP / ZeRO and with several forwards per step
            if hasattr(bb, "activation_checkpointing_enable"):  # transformers >= 5.x name
                bb.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def encode(self, input_ids: Tensor, attention_mask: Tensor, is_query: bool = False) -> Tensor:
        backbone = (
            self.query_backbone if (is_query or self.passage_backbone is None) else self.passage_backbone
        )
        out = backbone(input_ids=input_ids, attention_mask=attention_mask)
        pooler_output = getattr(out, "pooler_output", None)
        emb_BH = pool(out.last_hidden_state, attention_mask, self.pooling, pooler_output)
        if self.normalize:
            emb_BH = F.normalize(emb_BH, dim=-1)
        return emb_BH

    def forward(
        self,
        query_input_ids: Tensor | None = None,
        query_attention_mask: Tensor | None = None,
        passage_input_ids: Tensor | None = None,
        passage_attention_mask: Tensor | None = None,
        erasure_input_ids: Tensor | None = None,
        erasure_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The multi-task forward: one call encodes the retrieval queries, their passages and the multilingual
        erasure passages (through the passage tower), so that a data-parallel wrapper (DDP, DeepSpeed) sees
        exactly one forward per step. Returns (q [B, H], p [P, H], x [M, H]); None where no input was given."""
        q = p = x = None
        if query_input_ids is not None:
            assert query_attention_mask is not None
            q = self.encode(query_input_ids, query_attention_mask, is_query=True)
        if passage_input_ids is not None:
            assert passage_attention_mask is not None
            p = self.encode(passage_input_ids, passage_attention_mask, is_query=False)
        if erasure_input_ids is not None:
            assert erasure_attention_mask is not None
            x = self.encode(erasure_input_ids, erasure_attention_mask, is_query=False)
        return q, p, x

    def score(self, q_BD: Tensor, p_PD: Tensor) -> Tensor:
        return q_BD @ p_PD.T / self.temperature

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer: Any = None,
        extra: dict | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> Path:
        """Save as a transformers model directory that sentence-transformers can load (shared towers), or as
        ``query/`` + ``passage/`` sub-directories (two towers). Pooling and normalisation are recorded both in
        sentence-transformers' module files and in ``lancer_encoder.json``. ``state_dict`` (this module's keys)
        replaces the parameters' own values: the full weights gathered from sharded (ZeRO-3) parameters."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        targets = (
            [(out, self.query_backbone, "query_backbone.")]
            if self.shared
            else [
                (out / "query", self.query_backbone, "query_backbone."),
                (out / "passage", self.passage_backbone, "passage_backbone."),
            ]
        )
        for d, bb, prefix in targets:
            assert bb is not None
            sub = None
            if state_dict is not None:
                sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            bb.save_pretrained(d, safe_serialization=True, state_dict=sub)
            if tokenizer is not None:
                tokenizer.save_pretrained(d)
            _write_sentence_transformers_modules(d, self.embedding_dim, self.pooling, self.normalize)
        meta = {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "temperature": self.temperature,
            "shared_towers": self.shared,
            **(extra or {}),
        }
        (out / ENCODER_META).write_text(json.dumps(meta, indent=2))
        return out


def _write_sentence_transformers_modules(d: Path, dim: int, pooling: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    pool_dir = d / "1_Pooling"
    pool_dir.mkdir(exist_ok=True)
    mode = {"cls": "cls", "mean": "mean", "pooler": "cls"}[pooling]
    (pool_dir / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": dim,
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (d / "2_Normalize").mkdir(exist_ok=True)
    (d / "modules.json").write_text(json.dumps(modules, indent=2))


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    field_name = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    with _names_field(field_name, cfg.tokenizer or cfg.name_or_path):
        return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path)

"""The bi-encoder: a transformers backbone, pooling, optional L2 normalisation. Returns embeddings, nothing else.

No distributed code lives here (parallelism is applied from outside by the trainer).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lancer_dist.config import ConfigError, ModelConfig
from lancer_dist.model.hub import hub_kwargs


def pool(
    hidden_BTH: Tensor, attention_mask_BT: Tensor, pooling: str, pooler_output: Tensor | None = None
) -> Tensor:
    """Pool token states [B, T, H] into [B, H]: the first token (cls), the masked mean, the backbone's pooler
    (LaBSE / BERT: dense + tanh over the first token), or the last real token (decoders; found from the mask, so
    left and right padding both work)."""
    if pooling == "cls":
        return hidden_BTH[:, 0]
    if pooling == "mean":
        m_BT1 = attention_mask_BT.unsqueeze(-1).to(hidden_BTH.dtype)
        return (hidden_BTH * m_BT1).sum(1) / m_BT1.sum(1).clamp(min=1.0)
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("pooling 'pooler' needs a backbone with a pooler layer (pooler_output is None)")
        return pooler_output
    if pooling == "last_token":
        B, T = attention_mask_BT.shape
        # position of the last 1 in each row: T - 1 - (index of the first 1 in the flipped row)
        last_B = T - 1 - attention_mask_BT.flip(1).long().argmax(1)
        return hidden_BTH[torch.arange(B, device=hidden_BTH.device), last_B]
    raise ValueError(f"unknown pooling {pooling!r}: expected 'cls', 'mean', 'pooler' or 'last_token'")


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
    """A transformers AutoModel: pretrained from ``cfg.name_or_path`` or random from ``cfg.backbone_config``, in
    ``cfg.torch_dtype`` with ``cfg.attn_implementation``."""
    from transformers import AutoConfig, AutoModel

    if cfg.backbone_config is not None:
        conf_dict = dict(cfg.backbone_config)
        model_type = conf_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **conf_dict)
        if cfg.dropout is not None:
            _set_dropout(config, cfg.dropout)
        return _build(lambda **kw: AutoModel.from_config(config, **kw), cfg)
    path = cfg.name_or_path if subdir is None else str(Path(cfg.name_or_path) / subdir)
    kwargs: dict[str, Any] = hub_kwargs(cfg.revision, cfg.cache_dir, cfg.trust_remote_code)
    with _names_field("model.name_or_path", cfg.name_or_path):
        if cfg.dropout is not None:
            config = AutoConfig.from_pretrained(path, **kwargs)
            _set_dropout(config, cfg.dropout)
            kwargs["config"] = config
        return _build(lambda **kw: AutoModel.from_pretrained(path, **kwargs, **kw), cfg)


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


def check_attn_implementation(attn: str) -> None:
    """flash_attention_2 needs the ``flash_attn`` package: without it, a ConfigError naming the field (transformers
    would raise an ImportError, which must not be mistaken for an architecture without that kernel)."""
    import importlib.util

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation",
            attn,
            "sdpa or eager: flash_attention_2 needs the flash_attn package, which is not installed here",
        )


def _build(make: Any, cfg: ModelConfig) -> Any:
    """Build the backbone in ``cfg.torch_dtype`` with ``cfg.attn_implementation``, and without its pooler layer
    unless pooling is 'pooler': parameters that get no gradient would stall data-parallel gradient reduction (DDP
    buckets) and waste optimizer state. ``sdpa`` (the default: torch's fused flash / memory-efficient kernels on
    GPU) falls back to the architecture's own attention where it has no SDPA implementation; an explicit eager or
    flash_attention_2 is never replaced (an architecture without it raises)."""
    check_attn_implementation(cfg.attn_implementation)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.torch_dtype]

    def build(**kw: Any) -> Any:
        try:
            model = make(attn_implementation=cfg.attn_implementation, dtype=dtype, **kw)
        except (ValueError, ImportError) as e:
            if cfg.attn_implementation != "sdpa":
                raise ConfigError(
                    "model.attn_implementation", cfg.attn_implementation, f"supported ({e})"
                ) from e
            model = make(dtype=dtype, **kw)  # an architecture without an SDPA implementation
        return model

    if cfg.pooling == "pooler":
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
        prompts: dict[str, str] | None = None,
        max_seq_length: int = 512,
    ):
        super().__init__()
        # Text prefixes ({"query": ..., "passage": ...}) and length: not used by encode(), which gets token ids;
        # recorded with the saved model so that loaders (lancer's and sentence-transformers') use the same text rule.
        self.prompts = dict(prompts or {})
        self.max_seq_length = max_seq_length
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
        model = cls(
            q,
            p,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            temperature=cfg.temperature,
            prompts={"query": cfg.query_text_prefix, "passage": cfg.passage_prefix},
            max_seq_length=max(cfg.max_query_length, cfg.max_passage_length),
        )
        if cfg.lora.enabled:
            from lancer_dist.model.lora import apply_lora

            model.query_backbone = apply_lora(model.query_backbone, cfg.lora)
            if model.passage_backbone is not None:
                model.passage_backbone = apply_lora(model.passage_backbone, cfg.lora)
        if cfg.freeze_embeddings:
            for bb in model.backbones():
                emb = bb.get_input_embeddings()
                if emb is not None:
                    emb.weight.requires_grad_(False)
        if cfg.train_layers is not None:
            from lancer_dist.model.freeze import train_top_layers

            for bb in model.backbones():
                train_top_layers(bb, cfg.train_layers)
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
        if self.pooling == "last_token":
            # Decoders are left-padded: positions count real tokens only, so a text's states do not depend on
            # how much padding its batch needed (RoPE makes a shift nearly harmless, absolute positions do not).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        else:
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
        """Save to ``out_dir``: see :func:`lancer_dist.model.io.save_encoder` (the one owner of the format)."""
        from lancer_dist.model.io import save_encoder

        return save_encoder(self, out_dir, tokenizer, extra=extra, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> BiEncoder:
        """Load a directory written by :meth:`save_pretrained` (or a plain transformers model): see
        :func:`lancer_dist.model.io.load_encoder_dir`."""
        from lancer_dist.model.io import load_encoder_dir

        return load_encoder_dir(path, trust_remote_code=trust_remote_code)[0]


def prepare_tokenizer(tokenizer: Any, pooling: str) -> Any:
    """The one text rule's tokenizer side, applied in training, encoding and to the saved model (in place;
    idempotent): a tokenizer without a pad token pads with its EOS token; for ``last_token`` pooling it pads on
    the left and appends EOS to every text (as Qwen3-Embedding / e5-mistral do), through the fast tokenizer's
    post-processor, so truncation keeps the EOS and sentence-transformers loading the saved tokenizer does the same.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token to pad with: set one in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if pooling != "last_token":
        return tokenizer
    tokenizer.padding_side = "left"
    # init_kwargs is what save_pretrained writes to tokenizer_config.json: the saved tokenizer pads left too
    tokenizer.init_kwargs["padding_side"] = "left"
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pooling 'last_token' needs a tokenizer with an EOS token to append")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if probe and probe[-1] == eos_id:
        return tokenizer  # already appends EOS (Qwen3-Embedding's tokenizer, or prepared before)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("pooling 'last_token' needs a fast (tokenizers-backed) tokenizer to append EOS")
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    full = json.loads(backend.to_str())
    full["post_processor"] = _append_eos_processor(full.get("post_processor"), eos, int(eos_id))
    backend.post_processor = Tokenizer.from_str(json.dumps(full)).post_processor
    return tokenizer


def _append_eos_processor(pp: dict | None, eos: str, eos_id: int) -> dict:
    """A post-processor (tokenizers JSON) that does what ``pp`` does and then appends ``eos`` to each sequence.

    A template (Llama's ``<s> $A``) gets the EOS inside it; chaining a second template after a first one in a
    ``Sequence`` does not compose (it puts the EOS right after the BOS). Anything else (ByteLevel offset trimming)
    runs first, then the EOS template."""
    eos_item = {"SpecialToken": {"id": eos, "type_id": 0}}
    eos_spec = {"id": eos, "ids": [eos_id], "tokens": [eos]}

    def template(t: dict) -> dict:
        t = dict(t)
        single, pair = list(t["single"]), list(t["pair"])
        # after each sequence ($A, $B): the EOS with that sequence's type id
        new_pair: list[dict] = []
        for item in pair:
            new_pair.append(item)
            if "Sequence" in item:
                new_pair.append({"SpecialToken": {"id": eos, "type_id": item["Sequence"]["type_id"]}})
        t["single"], t["pair"] = [*single, eos_item], new_pair
        t["special_tokens"] = {**t.get("special_tokens", {}), eos: eos_spec}
        return t

    plain = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }
    if pp is None:
        return template(plain)
    if pp.get("type") == "TemplateProcessing":
        return template(pp)
    if pp.get("type") == "Sequence":
        subs = list(pp["processors"])
        idx = [i for i, sub in enumerate(subs) if sub.get("type") == "TemplateProcessing"]
        if idx:
            subs[idx[-1]] = template(subs[idx[-1]])
        else:
            subs.append(template(plain))
        return {**pp, "processors": subs}
    return {"type": "Sequence", "processors": [pp, template(plain)]}


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    field_name = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    # the revision pins model.name_or_path's repository; a separate tokenizer is taken at its default revision
    kwargs = hub_kwargs(None if cfg.tokenizer else cfg.revision, cfg.cache_dir, cfg.trust_remote_code)
    with _names_field(field_name, cfg.tokenizer or cfg.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path, **kwargs)
    return prepare_tokenizer(tokenizer, cfg.pooling)

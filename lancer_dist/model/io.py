"""The saved-encoder format: the ONE place that writes and reads it (training saves, evaluation and mining load).

A saved encoder is a transformers model directory that sentence-transformers can load (shared towers), or
``query/`` + ``passage/`` sub-directories (two towers), each with its tokenizer, plus ``lancer_encoder.json``:
pooling, normalisation, temperature, shared towers and the query / passage prompts (the text prefixes the model was
trained with). A plain transformers model directory without that file loads with mean pooling + L2 normalisation
(the E5 / Contriever convention).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lancer_dist.model.lora import is_lora, lora_scaling, merge_lora_state_dict

if TYPE_CHECKING:
    from lancer_dist.model.encoder import BiEncoder

__all__ = ["ENCODER_META", "load_encoder_dir", "read_encoder_meta", "save_encoder"]

ENCODER_META = "lancer_encoder.json"
# what a plain transformers directory (no lancer_encoder.json) is read as: E5 / Contriever
_PLAIN_META: dict[str, Any] = {
    "pooling": "mean",
    "normalize": True,
    "temperature": 1.0,
    "shared_towers": True,
}


def save_encoder(
    model: BiEncoder,
    out_dir: str | Path,
    tokenizer: Any = None,
    extra: dict | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Save ``model`` as a transformers model directory that sentence-transformers can load (shared towers), or as
    ``query/`` + ``passage/`` sub-directories (two towers). Pooling and normalisation are recorded both in
    sentence-transformers' module files and in ``lancer_encoder.json`` (``extra``: more keys for it). ``state_dict``
    (the BiEncoder's keys) replaces the parameters' own values: the full weights gathered from sharded (ZeRO-3)
    parameters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = (
        [(out, model.query_backbone, "query_backbone.")]
        if model.shared
        else [
            (out / "query", model.query_backbone, "query_backbone."),
            (out / "passage", model.passage_backbone, "passage_backbone."),
        ]
    )
    for d, bb, prefix in targets:
        assert bb is not None
        sub = None
        if state_dict is not None:
            sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_lora(bb):  # adapters merged: a plain transformers model of the base architecture
            sub = merge_lora_state_dict(sub if sub is not None else bb.state_dict(), lora_scaling(bb))
            bb = bb.get_base_model()
        # a copy: transformers' save_pretrained empties the dict it is given
        bb.save_pretrained(d, safe_serialization=True, state_dict=dict(sub) if sub is not None else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        _write_sentence_transformers_modules(
            d,
            model.embedding_dim,
            model.pooling,
            model.normalize,
            sub if sub is not None else bb.state_dict(),
            model.prompts,
            model.max_seq_length,
        )
    meta = {
        "pooling": model.pooling,
        "normalize": model.normalize,
        "temperature": model.temperature,
        "shared_towers": model.shared,
        "prompts": model.prompts,
        **(extra or {}),
    }
    (out / ENCODER_META).write_text(json.dumps(meta, indent=2))
    return out


def read_encoder_meta(path: str | Path) -> dict[str, Any]:
    """``lancer_encoder.json`` of the encoder directory ``path``; for a plain transformers directory, mean pooling
    + normalisation (E5, Contriever)."""
    meta_file = Path(path) / ENCODER_META
    if not meta_file.is_file():
        return dict(_PLAIN_META)
    try:
        return dict(json.loads(meta_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e})") from e


def load_encoder_dir(path: str | Path, trust_remote_code: bool = False) -> tuple[BiEncoder, Any]:
    """Load the encoder directory ``path`` (written by :func:`save_encoder`, or a plain transformers model) as a
    :class:`BiEncoder` on the CPU with dropout 0, its saved prompts kept on the model (so that saving it again
    keeps them), and its tokenizer prepared for its pooling (the query tower's for two
    towers). Returns ``(model, tokenizer)``."""
    from transformers import AutoTokenizer

    from lancer_dist.config import ModelConfig
    from lancer_dist.model.encoder import BiEncoder, prepare_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {path} does not exist")
    meta = read_encoder_meta(path)
    prompts = meta.get("prompts") or {}
    cfg = ModelConfig(
        name_or_path=str(path),
        pooling=meta.get("pooling", "mean"),
        normalize=bool(meta.get("normalize", True)),
        temperature=float(meta.get("temperature", 1.0)),
        shared_towers=bool(meta.get("shared_towers", True)),
        dropout=0.0,
        trust_remote_code=trust_remote_code,
        query_prefix=str(prompts.get("query", "")),
        passage_prefix=str(prompts.get("passage", "")),
    )
    model = BiEncoder.from_config(cfg)
    tok_dir = path / "query" if (path / "query").is_dir() else path
    tokenizer = prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code), cfg.pooling
    )
    return model, tokenizer


def _write_sentence_transformers_modules(
    d: Path,
    dim: int,
    pooling: str,
    normalize: bool,
    weights: dict[str, Tensor],
    prompts: dict[str, str],
    max_seq_length: int,
) -> None:
    """sentence-transformers' module files: Transformer -> Pooling [-> Dense(tanh) for 'pooler'] [-> Normalize],
    the query / passage prompts and the sequence length, so that ``SentenceTransformer(d)`` encodes as
    :meth:`BiEncoder.encode` does. ``weights`` is the backbone's state dict (the pooler's dense layer is copied)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    (d / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    pool_dir = d / "1_Pooling"
    pool_dir.mkdir(exist_ok=True)
    # LaBSE's pooler = the first token's state through dense + tanh: CLS pooling followed by a Dense module
    mode = {"cls": "cls", "mean": "mean", "pooler": "cls", "last_token": "lasttoken"}[pooling]
    # the long-standing key format (sentence-transformers 2.x to 6.x read it)
    (pool_dir / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": dim,
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": mode == "lasttoken",
                "include_prompt": True,
            },
            indent=2,
        )
    )
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if pooling == "pooler":
        from safetensors.torch import save_file

        w, b = weights.get("pooler.dense.weight"), weights.get("pooler.dense.bias")
        if w is None or b is None:
            raise ValueError("pooling 'pooler': the backbone has no pooler.dense layer to save")
        dense_dir = d / "2_Dense"
        dense_dir.mkdir(exist_ok=True)
        (dense_dir / "config.json").write_text(
            json.dumps(
                {
                    "in_features": int(w.shape[1]),
                    "out_features": int(w.shape[0]),
                    "bias": True,
                    "activation_function": "torch.nn.modules.activation.Tanh",
                },
                indent=2,
            )
        )
        save_file(
            {"linear.weight": w.detach().cpu().contiguous(), "linear.bias": b.detach().cpu().contiguous()},
            str(dense_dir / "model.safetensors"),
        )
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        n = len(modules)
        modules.append(
            {
                "idx": n,
                "name": str(n),
                "path": f"{n}_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (d / f"{n}_Normalize").mkdir(exist_ok=True)
    (d / "modules.json").write_text(json.dumps(modules, indent=2))
    (d / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if normalize else "dot",
            },
            indent=2,
        )
    )

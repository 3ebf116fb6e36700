"""The saved-encoder format has one owner (lancer_dist.model.io): what save writes, load reads back exactly, and
the evaluation spec that Ray workers rebuild the encoder from is the run's ModelConfig, not a copy of its fields."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from lancer_dist.config import ModelConfig
from lancer_dist.model import BiEncoder, prepare_tokenizer
from lancer_dist.model.io import ENCODER_META, load_encoder_dir
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from tests.tiny_models import tiny_bert_config
from tests.unit.test_one_text_rule import _tokenizer


@pytest.mark.parametrize("shared_towers", [True, False])
def test_save_then_load_gives_the_same_model(tmp_path: Path, shared_towers: bool) -> None:
    tok = _tokenizer()
    cfg = dataclasses.replace(
        tiny_bert_config(
            vocab_size=len(tok),
            shared_towers=shared_towers,
            query_prefix="query: ",
            query_instruction="find it",
            passage_prefix="passage: ",
        ),
        pooling="cls",
        temperature=0.05,
    )
    tok = prepare_tokenizer(tok, cfg.pooling)
    torch.manual_seed(1)
    model = BiEncoder.from_config(cfg)
    if not shared_towers:  # two towers start equal: make them differ, so a swapped tower would show
        with torch.no_grad():
            for prm in model.passage_backbone.parameters():
                prm.add_(0.1 * torch.randn_like(prm))
    saved = model.save_pretrained(tmp_path / "m", tok, extra={"step": 7})
    meta = json.loads((saved / ENCODER_META).read_text())
    assert meta["step"] == 7 and meta["prompts"]["query"] == cfg.query_text_prefix

    loaded, loaded_tok = load_encoder_dir(saved)
    assert (loaded.pooling, loaded.normalize, loaded.temperature, loaded.shared) == (
        "cls",
        True,
        0.05,
        shared_towers,
    )
    assert loaded.prompts == {"query": cfg.query_text_prefix, "passage": "passage: "}
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) == 0.0
    assert loaded_tok("a b")["input_ids"] == tok("a b")["input_ids"]
    assert BiEncoder.from_pretrained(saved).state_dict().keys() == ref.keys()


def test_encoder_spec_is_the_run_model_config(tmp_path: Path) -> None:
    cfg = ModelConfig(
        query_prefix="query: ",
        query_instruction="find it",
        passage_prefix="passage: ",
        max_query_length=9,
        max_passage_length=17,
    )
    spec = EncoderSpec.from_model_config(str(tmp_path), cfg)
    assert spec.model is cfg
    assert pickle.loads(pickle.dumps(spec)) == spec  # what a Ray actor receives
    assert spec.prefixes() == ("Instruct: find it\nQuery: query: ", "passage: ")
    # the encoding manifest's record (a resume with another spec is refused): unchanged keys, JSON-able
    assert json.loads(json.dumps(spec.to_dict())) == {
        "path": str(tmp_path),
        "query_prefix": "Instruct: find it\nQuery: query: ",
        "passage_prefix": "passage: ",
        "max_query_length": 9,
        "max_passage_length": 17,
        "tokenizer": None,
        "trust_remote_code": False,
    }
    # no config: the prompts saved with the model
    assert EncoderSpec(str(tmp_path)).prefixes({"query": "q: ", "passage": "p: "}) == ("q: ", "p: ")


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"encoder directory .*nope"):
        load_encoder(EncoderSpec(str(tmp_path / "nope")))

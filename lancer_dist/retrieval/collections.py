"""Evaluation collections: one in-memory form (:class:`Collection`), the BEIR layout, and readers for the layouts
of the paper's benchmarks.

BEIR layout: ``corpus.jsonl`` (``_id``, ``title``, ``text``, + ``lang`` here), ``queries.jsonl`` (``_id``,
``text``, + ``lang``), ``qrels/<split>.tsv`` (header ``query-id corpus-id score``, tab-separated).

Readers (each converts its benchmark's files into a :class:`Collection`; every bad input raises
:class:`~lancer_dist.data.errors.DataError` naming the file, the line or record, and the field):

* :func:`read_beir` - the layout above;
* :func:`read_clef` - TREC/CLEF SGML topics (``<top><num>..</num><XX-title>..</XX-title><XX-desc>..``), documents
  (``<DOC><DOCNO>..</DOCNO>..</DOC>``, any inner tags; plain or .gz) and TREC qrels (``qid 0 docid rel``);
* :func:`read_xquad_r` - LAReQA's XQuAD-R (SQuAD-style JSON per language, with ``sentences`` /
  ``sentence_breaks``): the candidates are the sentences of every language; a question's relevant candidates are
  its answer sentence in every language (the 11-way parallel pool of LAReQA);
* :func:`read_xor_retrieve` - XOR-Retrieve question jsonl (``id``, ``question``, ``lang``, ``answers``) over a DPR
  passage file (tsv ``id text title`` or jsonl): relevance from a TREC qrels file, from ``positive_ctxs`` in the
  questions, or (as XOR-Retrieve's own evaluation) a passage containing an answer string;
* :func:`read_miracl` - MIRACL topics tsv (``qid<TAB>query``), TREC qrels and corpus jsonl (``docid``, ``title``,
  ``text``; several files / .gz);
* :func:`read_xtreme_up` - XTREME-UP retrieval jsonl (``id``, ``title``, ``context``, ``question``: the question's
  gold passage has that ``id``) plus the index jsonl (``id``, ``title``, ``context``).

Records that are dropped on purpose (qrels naming a query or document absent from the collection, documents
without any text) are counted in ``Collection.skipped`` and reported, never silently lost.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lancer_dist.data.errors import DataError, iter_jsonl

__all__ = [
    "FORMATS",
    "Collection",
    "read_beir",
    "read_clef",
    "read_collection",
    "read_miracl",
    "read_trec_qrels",
    "read_xor_retrieve",
    "read_xquad_r",
    "read_xtreme_up",
]

PathLike = str | Path


@dataclass
class Collection:
    """``corpus``: doc id -> {"text", "title", "lang"}; ``queries``: query id -> {"text", "lang", ...extra fields
    such as "answers"}; ``qrels``: query id -> {doc id: relevance}. ``lang`` may be None when unknown."""

    corpus: dict[str, dict[str, Any]] = field(default_factory=dict)
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    name: str = ""
    skipped: Counter[str] = field(default_factory=Counter)

    def add_doc(
        self,
        where: str,
        key: str,
        doc_id: Any,
        text: Any,
        title: Any = "",
        lang: str | None = None,
        text_field: str = "text",
    ) -> None:
        doc_id = _id(where, key, doc_id, "_id")
        if not isinstance(text, str):
            raise DataError(
                where, key, text_field, f"expected a string, got {type(text).__name__}", "bad_text"
            )
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise DataError(
                where, key, "title", f"expected a string, got {type(title).__name__}", "bad_title"
            )
        if doc_id in self.corpus:
            raise DataError(where, key, "_id", f"duplicate document id {doc_id!r}", "duplicate_id")
        if not text.strip() and not title.strip():
            self.skipped["documents_without_text"] += 1
            return
        self.corpus[doc_id] = {"text": text, "title": title, "lang": lang}

    def add_query(
        self,
        where: str,
        key: str,
        qid: Any,
        text: Any,
        lang: str | None = None,
        text_field: str = "text",
        **extra: Any,
    ) -> str:
        qid = _id(where, key, qid, "_id")
        if not isinstance(text, str) or not text.strip():
            raise DataError(where, key, text_field, "missing or empty query text", "empty_text")
        if qid in self.queries:
            raise DataError(where, key, "_id", f"duplicate query id {qid!r}", "duplicate_id")
        self.queries[qid] = {"text": text, "lang": lang, **extra}
        return qid

    def add_qrel(self, qid: str, doc_id: str, rel: int) -> None:
        self.qrels.setdefault(qid, {})[doc_id] = rel

    def drop_dangling_qrels(self) -> None:
        """Remove (and count) judgements whose query or document is not in the collection."""
        for qid in list(self.qrels):
            if qid not in self.queries:
                self.skipped["qrels_unknown_query"] += len(self.qrels.pop(qid))
                continue
            docs = self.qrels[qid]
            for did in [d for d in docs if d not in self.corpus]:
                del docs[did]
                self.skipped["qrels_unknown_document"] += 1
            if not docs:
                del self.qrels[qid]

    def check(self) -> None:
        """Raise ``ValueError`` if a judgement names a query or document that is not in the collection."""
        for qid, docs in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"collection {self.name!r}: qrels name query {qid!r}, not in the queries")
            for did in docs:
                if did not in self.corpus:
                    raise ValueError(
                        f"collection {self.name!r}: qrels of query {qid!r} name document {did!r}, "
                        "not in the corpus"
                    )

    def stats(self) -> dict[str, Any]:
        langs_c = Counter(str(d.get("lang")) for d in self.corpus.values())
        langs_q = Counter(str(q.get("lang")) for q in self.queries.values())
        return {
            "name": self.name,
            "documents": len(self.corpus),
            "queries": len(self.queries),
            "judged_queries": len(self.qrels),
            "qrels": sum(len(d) for d in self.qrels.values()),
            "relevant": sum(1 for d in self.qrels.values() for r in d.values() if r > 0),
            "queries_without_relevant": sum(
                1 for q in self.queries if not any(r > 0 for r in self.qrels.get(q, {}).values())
            ),
            "document_languages": dict(sorted(langs_c.items())),
            "query_languages": dict(sorted(langs_q.items())),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def write_beir(self, out_dir: PathLike, split: str = "test") -> Path:
        """Write the BEIR layout (``lang`` is added to corpus and query lines when known)."""
        corpus = (
            {"_id": did, "title": d.get("title", ""), "text": d["text"]}
            | ({"lang": d["lang"]} if d.get("lang") is not None else {})
            for did, d in self.corpus.items()
        )
        queries = (
            {"_id": qid, **{k: v for k, v in q.items() if v is not None}} for qid, q in self.queries.items()
        )
        qrels = ((qid, did, rel) for qid, docs in self.qrels.items() for did, rel in docs.items())
        write_beir(out_dir, corpus, queries, qrels, split)
        return Path(out_dir)


def write_beir(
    out_dir: PathLike,
    corpus: Iterable[Mapping[str, Any]],
    queries: Iterable[Mapping[str, Any]],
    qrels: Iterable[tuple[str, str, int]],
    split: str = "test",
) -> dict[str, int]:
    """THE BEIR writer: ``corpus.jsonl`` and ``queries.jsonl`` (each row written as given: a JSON object with
    ``_id``), ``qrels/<split>.tsv`` (``query-id corpus-id score`` with a header line). Rows are streamed; returns
    how many corpus, query and qrels lines were written."""
    out = Path(out_dir)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    n = {"corpus": 0, "queries": 0, "qrels": 0}
    for name, rows in (("corpus", corpus), ("queries", queries)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
                n[name] += 1
    with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, did, rel in qrels:
            f.write(f"{qid}\t{did}\t{int(rel)}\n")
            n["qrels"] += 1
    return n


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _id(where: str, key: str, value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(where, key, name, f"expected a string or integer id, got {value!r}", "bad_id")
    s = str(value).strip()
    if not s or any(c in s for c in "\t\n\r"):
        raise DataError(where, key, name, f"empty id or id with a tab / newline: {value!r}", "bad_id")
    return s


def _open_text(path: PathLike, encoding: str = "utf-8") -> IO[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, "<file>", "no such file", "missing_file")
    if p.suffix == ".gz":
        return gzip.open(p, "rt", encoding=encoding, newline="")
    return open(p, encoding=encoding, newline="")


def _read_text(path: PathLike, encoding: str = "utf-8") -> str:
    try:
        with _open_text(path, encoding) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            path, None, "<file>", f"not valid {encoding} ({e}); pass the file's encoding", "encoding"
        ) from e


def _req(where: str, key: str, obj: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``obj`` (aliases of one field), else a DataError naming the first."""
    for name in names:
        if name in obj:
            return obj[name]
    raise DataError(where, key, names[0], "missing", f"missing_{names[0]}")


def _expand(paths: PathLike | Sequence[PathLike], pattern: str = "*") -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for p in map(Path, items):
        out.extend(sorted(q for q in p.glob(pattern) if q.is_file()) if p.is_dir() else [p])
    return out


def _add_jsonl_docs(
    coll: Collection,
    path: Path,
    id_fields: tuple[str, ...],
    text_fields: tuple[str, ...],
    lang: str | None,
    *,
    lang_from_line: bool = False,
) -> None:
    """Every line of a JSONL corpus file as a document: the id is the first of ``id_fields`` present, the text the
    first of ``text_fields``, the title ``title`` (optional); the language is ``lang``, or the line's own ``lang``
    field when ``lang_from_line`` (``lang`` is then the default). Errors name the file, the line and the field."""
    where = str(path)
    for key, obj in iter_jsonl(path):
        text_field = next((f for f in text_fields if f in obj), text_fields[0])
        coll.add_doc(
            where,
            key,
            _req(where, key, obj, *id_fields),
            _req(where, key, obj, *text_fields),
            obj.get("title", ""),
            _lang(where, key, obj, lang) if lang_from_line else lang,
            text_field=text_field,
        )


def read_trec_qrels(path: PathLike, coll: Collection | None = None) -> dict[str, dict[str, int]]:
    """TREC qrels: ``qid iter docid rel`` per line (whitespace-separated; the iteration column is ignored)."""
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise DataError(
                    path,
                    f"line {n}",
                    "<columns>",
                    f"expected 4 columns 'qid iter docid rel', got {len(parts)}",
                    "bad_qrels",
                )
            try:
                rel = int(parts[3])
            except ValueError as e:
                raise DataError(path, f"line {n}", "rel", f"not an integer: {parts[3]!r}", "bad_qrels") from e
            qrels.setdefault(parts[0], {})[parts[2]] = rel
    if coll is not None:
        for qid, docs in qrels.items():
            for did, rel in docs.items():
                coll.add_qrel(qid, did, rel)
    return qrels


# --------------------------------------------------------------------------------------------------------------
# BEIR
# --------------------------------------------------------------------------------------------------------------


def read_beir(path: PathLike, split: str = "test", lang: str | None = None) -> Collection:
    """Read a BEIR directory. ``lang`` is the default language for lines without a ``lang`` field."""
    root = Path(path)
    coll = Collection(name=root.name)
    _add_jsonl_docs(coll, root / "corpus.jsonl", ("_id",), ("text",), lang, lang_from_line=True)
    for key, obj in iter_jsonl(root / "queries.jsonl"):
        where = str(root / "queries.jsonl")
        extra = {k: v for k, v in obj.items() if k not in ("_id", "text", "lang", "metadata")}
        coll.add_query(
            where,
            key,
            _req(where, key, obj, "_id"),
            _req(where, key, obj, "text"),
            _lang(where, key, obj, lang),
            **extra,
        )
    qpath = root / "qrels" / f"{split}.tsv"
    with _open_text(qpath) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if n == 1 and parts[:2] == ["query-id", "corpus-id"]:
                continue
            if len(parts) != 3:
                raise DataError(
                    qpath,
                    f"line {n}",
                    "<columns>",
                    f"expected 3 tab-separated columns 'query-id corpus-id score', got {len(parts)}",
                    "bad_qrels",
                )
            try:
                rel = int(float(parts[2]))
            except ValueError as e:
                raise DataError(
                    qpath, f"line {n}", "score", f"not a number: {parts[2]!r}", "bad_qrels"
                ) from e
            coll.add_qrel(parts[0], parts[1], rel)
    coll.drop_dangling_qrels()
    return coll


def _lang(where: str, key: str, obj: Mapping[str, Any], default: str | None) -> str | None:
    lang = obj.get("lang", default)
    if lang is not None and (not isinstance(lang, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", lang)):
        raise DataError(where, key, "lang", f"not a language code: {lang!r}", "bad_lang")
    return lang


# --------------------------------------------------------------------------------------------------------------
# CLEF (TREC SGML)
# --------------------------------------------------------------------------------------------------------------

_TOP = re.compile(r"<top>(.*?)</top>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_DOC = re.compile(r"<DOC>(.*?)</DOC>", re.S | re.I)
_DOCNO = re.compile(r"<DOCNO>\s*(.*?)\s*</DOCNO>", re.S | re.I)
_TITLE_TAGS = ("TITLE", "HEADLINE", "TI", "HL", "HEAD")
_SKIP_TAGS = ("DOCNO", "DOCID")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _topic_field(block: str, name: str) -> tuple[str | None, str | None]:
    """(text, language prefix) of ``<name>`` or ``<XX-name>``; the closing tag is optional (old TREC topics)."""
    m = re.search(
        rf"<(?:([A-Za-z]{{2}})-)?{name}>(.*?)(?:</(?:[A-Za-z]{{2}}-)?{name}>|(?=<[A-Za-z-]+>)|$)",
        block,
        re.S | re.I,
    )
    if not m:
        return None, None
    text = re.sub(r"\s+", " ", m.group(2)).strip()
    return text, (m.group(1).lower() if m.group(1) else None)


def _num_key(qid: str) -> str:
    digits = re.sub(r"\D", "", qid)
    return str(int(digits)) if digits else qid


def read_clef(
    topics: PathLike | Sequence[PathLike],
    docs: Sequence[tuple[PathLike, str | None]] | PathLike,
    qrels: PathLike | None = None,
    *,
    topic_fields: Sequence[str] = ("title", "desc"),
    topic_lang: str | None = None,
    encoding: str = "utf-8",
) -> Collection:
    """CLEF ad-hoc: topics files, document files (``(path or directory, language)`` pairs) and TREC qrels.

    The query text joins ``topic_fields`` (``title``, ``desc``, ``narr``). The topic language comes from the tag
    prefix (``<DE-title>``) or ``topic_lang``. Qrels topic ids are matched exactly, else by their number
    (``C041`` = ``41``), since CLEF qrels and topics do not always spell them the same way.
    """
    coll = Collection(name="clef")
    for path in _expand(topics):
        text = _read_text(path, encoding)
        for i, m in enumerate(_TOP.finditer(text)):
            key = f"topic {i + 1} (line {_line_of(text, m.start())})"
            block = m.group(1)
            num_m = re.search(r"<num>\s*(?:Number:)?\s*(.*?)\s*(?:</num>|\n)", block, re.S | re.I)
            if not num_m or not num_m.group(1).strip():
                raise DataError(path, key, "num", "missing topic number", "missing_num")
            parts, lang = [], topic_lang
            for name in topic_fields:
                value, prefix = _topic_field(block, name)
                if name == "title" and not value:
                    raise DataError(path, key, "title", "missing or empty topic title", "missing_title")
                if value:
                    parts.append(value)
                lang = lang or prefix
            coll.add_query(str(path), key, num_m.group(1).strip(), " ".join(parts), lang, text_field="title")
        if "<top>" in text.lower() and text.lower().count("<top>") != text.lower().count("</top>"):
            raise DataError(
                path,
                f"line {_line_of(text, text.lower().rfind('<top>'))}",
                "</top>",
                "unclosed <top> element",
                "truncated",
            )
    doc_items = [(docs, None)] if isinstance(docs, (str, Path)) else list(docs)
    for dpath, dlang in doc_items:
        for path in _expand(dpath):
            _read_sgml_docs(coll, path, dlang, encoding)
    if qrels is not None:
        by_num = {_num_key(q): q for q in coll.queries}
        for qid, ds in read_trec_qrels(qrels).items():
            target = qid if qid in coll.queries else by_num.get(_num_key(qid), qid)
            for did, rel in ds.items():
                coll.add_qrel(target, did, rel)
    coll.drop_dangling_qrels()
    return coll


def _read_sgml_docs(coll: Collection, path: Path, lang: str | None, encoding: str) -> None:
    text = _read_text(path, encoding)
    n_open = len(re.findall(r"<DOC>", text, re.I))
    seen = 0
    for m in _DOC.finditer(text):
        seen += 1
        body = m.group(1)
        line = _line_of(text, m.start())
        no = _DOCNO.search(body)
        if not no or not no.group(1).strip():
            raise DataError(
                path, f"<DOC> at line {line}", "DOCNO", "missing document number", "missing_docno"
            )
        key = f"DOCNO {no.group(1).strip()} (line {line})"
        title = ""
        for tag in _TITLE_TAGS:
            t = re.search(rf"<{tag}>(.*?)</{tag}>", body, re.S | re.I)
            if t:
                title = re.sub(r"\s+", " ", _TAG.sub(" ", t.group(1))).strip()
                body = body[: t.start()] + body[t.end() :]
                break
        for tag in _SKIP_TAGS:
            body = re.sub(rf"<{tag}>.*?</{tag}>", " ", body, flags=re.S | re.I)
        content = re.sub(r"\s+", " ", _TAG.sub(" ", body)).strip()
        coll.add_doc(str(path), key, no.group(1).strip(), content, title, lang)
    if seen != n_open:
        raise DataError(
            path,
            f"line {_line_of(text, text.upper().rfind('<DOC>'))}",
            "</DOC>",
            f"{n_open} <DOC> but {seen} complete documents (truncated file?)",
            "truncated",
        )


# --------------------------------------------------------------------------------------------------------------
# LAReQA / XQuAD-R
# --------------------------------------------------------------------------------------------------------------


def _lang_files(files: Mapping[str, PathLike] | Sequence[PathLike]) -> list[tuple[str, Path]]:
    if isinstance(files, Mapping):
        return [(str(k), Path(v)) for k, v in files.items()]
    return [(Path(p).name.split(".")[0], Path(p)) for p in _expand(files, "*.json")]


def read_xquad_r(files: Mapping[str, PathLike] | Sequence[PathLike]) -> Collection:
    """XQuAD-R / MLQA-R (LAReQA): ``{lang: file}`` or files named ``<lang>.json`` (or a directory of them)."""
    coll = Collection(name="lareqa")
    answers: dict[str, dict[str, str]] = {}  # question id -> {lang: answer sentence doc id}
    for lang, path in _lang_files(files):
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(
                path, None, "<json>", f"invalid JSON: {e.msg} (line {e.lineno})", "bad_json"
            ) from e
        articles = data.get("data") if isinstance(data, dict) else None
        if not isinstance(articles, list):
            raise DataError(path, None, "data", "missing or not a list of articles", "missing_data")
        for a, art in enumerate(articles):
            paras = art.get("paragraphs") if isinstance(art, dict) else None
            if not isinstance(paras, list):
                raise DataError(
                    path, f"data[{a}]", "paragraphs", "missing or not a list", "missing_paragraphs"
                )
            for p, para in enumerate(paras):
                key = f"data[{a}].paragraphs[{p}]"
                spans = _sentence_spans(str(path), key, para)
                context = para["context"]
                doc_ids = []
                for s, (b, end) in enumerate(spans):
                    did = f"{a}_{p}_{s}-{lang}"
                    coll.add_doc(str(path), key, did, context[b:end].strip(), "", lang, f"sentences[{s}]")
                    doc_ids.append(did)
                qas = para.get("qas", [])
                if not isinstance(qas, list):
                    raise DataError(path, key, "qas", "not a list", "bad_qas")
                for j, qa in enumerate(qas):
                    qkey = f"{key}.qas[{j}]"
                    if not isinstance(qa, dict):
                        raise DataError(path, qkey, "<qa>", "expected an object", "bad_qas")
                    qid = _id(str(path), qkey, _req(str(path), qkey, qa, "id"), "id")
                    ans = qa.get("answers")
                    if not isinstance(ans, list) or not ans or not isinstance(ans[0], dict):
                        raise DataError(path, qkey, "answers", "missing or empty", "missing_answers")
                    start = ans[0].get("answer_start")
                    if not isinstance(start, int):
                        raise DataError(
                            path,
                            qkey,
                            "answers[0].answer_start",
                            f"not an integer: {start!r}",
                            "bad_answer_start",
                        )
                    hit = [i for i, (b, end) in enumerate(spans) if b <= start < end]
                    if not hit:
                        raise DataError(
                            path,
                            qkey,
                            "answers[0].answer_start",
                            f"offset {start} is in no sentence of the paragraph",
                            "bad_answer_start",
                        )
                    coll.add_query(
                        str(path),
                        qkey,
                        f"{qid}-{lang}",
                        _req(str(path), qkey, qa, "question"),
                        lang,
                        text_field="question",
                    )
                    answers.setdefault(qid, {})[lang] = doc_ids[hit[0]]
    # Relevant to a question in any language: its answer sentence in every language (parallel questions share ids).
    for qid, by_lang in answers.items():
        for lang in by_lang:
            for did in by_lang.values():
                coll.add_qrel(f"{qid}-{lang}", did, 1)
    coll.drop_dangling_qrels()
    return coll


def _sentence_spans(where: str, key: str, para: Any) -> list[tuple[int, int]]:
    if not isinstance(para, dict) or not isinstance(para.get("context"), str):
        raise DataError(where, key, "context", "missing or not a string", "missing_context")
    context = para["context"]
    breaks = para.get("sentence_breaks")
    if breaks is not None:
        if not isinstance(breaks, list) or not all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(i, int) for i in x) for x in breaks
        ):
            raise DataError(
                where,
                key,
                "sentence_breaks",
                "expected a list of [start, end] integer pairs",
                "bad_sentence_breaks",
            )
        spans = [(int(b), int(e)) for b, e in breaks]
        for i, (b, end) in enumerate(spans):
            if not 0 <= b < end <= len(context):
                raise DataError(
                    where,
                    key,
                    f"sentence_breaks[{i}]",
                    f"[{b}, {end}] outside the context (length {len(context)})",
                    "bad_sentence_breaks",
                )
        return spans
    sents = para.get("sentences")
    if not isinstance(sents, list) or not sents:
        raise DataError(
            where,
            key,
            "sentence_breaks",
            "neither 'sentence_breaks' nor 'sentences' given",
            "missing_sentences",
        )
    spans, pos = [], 0
    for i, s in enumerate(sents):
        if not isinstance(s, str):
            raise DataError(where, key, f"sentences[{i}]", "not a string", "bad_sentences")
        b = context.find(s.strip(), pos)
        if b < 0:
            raise DataError(
                where, key, f"sentences[{i}]", "sentence not found in the context (in order)", "bad_sentences"
            )
        spans.append((b, b + len(s.strip())))
        pos = b + len(s.strip())
    return spans


# --------------------------------------------------------------------------------------------------------------
# XOR-Retrieve
# --------------------------------------------------------------------------------------------------------------


def _norm_tokens(text: str) -> str:
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()))


def _read_passages(coll: Collection, path: Path, lang: str | None) -> None:
    """DPR passages: tsv ``id<TAB>text<TAB>title`` (header optional) or jsonl (``id``/``_id``/``docid``)."""
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        _add_jsonl_docs(coll, path, ("id", "_id", "docid"), ("text", "contents"), lang)
        return
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if not line.strip() or (n == 1 and parts[0] == "id"):
                continue
            if len(parts) != 3:
                raise DataError(
                    path,
                    f"line {n}",
                    "<columns>",
                    f"expected 3 tab-separated columns 'id text title', got {len(parts)}",
                    "bad_passages",
                )
            coll.add_doc(str(path), f"line {n}", parts[0], parts[1], parts[2], lang)


def read_xor_retrieve(
    questions: PathLike,
    passages: PathLike | Sequence[PathLike],
    *,
    qrels: PathLike | None = None,
    passages_lang: str | None = "en",
) -> Collection:
    """XOR-Retrieve (questions in many languages, English passages). Relevance, in order of preference: a TREC
    qrels file; ``positive_ctxs[*].passage_id`` in the questions; else a passage whose tokens contain an answer's
    tokens (lowercased, NFKC; XOR-Retrieve scores by answer-string match). ``answers`` stay on the queries."""
    coll = Collection(name="xor-retrieve")
    for path in _expand(passages):
        _read_passages(coll, path, passages_lang)
    need_match: dict[str, list[str]] = {}
    for key, obj in iter_jsonl(questions):
        where = str(questions)
        answers = obj.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(where, key, "answers", "expected a list of strings", "bad_answers")
        qid = coll.add_query(
            where,
            key,
            _req(where, key, obj, "id"),
            _req(where, key, obj, "question"),
            _lang(where, key, obj, None),
            text_field="question",
            answers=answers,
        )
        pos = obj.get("positive_ctxs")
        if isinstance(pos, list) and pos:
            for i, ctx in enumerate(pos):
                if not isinstance(ctx, dict) or "passage_id" not in ctx:
                    raise DataError(
                        where, key, f"positive_ctxs[{i}].passage_id", "missing", "bad_positive_ctxs"
                    )
                coll.add_qrel(qid, str(ctx["passage_id"]), 1)
        elif answers:
            need_match[qid] = [t for t in (_norm_tokens(a) for a in answers) if t]
    if qrels is not None:
        coll.qrels.clear()
        read_trec_qrels(qrels, coll)
    elif need_match:
        normed = {did: f" {_norm_tokens(d['title'] + ' ' + d['text'])} " for did, d in coll.corpus.items()}
        for qid, answer_toks in need_match.items():
            for did, text in normed.items():
                if any(f" {a} " in text for a in answer_toks):
                    coll.add_qrel(qid, did, 1)
    coll.drop_dangling_qrels()
    return coll


# --------------------------------------------------------------------------------------------------------------
# MIRACL
# --------------------------------------------------------------------------------------------------------------


def read_miracl(
    topics: PathLike, qrels: PathLike, corpus: PathLike | Sequence[PathLike], lang: str
) -> Collection:
    """MIRACL (one language): topics tsv ``qid<TAB>query``, TREC qrels (relevance 0 judgements are kept as 0),
    corpus jsonl files (``docid``, ``title``, ``text``; a directory is globbed for ``*.jsonl*``)."""
    coll = Collection(name=f"miracl-{lang}")
    with _open_text(topics) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 2:
                raise DataError(topics, f"line {n}", "query", "expected 'qid<TAB>query'", "bad_topics")
            coll.add_query(str(topics), f"line {n}", parts[0], "\t".join(parts[1:]), lang, text_field="query")
    for path in _expand(corpus, "*.jsonl*"):
        _add_jsonl_docs(coll, path, ("docid",), ("text",), lang)
    read_trec_qrels(qrels, coll)
    coll.drop_dangling_qrels()
    return coll


# --------------------------------------------------------------------------------------------------------------
# XTREME-UP retrieval
# --------------------------------------------------------------------------------------------------------------


def read_xtreme_up(
    queries: PathLike | Sequence[PathLike],
    index: PathLike | Sequence[PathLike] | None = None,
    *,
    lang: str | None = None,
    index_lang: str | None = None,
) -> Collection:
    """XTREME-UP retrieval (in-language or cross-language): query files ``<lang>.jsonl`` with ``id``, ``title``,
    ``context``, ``question`` (the gold passage is ``id``), and index files with ``id``, ``title``, ``context``.
    The query language is ``lang`` or the file's stem. Query ids are ``<lang>-<n>`` (ids repeat across questions
    about one passage); gold passages missing from the index are added from the query lines."""
    coll = Collection(name="xtreme-up")
    for path in _expand(index or [], "*.jsonl*"):
        _add_jsonl_docs(coll, path, ("id",), ("context",), index_lang)
    counter: Counter[str] = Counter()
    for path in _expand(queries, "*.jsonl*"):
        qlang = lang or path.name.split(".")[0]
        for key, obj in iter_jsonl(path):
            where = str(path)
            did = _id(where, key, _req(where, key, obj, "id"), "id")
            context = _req(where, key, obj, "context")
            if did not in coll.corpus:
                coll.add_doc(where, key, did, context, obj.get("title", ""), index_lang, text_field="context")
            qid = coll.add_query(
                where,
                key,
                f"{qlang}-{counter[qlang]}",
                _req(where, key, obj, "question"),
                qlang,
                text_field="question",
            )
            counter[qlang] += 1
            coll.add_qrel(qid, did, 1)
    coll.drop_dangling_qrels()
    return coll


# --------------------------------------------------------------------------------------------------------------
# Dispatch for the CLI
# --------------------------------------------------------------------------------------------------------------

FORMATS: dict[str, str] = {
    "beir": "dir=DIR [lang]",
    "clef": "topics=FILE... docs[.LANG]=FILE|DIR... [qrels=FILE]",
    "xquad-r": "LANG=FILE... or files=FILE|DIR...",
    "xor-retrieve": "questions=FILE passages=FILE... [qrels=FILE]",
    "miracl": "topics=FILE qrels=FILE corpus=FILE|DIR... lang",
    "xtreme-up": "queries=FILE|DIR... [index=FILE|DIR...] [lang] [index_lang]",
}


def read_collection(
    fmt: str,
    inputs: Iterable[tuple[str, str]],
    *,
    lang: str | None = None,
    split: str = "test",
    encoding: str = "utf-8",
) -> Collection:
    """Read format ``fmt`` from ``(role, path)`` inputs (roles as in :data:`FORMATS`; ``docs.de`` tags a CLEF
    document path with its language)."""
    items = list(inputs)
    roles: dict[str, list[str]] = {}
    for role, path in items:
        roles.setdefault(role, []).append(path)

    def one(role: str, required: bool = True) -> str | None:
        vals = roles.get(role, [])
        if len(vals) > 1 or (required and not vals):
            raise ValueError(
                f"--format {fmt}: expected exactly one --in {role}=PATH (inputs: {FORMATS[fmt]})"
            )
        return vals[0] if vals else None

    if fmt == "beir":
        return read_beir(str(one("dir")), split=split, lang=lang)
    if fmt == "clef":
        docs = [(p, r.split(".", 1)[1] if "." in r else None) for r, p in items if r.split(".")[0] == "docs"]
        if not roles.get("topics") or not docs:
            raise ValueError(f"--format clef: needs --in topics=... and --in docs=... ({FORMATS[fmt]})")
        return read_clef(roles["topics"], docs, one("qrels", False), topic_lang=lang, encoding=encoding)
    if fmt == "xquad-r":
        if "files" in roles:
            return read_xquad_r(roles["files"])
        return read_xquad_r({r: p for r, p in items})
    if fmt == "xor-retrieve":
        return read_xor_retrieve(str(one("questions")), roles.get("passages", []), qrels=one("qrels", False))
    if fmt == "miracl":
        if lang is None:
            raise ValueError("--format miracl: needs --lang")
        return read_miracl(str(one("topics")), str(one("qrels")), roles.get("corpus", []), lang)
    if fmt == "xtreme-up":
        return read_xtreme_up(roles.get("queries", []), roles.get("index"), lang=lang)
    raise ValueError(f"unknown collection format {fmt!r}; known: {sorted(FORMATS)}")

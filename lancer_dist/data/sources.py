"""Source readers: multilingual passages and retrieval groups from Hugging Face datasets or local files, into shards.

Inputs are ``KIND:LOCATION`` strings:

* ``jsonl:<file>`` / ``parquet:<file>`` / ``tsv:<file>`` / ``csv:<file>`` (header row) - one passage (or group)
  per line / row;
* ``c4:<dir>`` - local files of ``allenai/c4``'s multilingual layout: ``<dir>/multilingual/c4-<lang>.tfrecord-
  XXXXX-of-YYYYY.json.gz`` (``<dir>`` may also be the ``multilingual`` folder itself; the validation split is
  ``c4-<lang>-validation.tfrecord-...``), gzipped JSON lines ``{"text", "timestamp", "url"}``, streamed file by file
  and line by line, the language taken from the file name;
* ``hf:<hub id or folder>`` - a Hugging Face dataset. A folder written by ``Dataset.save_to_disk`` is opened with
  ``datasets.load_from_disk``; otherwise ``datasets.load_dataset(id, <config>, split=..., streaming=True)``.
  For passages with ``languages`` given, each language is the dataset *config* (mC4 style: ``load_dataset("mc4",
  "fr", ...)``); with a folder, ``<folder>/<lang>`` is loaded when it exists (the same layout saved to disk).
  After loading, the rows go through the same code whichever way they were loaded.

Passage writing applies, in order: a bad-record check (missing/non-string text or language: an error naming file,
row and field, or with ``skip_bad`` counted), the language filter, ``empty`` text, the length filter
(``min_chars``/``max_chars`` on the stripped text), exact-duplicate removal (per language, on a 128-bit hash of the
stripped text) and the per-language cap: ``sample="head"`` keeps the first ``max_per_language`` (and stops streaming a
per-language source there), ``sample="reservoir"`` keeps a uniform random sample of that size of every passage that
passed the filters (Algorithm R, seeded; the whole stream is read, memory is the cap), written in stream order. Every record that is not written is counted under one reason; the counts are returned, printed
by the CLI, and stored in the manifest's ``source``.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lancer_dist.data.errors import BadRecord, DataError, decoded_lines, iter_jsonl
from lancer_dist.data.shards import Manifest, ShardWriter, check_group

__all__ = [
    "GROUP_FORMATS",
    "GroupOptions",
    "PassageOptions",
    "flagembedding_to_group",
    "iter_rows",
    "msmarco_triple_to_group",
    "sentence_transformers_to_group",
    "tevatron_to_group",
    "text_docid",
    "write_group_shards",
    "write_passage_shards",
]

INPUT_KINDS = ("jsonl", "parquet", "tsv", "csv", "hf", "c4")


def _split_input(spec: str) -> tuple[str, str]:
    kind, sep, loc = spec.partition(":")
    if not sep or kind not in INPUT_KINDS or not loc:
        raise ValueError(f"input {spec!r}: expected KIND:LOCATION with KIND one of {', '.join(INPUT_KINDS)}")
    return kind, loc


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield f"row {row}", rec


def _row(path: Path, lineno: int, cells: list[str], names: Sequence[str], expected: str) -> tuple[str, Any]:
    """``("line N", {name: cell})``, or a :class:`BadRecord` (``bad_row``) when the number of cells is not that of
    ``names``."""
    if len(cells) != len(names):
        err = DataError(path, f"line {lineno}", "<columns>", f"{len(cells)} columns, {expected}", "bad_row")
        return f"line {lineno}", BadRecord(err)
    return f"line {lineno}", dict(zip(names, cells))


def _iter_tsv(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        lines = (text for _, text in decoded_lines(f, path))
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, cells in enumerate(reader, 1):
            if lineno == 1 and [c.strip() for c in cells] == list(columns):
                continue  # a header row naming the columns
            if not cells:
                continue
            yield _row(path, lineno, cells, columns, f"expected {list(columns)}")


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """A CSV file with a header row: each row as a dict in column order (quoted fields may span lines; the label
    is the line the row starts on)."""
    with open(path, "rb") as f:
        lines = (text for _, text in decoded_lines(f, path))
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for cells in reader:
            lineno, start = start, reader.line_num + 1
            if not cells:
                continue
            yield _row(path, lineno, cells, header, f"header has {header}")


def _load_hf(location: str, config: str | None, split: str) -> Iterable[Any]:
    """A Hugging Face dataset as an iterable of row dicts: a ``save_to_disk`` folder or a hub id (streamed)."""
    import datasets

    p = Path(location)
    if p.exists():
        if config is not None and (p / config).is_dir():
            p = p / config
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(p, None, "split", f"no split {split!r} (has {sorted(ds)})", "missing_split")
            ds = ds[split]
        return ds
    return datasets.load_dataset(location, config, split=split, streaming=True)


# allenai/c4 multilingual file names: c4-<lang>.tfrecord-00000-of-01024.json.gz (train) and
# c4-<lang>-validation.tfrecord-00000-of-00004.json.gz (validation); languages may hold '-' (e.g. "zh-Latn").
C4_FILE = re.compile(
    r"^c4-(?P<lang>[A-Za-z0-9-]+?)(?P<validation>-validation)?\.tfrecord-(?P<index>\d{5})-of-(?P<total>\d{5})"
    r"\.json\.gz$"
)


def c4_files(location: str | Path, split: str = "train") -> dict[str, list[Path]]:
    """``{lang: [files in shard-index order]}`` of an ``allenai/c4`` multilingual folder (``<dir>/multilingual`` or
    the folder itself) for ``split`` ("train" or "validation"). Other files are ignored."""
    if split not in ("train", "validation"):
        raise DataError(
            location, None, "split", f"c4: has splits train and validation, not {split!r}", "bad_split"
        )
    root = Path(location)
    if (root / "multilingual").is_dir():
        root = root / "multilingual"
    if not root.is_dir():
        raise DataError(root, None, "file", "no such directory", "missing_file")
    out: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for p in root.iterdir():
        m = C4_FILE.match(p.name)
        if m and bool(m["validation"]) == (split == "validation"):
            out[m["lang"]].append((int(m["index"]), p))
    return {lang: [p for _, p in sorted(files)] for lang, files in sorted(out.items())}


def _iter_c4(files: Sequence[Path]) -> Iterator[tuple[str, str, Any]]:
    """Rows of gzipped JSON-lines files, one file at a time, one line at a time. A line that is not JSON is a
    :class:`BadRecord`; a truncated or corrupt gzip member ends its file with one ``BadRecord`` (``corrupt_gzip``)."""
    for path in files:
        lineno = 0
        try:
            for key, row in iter_jsonl(path, strict=False):
                lineno = int(key.removeprefix("line "))
                yield str(path), key, row
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            err = DataError(
                path, f"line {lineno + 1}", "<gzip>", f"corrupt or truncated gzip ({e})", "corrupt_gzip"
            )
            yield str(path), f"line {lineno + 1}", BadRecord(err)


def iter_rows(
    spec: str, *, config: str | None = None, split: str = "train", tsv_columns: Sequence[str] = ("id", "text")
) -> Iterator[tuple[str, str, Any]]:
    """``(where, row_label, row)`` for every row of an input ``KIND:LOCATION`` (see the module docstring).

    A line that is not JSON or has the wrong number of columns comes as a :class:`BadRecord` in its place (its
    ``error`` names file, line and field), so a writer can count it and go on (``skip_bad``) or raise it."""
    kind, loc = _split_input(spec)
    if kind == "c4":
        files = c4_files(loc, split)
        langs = [config] if config is not None else list(files)
        for lang in langs:
            yield from _iter_c4(files.get(lang, []))
        return
    if kind == "hf":
        where = f"{loc}" + (f" [{config}]" if config else "") + f" split {split}"
        for i, row in enumerate(_load_hf(loc, config, split)):
            yield where, f"row {i + 1}", row
        return
    path = Path(loc)
    if not path.is_file():
        raise DataError(path, None, "file", "no such file", "missing_file")
    it: Iterator[tuple[str, Any]]
    if kind == "jsonl":
        it = iter_jsonl(path, strict=False)  # a line that is not JSON comes as a BadRecord in its place
    elif kind in ("parquet", "csv"):
        it = (_iter_parquet if kind == "parquet" else _iter_csv)(path)
    else:
        it = _iter_tsv(path, tsv_columns)
    for label, row in it:
        yield str(path), label, row


# --------------------------------------------------------------------------------------------------------------
# Passages
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PassageOptions:
    text_field: str = "text"
    lang_field: str = "lang"
    id_field: str = "id"
    # Language of every row of an input without a language column (e.g. one file per language).
    lang: str | None = None
    # Keep only these languages (and, for hub / folder inputs, load one config per language).
    languages: list[str] = field(default_factory=list)
    split: str = "train"
    tsv_columns: list[str] = field(default_factory=lambda: ["id", "text"])
    min_chars: int = 1
    max_chars: int | None = None
    dedup: bool = True
    max_per_language: int | None = None
    # How max_per_language picks: "head" (the first ones) or "reservoir" (a seeded uniform sample of the stream).
    sample: str = "head"
    seed: int = 0
    skip_bad: bool = False
    max_records_per_shard: int = 10000


class Reservoir:
    """A uniform random sample of ``k`` items of a stream of unknown length (Algorithm R), seeded: after ``n``
    offers every offered item is kept with probability ``min(1, k / n)``. ``items()`` returns the kept items in
    the order they were offered (their stream positions), so the output does not depend on the replacement order."""

    def __init__(self, k: int, rng: random.Random):
        self.k, self.rng, self.seen = k, rng, 0
        self._kept: list[tuple[int, Any]] = []

    def offer(self, item: Any) -> None:
        i = self.seen
        self.seen += 1
        if len(self._kept) < self.k:
            self._kept.append((i, item))
            return
        j = self.rng.randrange(self.seen)  # uniform in [0, i]
        if j < self.k:
            self._kept[j] = (i, item)

    def items(self) -> list[Any]:
        return [item for _, item in sorted(self._kept, key=lambda t: t[0])]


def _text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def write_passage_shards(
    inputs: Sequence[str], out_dir: str | Path, opts: PassageOptions, *, overwrite: bool = False
) -> tuple[Manifest, dict[str, Any]]:
    """Write passage shards (one language per shard) from ``inputs``; returns the manifest and the counts
    ``{"written": {lang: n}, "filtered": {reason: n}, "bad": {reason: n}}`` (also stored in the manifest)."""
    if opts.min_chars < 0 or (opts.max_chars is not None and opts.max_chars < opts.min_chars):
        raise ValueError(f"min_chars {opts.min_chars} / max_chars {opts.max_chars}: expected 0 <= min <= max")
    if not inputs:
        raise ValueError("no inputs given")
    if opts.sample not in ("head", "reservoir"):
        raise ValueError(f"passage sample: expected 'head' or 'reservoir', got {opts.sample!r}")
    reservoir = opts.sample == "reservoir" and opts.max_per_language is not None
    reservoirs: dict[str, Reservoir] = {}
    files_read: Counter[str] = Counter()
    keep = set(opts.languages)
    written: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    seen: dict[str, set[bytes]] = defaultdict(set)
    source = {"kind": "passages", "inputs": list(inputs), "options": asdict(opts)}
    with ShardWriter(
        out_dir,
        "passages",
        max_records_per_shard=opts.max_records_per_shard,
        source=source,
        overwrite=overwrite,
    ) as writer:
        for spec in inputs:
            kind, loc = _split_input(spec)
            # Per-language inputs (hub configs, saved sub-folders, c4: files): one language at a time, each streamed
            # only until capped with sample="head". A saved folder without per-language sub-folders is read once.
            per_lang = kind == "hf" and bool(opts.languages)
            if per_lang and Path(loc).exists():
                per_lang = all((Path(loc) / x).is_dir() for x in opts.languages)
            configs: list[str | None] = list(opts.languages) if per_lang else [None]
            if kind == "c4":  # one language per group of files, named by the file names
                found = c4_files(loc, opts.split)
                c4_langs = [x for x in (opts.languages or list(found)) if found.get(x)]
                configs = list(c4_langs)
                for x in opts.languages:
                    if not found.get(x):
                        raise DataError(
                            loc,
                            None,
                            "languages",
                            f"no c4-{x}.tfrecord-* files for split {opts.split}",
                            "missing_file",
                        )
                for x in c4_langs:
                    files_read[x] += len(found[x])
            for config in configs:
                for where, label, row in iter_rows(
                    spec, config=config, split=opts.split, tsv_columns=opts.tsv_columns
                ):
                    lang_default = config or opts.lang
                    try:
                        row = _object(row, where, label)
                        text = row.get(opts.text_field)
                        if not isinstance(text, str):
                            raise DataError(
                                where, label, opts.text_field, "missing or not a string", "missing_text"
                            )
                        lang = row.get(opts.lang_field, lang_default)
                        if not isinstance(lang, str) or not lang:
                            raise DataError(
                                where,
                                label,
                                opts.lang_field,
                                "missing language (give --lang for the file)",
                                "missing_lang",
                            )
                    except DataError as e:
                        if not opts.skip_bad:
                            raise
                        bad[e.reason] += 1
                        continue
                    if keep and lang not in keep:
                        filtered["other_language"] += 1
                        continue
                    stripped = text.strip()
                    if not stripped:
                        filtered["empty"] += 1
                        continue
                    if len(stripped) < opts.min_chars:
                        filtered["too_short"] += 1
                        continue
                    if opts.max_chars is not None and len(stripped) > opts.max_chars:
                        filtered["too_long"] += 1
                        continue
                    if opts.dedup:
                        h = _text_hash(stripped)
                        if h in seen[lang]:
                            filtered["duplicate"] += 1
                            continue
                        seen[lang].add(h)
                    rec: dict[str, Any] = {"text": stripped, "lang": lang, "source": where}
                    rid = row.get(opts.id_field)
                    rec["id"] = str(rid) if rid is not None else f"{Path(where).name}:{label}"
                    if kind == "c4" and isinstance(row.get("url"), str):
                        rec["url"] = row["url"]
                    if reservoir:
                        if lang not in reservoirs:
                            rng = random.Random(f"{opts.seed}:{lang}")  # one stream per language: order-free
                            reservoirs[lang] = Reservoir(int(opts.max_per_language or 0), rng)
                        reservoirs[lang].offer(rec)
                        continue
                    if opts.max_per_language is not None and written[lang] >= opts.max_per_language:
                        filtered["capped"] += 1
                        if config is not None:
                            break  # nothing more of this language will be written: stop streaming it
                        continue
                    writer.write(f"{lang}-{written[lang]:09d}", rec)
                    written[lang] += 1
        for lang, res in sorted(reservoirs.items()):
            filtered["not_sampled"] += res.seen - len(res.items())
            for rec in res.items():
                writer.write(f"{lang}-{written[lang]:09d}", rec)
                written[lang] += 1
        counts: dict[str, Any] = {
            "written": dict(sorted(written.items())),
            "filtered": dict(filtered),
            "bad": dict(bad),
        }
        if files_read:
            counts["c4_files"] = dict(sorted(files_read.items()))
        writer.source["counts"] = counts
    assert writer.manifest is not None
    return writer.manifest, counts


# --------------------------------------------------------------------------------------------------------------
# Retrieval groups: Tevatron, FlagEmbedding, sentence-transformers, MS MARCO triples
# --------------------------------------------------------------------------------------------------------------


# The retrieval formats users bring (``lancer data groups --format``):
# * ``tevatron``: ``{query_id, query, positive_passages: [{docid, title, text}], negative_passages: [...]}``;
# * ``flagembedding``: FlagEmbedding's fine-tuning JSONL ``{query, pos: [text, ...], neg: [text, ...]}`` (extra
#   keys such as ``pos_scores``, ``prompt``, ``type`` are ignored);
# * ``sentence-transformers``: columns in order anchor, positive, negative, negative_2, ... (names free, order
#   matters, as sentence-transformers reads them), from jsonl:, csv:, parquet: or hf:;
# * ``msmarco-triples``: MS MARCO ``triples.train.*.tsv``: ``query<TAB>positive<TAB>negative``, no header, one
#   group (1 positive, 1 negative) per line.
# Formats without document ids get ``text_docid(text)`` (same text = same document), so false-negative masking
# works on them too; a Tevatron passage without a docid keeps the empty id (never masked).
GROUP_FORMATS = ("tevatron", "flagembedding", "sentence-transformers", "msmarco-triples")
TRIPLE_COLUMNS = ("query", "positive", "negative")


@dataclass
class GroupOptions:
    split: str = "train"
    # One of GROUP_FORMATS: how each input row maps to a group.
    format: str = "tevatron"
    # Groups with fewer stored negatives are not written (counted); the reader's group size needs G - 1.
    min_negatives: int = 0
    # Store at most this many negatives per group (the first ones, as given); None = all.
    max_negatives: int | None = None
    skip_bad: bool = False
    max_records_per_shard: int = 10000


def text_docid(text: str) -> str:
    """A document id from the text (stripped): for formats that carry no ids."""
    return "t:" + hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).hexdigest()


def _checked(rec: dict[str, Any], where: str, label: str, field_name: Callable[[str], str]) -> dict[str, Any]:
    """``check_group`` with errors naming the source's field (``field_name`` maps the shard's field label)."""
    try:
        check_group(where, label, rec)
    except DataError as e:
        raise DataError(where, label, field_name(e.field), e.message, e.reason) from None
    return rec


def _object(row: Any, where: str, label: str) -> dict[str, Any]:
    if isinstance(row, BadRecord):  # not JSON, wrong number of columns
        raise row.error
    if not isinstance(row, dict):
        raise DataError(where, label, "<row>", "not an object", "not_object")
    return row


def _present(row: dict[str, Any], name: str) -> dict[str, Any]:
    """``{name: row[name]}`` when the row has it (an absent field is reported as ``missing``)."""
    return {name: row[name]} if name in row else {}


def _text_passages(items: Any, where: str, label: str, name: str, kind: str) -> list[dict[str, Any]]:
    """A list of texts as passages with text ids; non-strings are errors naming ``name[i]``."""
    if not isinstance(items, list):
        raise DataError(where, label, name, "missing or not a list of strings", f"missing_{kind}")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise DataError(
                where, label, f"{name}[{i}]", f"expected a string, got {type(t).__name__}", f"bad_{kind}"
            )
        out.append({"docid": text_docid(t), "text": t})
    return out


def _rename_lists(pos: str, neg: str) -> Callable[[str], str]:
    def rename(fld: str) -> str:
        return fld.replace("positives", pos).replace("negatives", neg)

    return rename


def tevatron_to_group(row: Any, where: str, label: str) -> dict[str, Any]:
    """A Tevatron record ``{query_id, query, positive_passages, negative_passages}`` (each passage ``{docid,
    title, text}``) as a group record ``{query_id, query, positives, negatives}``; :class:`DataError` if malformed."""
    row = _object(row, where, label)

    def passages(name: str) -> Any:
        items = row.get(name)
        if not isinstance(items, list):
            raise DataError(where, label, name, "missing or not a list", f"missing_{name}")
        out = []
        for i, p in enumerate(items):
            if not isinstance(p, dict):
                raise DataError(where, label, f"{name}[{i}]", "not an object", f"bad_{name}")
            q = {"docid": str(p.get("docid", "")), "text": p.get("text"), "title": p.get("title") or ""}
            out.append(q)
        return out

    rec = {
        "query_id": str(row.get("query_id", "")),
        **_present(row, "query"),
        "positives": passages("positive_passages"),
        "negatives": passages("negative_passages"),
    }
    return _checked(rec, where, label, _rename_lists("positive_passages", "negative_passages"))


def flagembedding_to_group(row: Any, where: str, label: str) -> dict[str, Any]:
    """A FlagEmbedding record ``{query, pos: [text], neg: [text]}`` as a group record (text ids)."""
    row = _object(row, where, label)
    rec = {
        **_present(row, "query"),
        "positives": _text_passages(row.get("pos"), where, label, "pos", "positives"),
        "negatives": _text_passages(row.get("neg"), where, label, "neg", "negatives"),
    }
    return _checked(rec, where, label, _rename_lists("pos", "neg"))


def sentence_transformers_to_group(row: Any, where: str, label: str) -> dict[str, Any]:
    """A sentence-transformers row (anchor, positive, negatives... by column order) as a group record."""
    row = _object(row, where, label)
    cols = list(row)
    if len(cols) < 2:
        raise DataError(
            where, label, "<columns>", f"columns {cols}: expected anchor, positive[, negative...]", "bad_row"
        )
    for c in cols:
        if not isinstance(row[c], str):
            raise DataError(where, label, c, f"expected a string, got {type(row[c]).__name__}", "bad_column")
    rec = {
        "query": row[cols[0]],
        "positives": [{"docid": text_docid(row[cols[1]]), "text": row[cols[1]]}],
        "negatives": [{"docid": text_docid(row[c]), "text": row[c]} for c in cols[2:]],
    }

    def column(
        fld: str,
    ) -> str:  # "positives[0].text" -> the positive column, "negatives[i]..." -> its column
        head = fld.split(".", 1)[0]
        if head == "query":
            return cols[0]
        if head.startswith("positives"):
            return cols[1]
        if head.startswith("negatives[") and head.endswith("]"):
            return cols[2 + int(head[len("negatives[") : -1])]
        return fld

    return _checked(rec, where, label, column)


def _triple_column(fld: str) -> str:
    head = fld.split("[", 1)[0]
    return {"positives": "positive", "negatives": "negative"}.get(head, fld)


def msmarco_triple_to_group(row: Any, where: str, label: str) -> dict[str, Any]:
    """An MS MARCO triple ``{query, positive, negative}`` (a ``triples.train`` tsv line) as a group record."""
    row = _object(row, where, label)
    for c in TRIPLE_COLUMNS:
        if not isinstance(row.get(c), str):
            raise DataError(where, label, c, "missing or not a string", f"missing_{c}")
    rec = {
        "query": row["query"],
        "positives": [{"docid": text_docid(row["positive"]), "text": row["positive"]}],
        "negatives": [{"docid": text_docid(row["negative"]), "text": row["negative"]}],
    }
    return _checked(rec, where, label, _triple_column)


_CONVERTERS = {
    "tevatron": tevatron_to_group,
    "flagembedding": flagembedding_to_group,
    "sentence-transformers": sentence_transformers_to_group,
    "msmarco-triples": msmarco_triple_to_group,
}


def write_group_shards(
    inputs: Sequence[str], out_dir: str | Path, opts: GroupOptions, *, overwrite: bool = False
) -> tuple[Manifest, dict[str, Any]]:
    """Write retrieval-group shards from ``inputs`` in ``opts.format`` (see GROUP_FORMATS): ``jsonl:`` /
    ``parquet:`` / ``csv:`` / ``hf:``, and ``tsv:`` for MS MARCO triples."""
    if not inputs:
        raise ValueError("no inputs given")
    if opts.format not in _CONVERTERS:
        raise ValueError(f"group format {opts.format!r}: expected one of {', '.join(GROUP_FORMATS)}")
    convert = _CONVERTERS[opts.format]
    written = 0
    filtered: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    source = {"kind": "groups", "inputs": list(inputs), "options": asdict(opts)}
    with ShardWriter(
        out_dir,
        "groups",
        max_records_per_shard=opts.max_records_per_shard,
        source=source,
        overwrite=overwrite,
    ) as writer:
        for spec in inputs:
            if spec.startswith("tsv:") and opts.format != "msmarco-triples":
                raise ValueError(
                    f"input {spec!r}: tsv: inputs are MS MARCO triples (--format msmarco-triples); "
                    f"{opts.format} groups are read from jsonl:, parquet:, csv: or hf: inputs"
                )
            for where, label, row in iter_rows(spec, split=opts.split, tsv_columns=TRIPLE_COLUMNS):
                try:
                    rec = convert(row, where, label)
                except DataError as e:
                    if not opts.skip_bad:
                        raise
                    bad[e.reason] += 1
                    continue
                if len(rec["negatives"]) < opts.min_negatives:
                    filtered["too_few_negatives"] += 1
                    continue
                if opts.max_negatives is not None:
                    rec["negatives"] = rec["negatives"][: opts.max_negatives]
                writer.write(f"g{written:09d}", rec)
                written += 1
        counts = {"written": written, "filtered": dict(filtered), "bad": dict(bad)}
        writer.source["counts"] = counts
    assert writer.manifest is not None
    return writer.manifest, counts

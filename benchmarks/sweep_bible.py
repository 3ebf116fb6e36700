"""The issue #13 sweep on the offline Bible data: LANCER against its same-seed baseline (lambda = 0), LSAR and LEACE.

Each point trains a LANCER model with ``configs/quickstart.yaml`` plus the point's overrides, and its baseline: the
same overrides with ``loss.erasure_weight=0`` (same seed, same data stream). Then ``lancer eval`` evaluates baseline, baseline + LSAR,
baseline + LEACE and LANCER on the held-out books. Per point it records, from the eval's ``results.json``:

* the language-ID probe accuracy with its 95 % Wilson interval (held-out half of ``eval.probe_per_language``
  passages per language of the multilingual pool),
* L_C over its noise floor on the same held-out passages,
* nDCG@10 on the multilingual Full / Sampled and cross-lingual pools,

writes ``<out>/summary.json`` and ``<out>/summary.md``, and draws the plots (``--img``, default docs/img/).
Already finished trainings / evals in ``<out>`` are reused (delete a directory to rerun it).

    OMP_NUM_THREADS=2 python benchmarks/sweep_bible.py     # every point (hours on 2 CPU cores)
    python benchmarks/sweep_bible.py --points L4-lam3-m8   # one point
    python benchmarks/sweep_bible.py --plot-only           # redraw from <out>/*/eval/results.json

The Bible data and backbones are built by scripts/quickstart.sh / ``lancer data bible`` / ``lancer data backbone``
under ${LANCER_CACHE} (default .cache/lancer). docs/science.md section 4 has the results and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FULL = "model.name_or_path=${LANCER_CACHE}/models/multilingual-e5-small"  # 12 layers, full vocabulary
L4 = "model.name_or_path=${LANCER_CACHE}/models/quickstart-e5-small-L4"  # the quickstart's: 4 layers, pruned
# The quickstart's settings (configs/quickstart.yaml); every point overrides some of them.
QUICK = [
    "model.max_passage_length=32",
    "model.max_query_length=32",
    "train.steps=60",
    "train.warmup_steps=6",
    "train.lr=5e-4",
    "data.erasure.passages_per_language=8",
    "loss.erasure_weight=3",
    "probe.every=30",
    "probe.test_per_language=16",
]
# A larger probe at evaluation: 100 test passages per language (11 languages -> 1100, +-3 points at 50 %).
EVAL = ["eval.probe_per_language=200"]
# Only the three pools the summary reports (the 12-layer encoder makes every encoded pool ~3x dearer).
POOLS_ONLY = "eval.collections=[{}]".format(
    ", ".join(
        f'"${{LANCER_CACHE}}/data/bible-quickstart/eval/{p}"'
        for p in ("multilingual_full", "multilingual_sampled", "crosslingual")
    )
)
# The 12-layer backbone with only its top 2 layers trained (model.train_layers): the frozen layers cost a forward but
# no backward. 40 steps (the quickstart's), the trainer's probe at the end only.
TOP2 = [
    FULL,
    *QUICK,
    "model.train_layers=2",
    "train.steps=40",
    "train.warmup_steps=4",
    "probe.every=40",
    POOLS_ONLY,
]

# name -> overrides of configs/quickstart.yaml for the LANCER run; its baseline is the same + loss.erasure_weight=0
# (same seed, same data stream), trained in <out>/<name>/baseline.
POINTS: dict[str, list[str]] = {
    "L4-lam3-m8": [L4, *QUICK],
    "L4-lam1-m8": [L4, *QUICK, "loss.erasure_weight=1"],
    "L4-lam3-m24": [L4, *QUICK, "data.erasure.passages_per_language=24", "loss.erasure_chunk=104"],
    "L12-lam3-m8": [FULL, *QUICK],
    "L4-lam10-m8": [L4, *QUICK, "loss.erasure_weight=10"],
    "L12-top2-lam3": TOP2,
    "L12-top2-lam10": [*TOP2, "loss.erasure_weight=10"],
    # Round 3 (docs/science.md section 4): the 4-layer points reach a per-step L_C / floor near 1 at lambda = 10, yet
    # the evaluation probe stays at 0.995. A larger lambda pushes the erasure harder at the same step cost; the
    # baseline is L4-lam3-m8's (the same run). lambda = 30 (run first) moved the evaluation probe (0.967 against
    # 0.999, non-overlapping) but put multilingual Full nDCG@10 below the baseline; lambda = 20 met the three
    # criteria of issue #13 (one seed).
    "L4-lam20-m8": [L4, *QUICK, "loss.erasure_weight=20"],
    "L4-lam30-m8": [L4, *QUICK, "loss.erasure_weight=30"],
    # 2026-12-02: the learning rate. At 2e-4 the multilingual gains grow (and hold for a second seed at lambda = 40,
    # the quickstart since then); the seed-7 runs add "train.seed=7", "data.seed=7" to both runs.
    "L4-lam20-m8-lr2e-4": [L4, *QUICK, "train.lr=2e-4", "loss.erasure_weight=20"],
    "L4-lam40-m8-lr2e-4": [L4, *QUICK, "train.lr=2e-4", "loss.erasure_weight=40"],
}
# A point whose baseline is another point's: the same overrides but for loss.erasure_weight, which the baseline sets
# to 0 (same seed, same data stream), so the run would be identical; it is trained once, in <out>/<other>/baseline.
SHARED_BASELINE = {
    "L12-top2-lam10": "L12-top2-lam3",
    "L4-lam10-m8": "L4-lam3-m8",
    "L4-lam20-m8": "L4-lam3-m8",
    "L4-lam30-m8": "L4-lam3-m8",
    "L4-lam40-m8-lr2e-4": "L4-lam20-m8-lr2e-4",
}
# The CLI of this checkout (``python -m``: the same interpreter, independent of which ``lancer`` is on PATH).
LANCER = [sys.executable, "-m", "lancer_dist.cli"]
POOLS = ["multilingual_full", "multilingual_sampled", "crosslingual"]


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(["nice", "-n", "15", *cmd], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def train(out: Path, point: str, variant: str, overrides: list[str], config: str) -> float | None:
    run = out / point / variant
    if (run / "final_model").is_dir():
        return None
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*LANCER, "train", "--config", config, f"name={point}-{variant}", f"output_dir={run}"]
    cmd += [f"tracking.tracking_uri=sqlite:///{out.resolve()}/mlflow.db", *overrides]
    return _run(cmd, out / point / f"{variant}.log")


def evaluate(out: Path, point: str, overrides: list[str], config: str) -> float | None:
    ev = out / point / "eval"
    if (ev / "results.json").is_file():
        return None
    # the same backbone and text lengths, and the point's eval settings
    model = [o for o in overrides if o.startswith(("model.", "eval."))]
    cmd = [
        "lancer",
        "eval",
        "--config",
        config,
        f"name={point}-eval",
        f"output_dir={out / point / 'eval-run'}",
    ]
    base = SHARED_BASELINE.get(point, point)
    cmd += [f"eval.output_dir={ev}", f"eval.model={out / base / 'baseline' / 'final_model'}"]
    cmd += [f"eval.lancer_model={out / point / 'lancer' / 'final_model'}"]
    cmd += [f"tracking.tracking_uri=sqlite:///{out.resolve()}/mlflow.db", *model, *EVAL]
    return _run(cmd, out / point / "eval.log")


def summarise(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """variant -> probe accuracy / interval, L_C over floor, nDCG@10 per pool."""
    rows: dict[str, dict[str, float]] = {}
    for variant, acc in results["probe"].items():
        lo, hi = results["probe_interval"][variant]
        row = {"probe": acc, "probe_low": lo, "probe_high": hi}
        row["lc_over_floor"] = results["probe_erasure"][variant]["erasure_over_floor"]
        for coll, by_lang in results["results"][variant].items():
            if coll in POOLS:
                row[f"{coll} nDCG@10"] = by_lang["all"]["nDCG@10"]
        rows[variant] = row
    return rows


def markdown(summary: dict[str, Any]) -> str:
    cols = ["probe", "lc_over_floor", *(f"{p} nDCG@10" for p in POOLS)]
    lines = [
        "| point | method | probe acc (95 % interval) | L_C / floor | "
        + " | ".join(f"{p} nDCG@10" for p in POOLS)
        + " |"
    ]
    lines.append("|---|---|---|---:|" + "---:|" * len(POOLS))
    for point, rows in summary["points"].items():
        for variant, r in rows.items():
            cells = [
                f"{r['probe']:.3f} ({r['probe_low']:.3f} - {r['probe_high']:.3f})",
                f"{r['lc_over_floor']:.2f}",
            ]
            cells += [f"{r[c]:.4f}" if c in r else "" for c in cols[2:]]
            lines.append(f"| {point} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    points = list(summary["points"])
    variants = list(next(iter(summary["points"].values())))
    width = 0.8 / len(variants)
    written = []
    panels = [
        ("probe", "language-ID probe accuracy (95 % interval)"),
        ("lc_over_floor", "L_C / noise floor (held-out probe passages)"),
        ("multilingual_full nDCG@10", "nDCG@10, multilingual Full pool"),
        ("multilingual_sampled nDCG@10", "nDCG@10, multilingual Sampled pool"),
    ]
    fig, all_axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.2))
    axes = all_axes[: len(panels)]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for j, v in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(points))]
            ys = [summary["points"][p][v].get(key, float("nan")) for p in points]
            kw: dict[str, Any] = {}
            if key == "probe":
                lo = [summary["points"][p][v]["probe_low"] for p in points]
                hi = [summary["points"][p][v]["probe_high"] for p in points]
                kw["yerr"] = [
                    [y - a for y, a in zip(ys, lo, strict=True)],
                    [b - y for y, b in zip(ys, hi, strict=True)],
                ]
                kw["capsize"] = 2
            ax.bar(xs, ys, width, label=v, **kw)
        if key == "lc_over_floor":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(points, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    # The criterion of issue #13 is whether LANCER's interval and its baseline's overlap: the same probe accuracies
    # on an axis that shows the intervals.
    ax = all_axes[-1]
    for j, v in enumerate(v for v in variants if "+" not in v):
        rows = [summary["points"][p][v] for p in points]
        ys = [r["probe"] for r in rows]
        err = [[y - r["probe_low"] for y, r in zip(ys, rows, strict=True)]]
        err.append([r["probe_high"] - y for y, r in zip(ys, rows, strict=True)])
        xs = [i + (j - 0.5) * 0.2 for i in range(len(points))]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=v, color=f"C{variants.index(v)}")
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels(points, rotation=20, fontsize=8)
    ax.set_title("probe accuracy, baseline vs LANCER (95 % intervals)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = img / "sweep_bible.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sweep_bible")
    ap.add_argument("--img", default="docs/img")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated names: " + ", ".join(POINTS))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    points = [p for p in args.points.split(",") if p]
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        ap.error(f"unknown points {unknown}; known: {list(POINTS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seconds: dict[str, float] = {}
    if not args.plot_only:
        for p in points:
            ov = POINTS[p]
            base = SHARED_BASELINE.get(p, p)
            for variant, v_ov in (("baseline", [*ov, "loss.erasure_weight=0"]), ("lancer", ov)):
                s = train(out, base if variant == "baseline" else p, variant, v_ov, args.config)
                if s is not None:
                    seconds[f"train {p} {variant}"] = s
                    print(f"trained {p} {variant} in {s:.0f} s", flush=True)
            s = evaluate(out, p, ov, args.config)
            if s is not None:
                seconds[f"eval {p}"] = s
                print(f"evaluated {p} in {s:.0f} s", flush=True)
    summary: dict[str, Any] = {"points": {}, "overrides": {}, "seconds": seconds}
    for p in POINTS:
        res = out / p / "eval" / "results.json"
        if res.is_file():
            summary["points"][p] = summarise(json.loads(res.read_text()))
            summary["overrides"][p] = POINTS[p]
    if not summary["points"]:
        print("no finished point", file=sys.stderr)
        return 1
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    for path in plot(summary, Path(args.img)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

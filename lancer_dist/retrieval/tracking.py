"""MLflow logging for ``lancer eval`` (a small wrapper; the default store is sqlite next to the run outputs)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EvalTracker", "metric_key"]


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name: ``metric_key("base", "crosslingual", "nDCG@10")`` -> ``base/crosslingual/nDCG_at_10``
    (MLflow allows only alphanumerics, ``_ - . / `` and spaces)."""
    joined = "/".join(parts).replace("@", "_at_").replace("+", "plus_")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", joined)


class EvalTracker:
    """Start one MLflow run; no-op when ``enabled`` is false."""

    def __init__(self, tracking_cfg: Any, output_dir: str | Path, run_name: str):
        self.enabled = bool(tracking_cfg.enabled)
        self.run_id: str | None = None
        self.tracking_uri = ""
        if not self.enabled:
            return
        import mlflow

        out = Path(output_dir).resolve()
        self.tracking_uri = tracking_cfg.tracking_uri or f"sqlite:///{out.parent / 'mlflow.db'}"
        out.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(tracking_cfg.experiment)
        run = mlflow.start_run(run_name=tracking_cfg.run_name or run_name)
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            import math

            import mlflow

            clean = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=subdir)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if self.enabled and rows:
            import mlflow

            columns = list(rows[0])
            mlflow.log_table({c: [r.get(c) for r in rows] for c in columns}, artifact_file=artifact_file)

    def close(self) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run()

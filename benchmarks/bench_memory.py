"""Peak host memory (RSS) per rank of the real trainer on CPU: DDP / DeepSpeed ZeRO-2 / ZeRO-3 / FSDP2, each with and
without LoRA and gradient checkpointing, 2 ranks (torchrun, gloo), a few training steps.

Run (the offline backbone and the test Bible data must be built, e.g. by the test fixtures or scripts/quickstart.sh):

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --model .cache/lancer/models/multilingual-e5-small-L2-v... \
        --data .cache/lancer/data/bible-test --steps 3 [--strategies ddp,zero-2,zero-3,fsdp]

Prints one row per setting: parameters (all / trainable), and per rank the RSS after the imports (before the model
is built), the peak RSS (VmHWM, /proc/self/status) after the steps, and their difference (what the run added on
top of the Python + torch + DeepSpeed baseline). A measurement of these tiny models on this machine, nothing else:
real sizes are the estimates of ``python -m lancer_dist.train.memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(config: str, out: str) -> None:
    """One rank: build the trainer, run the configured steps, write its memory figures."""
    import deepspeed  # noqa: F401  (in the baseline for every strategy)
    import torch

    from lancer_dist.config import load_config
    from lancer_dist.train.trainer import Trainer

    base = _status_kib("VmRSS")
    cfg = load_config(config)
    tr = Trainer(cfg)
    it = iter(tr.stream)
    for _ in range(cfg.train.steps):
        tr.train_step(next(it))
    model = tr.accelerator.unwrap_model(tr.model)
    # under ZeRO-3 a rank's parameters are shards: count the full sizes DeepSpeed records (an FSDP2 DTensor's
    # numel() is already its global size)
    numel = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()]
    trainable = sum(n for n, p in zip(numel, model.parameters(), strict=True) if p.requires_grad)
    rec = {
        "rank": tr.rank,
        "params": sum(numel),
        "trainable": trainable,
        "base_mib": base / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
    }
    Path(out, f"rank{tr.rank}.json").write_text(json.dumps(rec))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _config(tmp: Path, model: str, data: str, steps: int, strategy: str, lora: bool, ckpt: bool) -> Path:
    kind, _, stage = strategy.partition("-")
    cfg = {
        "name": "mem",
        "output_dir": str(tmp / "run"),
        "model": {
            "name_or_path": model,
            "pooling": "mean",
            "normalize": True,
            "temperature": 0.05,
            "max_query_length": 64,
            "max_passage_length": 64,
            "dropout": 0.0,
            "gradient_checkpointing": ckpt,
            "lora": {
                "enabled": lora,
                "r": 8,
                "alpha": 16,
                "target_modules": ["query", "key", "value", "dense"],
            },
        },
        "loss": {"erasure_weight": 1.0},
        "data": {
            "retrieval": {"path": f"{data}/retrieval", "group_size": 2, "queries_per_step": 8},
            "erasure": {
                "path": f"{data}/erasure",
                "languages": ["en", "fr", "zh", "ar"],
                "passages_per_language": 4,
            },
            "num_workers": 0,
            "shuffle_buffer": 8,
        },
        "train": {
            "steps": steps,
            "lr": 1e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "seed": 7,
            "strategy": kind if kind in ("ddp", "fsdp") else "deepspeed",
            "zero_stage": int(stage or 0),
            "checkpoint": {"dir": str(tmp / "ckpt"), "every": 0},
        },
        "probe": {"enabled": False},
        "tracking": {"enabled": False},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategies", default="ddp,zero-2,zero-3,fsdp")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"))
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    print(
        "| strategy | LoRA | grad ckpt | params (trainable) | RSS after imports, MiB | peak RSS, MiB | peak - imports, MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for lora in (False, True):
            for ckpt in (False, True):
                with tempfile.TemporaryDirectory() as t:
                    tmp = Path(t)
                    cfg = _config(tmp, args.model, args.data, args.steps, strategy, lora, ckpt)
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
                    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
                    cmd += [
                        __file__,
                        "--model",
                        args.model,
                        "--data",
                        args.data,
                        "--worker",
                        str(cfg),
                        str(tmp),
                    ]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                    if proc.returncode != 0:
                        raise SystemExit(f"{strategy} lora={lora} ckpt={ckpt} failed:\n{proc.stderr[-4000:]}")
                    recs = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(args.nproc)]
                r0 = recs[0]
                base = " / ".join(f"{r['base_mib']:.0f}" for r in recs)
                peak = " / ".join(f"{r['peak_mib']:.0f}" for r in recs)
                delta = " / ".join(f"{r['peak_mib'] - r['base_mib']:.0f}" for r in recs)
                print(
                    f"| {strategy} | {'yes' if lora else 'no'} | {'yes' if ckpt else 'no'} | "
                    f"{r0['params']:,} ({r0['trainable']:,}) | {base} | {peak} | {delta} |",
                    flush=True,
                )


def _free_port() -> int:
    from lancer_dist.dist import find_free_port

    return find_free_port()


if __name__ == "__main__":
    main()

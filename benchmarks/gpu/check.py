"""The GPU evidence for lancer-dist: one script, one GPU, nothing from a hub. Prints one PASS/FAIL line per check
with its figures, then a summary; exit code 0 iff every check passed. See docs/gpu.md.

    python benchmarks/gpu/check.py            # on one CUDA GPU (NCCL, bf16); target: under 7 minutes on an H200
    python benchmarks/gpu/check.py --cpu      # small sizes, gloo, fp32 on the CPU (run by tests/integration)

Checks
 1. train: ``lancer train`` (torchrun, one process, NCCL) for 20 steps under DDP, DeepSpeed ZeRO-2 and ZeRO-3, bf16,
    on a tiny BERT and on a 12-layer multilingual-e5-small-size BERT; the loss falls (mean of the last 3 steps <
    mean of the first 3); kill -9 after a checkpoint + resume gives the parameters of an uninterrupted run (fp32,
    1e-5).
 2. ranks: two ranks on the one GPU in a process group with NO CPU backend (``backend="cuda:gloo"``: a CPU tensor
    in a collective fails exactly as under NCCL): the trainer's step on 2 x B/2 equals 1 process on B (fp32: loss
    1e-5, relative error of the parameter update 1e-3), and gradient caching with dropout ON equals the full-graph
    reference (tests/distributed/grad_cache_program.py) on the same ranks.
 3. throughput: an XLM-R-base-size encoder (random init from a config), sequence length 256, bf16: tokens/s and
    MFU (model FLOPs / the GPU's dense bf16 peak) of ``Trainer.train_step`` against a bare PyTorch loop doing the
    same forward, loss, backward and AdamW step on the same batch. Targets: lancer within 5% of the bare loop, MFU
    >= 45% (the MFU target is only judged on a GPU whose peak is known: H100 / H200).
 4. encode + search: ``lancer encode``'s encoder (LoadedEncoder) passages/s on the GPU, and exact search on the GPU
    (:func:`exact_topk_torch` on CUDA) == the CPU search (FAISS Flat if installed, else numpy), ties included.

With ``--cpu`` every check runs at small sizes on the CPU over gloo (no MFU, no throughput target) so that the
script is exercised by the test suite. Data and tokenizer are synthetic, written here (no hub, no Bible package).
Wheels for what the GPU machine lacks (deepspeed, faiss-cpu) are installed from ``benchmarks/gpu/wheels`` when that
folder exists (see prepare_wheels.sh). Tracking is off and nothing here imports mlflow or ray.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
LANGS = ["en", "fr", "de", "zh"]
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak, FLOP/s


@dataclass
class Result:
    name: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        figs = " ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        return (
            f"{'PASS' if self.ok else 'FAIL'} {self.name}: {figs}{(' | ' + self.note) if self.note else ''}"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# Environment: wheels, synthetic tokenizer and data, configs, subprocesses
# ----------------------------------------------------------------------------------------------------------------


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # e.g. refused by an import blocker
        return False


def install_wheels() -> str:
    """pip-install deepspeed / faiss-cpu from the carried wheel folder when they are missing."""
    missing = [m for m in ("deepspeed", "faiss") if not have(m)]
    if not missing or not WHEELS.is_dir():
        return "none needed" if not missing else f"missing {missing}, no {WHEELS}"
    pkgs = {"deepspeed": "deepspeed", "faiss": "faiss-cpu"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS)]
    cmd += ["--no-build-isolation", *[pkgs[m] for m in missing]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    return f"installed {missing}" if proc.returncode == 0 else f"pip failed: {proc.stderr[-500:]}"


def write_data(root: Path, n_groups: int, per_lang: int, words: int, seed: int = 0) -> Path:
    """Synthetic multilingual data: each language has its own words; a query shares topic words with its positive.
    ``root/{retrieval,erasure}`` shard directories and ``root/tokenizer``."""
    from lancer_dist.data.shards import ShardWriter

    rng = random.Random(seed)
    lex = {lang: [f"{lang}{i}" for i in range(words)] for lang in LANGS}
    from lancer_dist.retrieval.tiny import word_tokenizer

    word_tokenizer([w for lang in LANGS for w in lex[lang]]).save_pretrained(str(root / "tokenizer"))
    topics = 64

    def text(lang: str, topic: int, n: int) -> str:
        own = [lex[lang][(topic * 7 + j) % words] for j in range(6)]
        return " ".join(rng.choice(own) if rng.random() < 0.6 else rng.choice(lex[lang]) for _ in range(n))

    with ShardWriter(root / "retrieval", "groups", max_records_per_shard=200, overwrite=True) as w:
        for g in range(n_groups):
            t = rng.randrange(topics)
            negs = [rng.randrange(topics) for _ in range(3)]
            w.write(
                f"g{g:06d}",
                {
                    "query": text("en", t, 8),
                    "positives": [{"docid": f"d{g}p", "text": text("en", t, 40)}],
                    "negatives": [
                        {"docid": f"d{g}n{i}", "text": text("en", nt, 40)} for i, nt in enumerate(negs)
                    ],
                },
            )
    with ShardWriter(root / "erasure", "passages", max_records_per_shard=200, overwrite=True) as w:
        for lang in LANGS:
            for i in range(per_lang):
                w.write(f"{lang}{i:06d}", {"text": text(lang, rng.randrange(topics), 40), "lang": lang})
    return root


def model_section(kind: str, vocab: int, cpu: bool) -> dict[str, Any]:
    sizes = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
        # multilingual-e5-small's shape (12 layers, hidden 384, 12 heads, FFN 1536, its 250,037-row embedding)
        "e5small": dict(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536
        ),
    }[kind]
    return {
        "backbone_config": {
            "model_type": "bert",
            "vocab_size": vocab if (cpu or kind == "tiny") else 250037,
            "max_position_embeddings": 512,
            **sizes,
        },
        "pooling": "mean",
        "normalize": True,
        "temperature": 0.05,
        "max_query_length": 16,
        "max_passage_length": 48,
        "dropout": 0.0,
    }


def write_config(path: Path, data: Path, vocab: int, cpu: bool, *, kind: str = "tiny", **train: Any) -> Path:
    import yaml

    run = path.parent / "run"
    cfg = {
        "name": path.stem,
        "output_dir": str(run),
        "model": {**model_section(kind, vocab, cpu), "tokenizer": str(data / "tokenizer")},
        "loss": {"erasure_weight": 1.0},
        "data": {
            "retrieval": {"path": str(data / "retrieval"), "group_size": 2, "queries_per_step": 8},
            "erasure": {"path": str(data / "erasure"), "languages": LANGS, "passages_per_language": 2},
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "train": {
            "steps": 20,
            "lr": 5e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "seed": 3,
            "precision": "fp32" if cpu else "bf16",
            "checkpoint": {"dir": str(run / "checkpoints"), "every": 0, "keep_last": 2},
            **train,
        },
        "probe": {"enabled": False},
        "tracking": {"enabled": False},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return e


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    from lancer_dist.dist import find_free_port

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()), "-m", module, *args,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, err + f"\n[check] timed out after {timeout}s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tail(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if "Error" in ln or "error" in ln] or p.stderr.splitlines()
    return " / ".join(lines[-3:])[-400:]


def train_cmd(cfg: Path) -> list[str]:
    return torchrun(1, "lancer_dist.cli", "train", "--config", str(cfg))


def _params(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------------


def check_train(work: Path, data: Path, vocab: int, cpu: bool) -> Result:
    fig: dict[str, Any] = {}
    ok, notes = True, []
    have_ds = have("deepspeed")
    runs = [("ddp", {"strategy": "ddp"})]
    if have_ds:
        runs += [("zero2", {"strategy": "deepspeed", "zero_stage": 2})]
        runs += [("zero3", {"strategy": "deepspeed", "zero_stage": 3})]
    else:
        ok = False
        notes.append("deepspeed not installed: ZeRO runs skipped")
    kinds = ["tiny"] if cpu else ["tiny", "e5small"]
    steps = 6 if cpu else 20
    for kind in kinds:
        for name, strat in runs:
            tag = f"{kind}_{name}"
            cfg = write_config(work / tag / "config.yaml", data, vocab, cpu, kind=kind, steps=steps, **strat)
            t0 = time.perf_counter()
            p = run(train_cmd(cfg), 900)
            fig[f"{tag}_s"] = time.perf_counter() - t0
            if p.returncode != 0:
                ok = False
                notes.append(f"{tag} exit {p.returncode}: {_tail(p)}")
                continue
            losses = [h["loss/total"] for h in json.loads((work / tag / "run" / "history.json").read_text())]
            first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
            fig[f"{tag}_loss"] = f"{first:.3f}->{last:.3f}"
            if not (len(losses) == steps and last < first and all(math.isfinite(v) for v in losses)):
                ok = False
                notes.append(f"{tag}: loss did not fall ({losses})")
    # kill -9 after a checkpoint + resume == uninterrupted (fp32)
    every = 2
    ref_cfg = write_config(
        work / "resume_ref" / "config.yaml", data, vocab, cpu, steps=steps, precision="fp32",
        checkpoint={"dir": str(work / "resume_ref" / "run" / "checkpoints"), "every": every, "keep_last": 3},
    )  # fmt: skip
    kill_cfg = write_config(
        work / "resume_kill" / "config.yaml", data, vocab, cpu, steps=steps, precision="fp32",
        checkpoint={"dir": str(work / "resume_kill" / "run" / "checkpoints"), "every": every, "keep_last": 3},
    )  # fmt: skip
    ref = run(train_cmd(ref_cfg), 900)
    killed_at = _run_and_kill(train_cmd(kill_cfg), work / "resume_kill" / "run")
    resumed = run(train_cmd(kill_cfg), 900)
    if ref.returncode or resumed.returncode or killed_at is None:
        ok = False
        notes.append(
            f"resume: ref {ref.returncode}, killed at {killed_at}, resumed {resumed.returncode} {_tail(resumed)}"
        )
    else:
        a = _params(work / "resume_ref" / "run" / "final_model")
        b = _params(work / "resume_kill" / "run" / "final_model")
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        fig["resume_killed_after"] = killed_at
        fig["resume_max_param_diff"] = diff
        if diff > 1e-5:
            ok = False
            notes.append("resumed parameters differ")
    return Result("1 train (DDP, ZeRO-2, ZeRO-3; loss falls; kill -9 + resume)", ok, fig, "; ".join(notes))


def _run_and_kill(cmd: list[str], run_dir: Path) -> str | None:
    """Start a training run, SIGKILL its whole process group as soon as a complete checkpoint exists (and before
    the run has finished); returns the checkpoint's name, or None if the run ended first."""
    proc = subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.time()
    try:
        while time.time() - t0 < 900:
            done = sorted(
                p.name
                for p in (run_dir / "checkpoints").glob("step-*")
                if (p / "trainer_state.json").is_file()
            )
            if done:
                if (run_dir / "final_model").exists():
                    return None
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return done[-1]
            if proc.poll() is not None:
                return None
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return None


def check_ranks(work: Path, data: Path, vocab: int, cpu: bool) -> Result:
    from safetensors.torch import load_file

    backend = "gloo" if cpu else "cuda:gloo"
    fig: dict[str, Any] = {"backend": backend}
    ok, notes = True, []
    cfg = write_config(
        work / "ranks" / "config.yaml", data, vocab, cpu, precision="fp32", lr=1e-3, max_grad_norm=0.0
    )
    outs = {}
    for n in (1, 2):
        out = work / "ranks" / f"n{n}"
        prog = [
            "benchmarks.gpu.with_group",
            backend,
            "tests.distributed.trainer_step_program",
            str(cfg),
            str(out),
        ]
        p = run(torchrun(n, *prog) if n > 1 else [sys.executable, "-m", *prog], 900)
        if p.returncode:
            ok = False
            notes.append(f"plain step, {n} rank(s): exit {p.returncode}: {_tail(p)}")
        outs[n] = out
    if ok:
        m1 = json.loads((outs[1] / "metrics.json").read_text())
        m2 = json.loads((outs[2] / "metrics.json").read_text())
        p1 = load_file(str(outs[1] / "params.safetensors"))
        p2 = load_file(str(outs[2] / "params.safetensors"))
        before = _initial_params(cfg)
        num = sum(float((p1[k].double() - p2[k].double()).pow(2).sum()) for k in p1)
        den = sum(float((p1[k].double() - before[k].double()).pow(2).sum()) for k in p1)
        fig["plain_loss_diff"] = abs(m1["loss/total"] - m2["loss/total"])
        fig["plain_rel_update_err"] = (num / den) ** 0.5
        if fig["plain_loss_diff"] > 1e-5 or fig["plain_rel_update_err"] > 1e-3:
            ok = False
            notes.append("2 ranks != 1 process")
    gc_cfg = write_config(
        work / "ranks_gc" / "config.yaml", data, vocab, cpu, precision="fp32", lr=1e-3, max_grad_norm=0.0,
        grad_cache_chunk_size=2,
    )  # fmt: skip
    _set_dropout(gc_cfg, 0.1)
    out = work / "ranks_gc" / "out"
    prog = [
        "benchmarks.gpu.with_group",
        backend,
        "tests.distributed.grad_cache_program",
        str(gc_cfg),
        str(out),
    ]
    p = run(torchrun(2, *prog), 900)
    if p.returncode:
        ok = False
        notes.append(f"gradient caching: exit {p.returncode}: {_tail(p)}")
    else:
        res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        fig["gc_dropout_diff"] = min(r["dropout_diff"] for r in res)
        fig["gc_rel_update_err"] = max(r["rel_update_err"] for r in res)
        fig["gc_loss_diff"] = max(abs(r["loss"] - r["ref_loss"]) for r in res)
        if fig["gc_dropout_diff"] <= 1e-3 or fig["gc_rel_update_err"] > 1e-3 or fig["gc_loss_diff"] > 1e-5:
            ok = False
            notes.append("gradient caching with dropout differs from the full-graph reference")
    return Result(
        "2 ranks (2 ranks == 1 process; gradient caching + dropout; no CPU backend)",
        ok,
        fig,
        "; ".join(notes),
    )


def _set_dropout(cfg_path: Path, p: float) -> None:
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["dropout"] = p
    cfg_path.write_text(yaml.safe_dump(cfg))


def _initial_params(cfg_path: Path) -> dict[str, Any]:
    """The parameters the trainer starts from (same seed, same construction)."""
    import torch

    from lancer_dist.config import load_config
    from lancer_dist.model import BiEncoder
    from lancer_dist.train.trainer import seed_everything

    cfg = load_config(str(cfg_path))
    seed_everything(cfg.train.seed)
    model = BiEncoder.from_config(cfg.model)
    return {k: v.detach().to(torch.float64) for k, v in model.named_parameters()}


def check_throughput(work: Path, data: Path, vocab: int, cpu: bool, steps: int) -> Result:
    """Trainer.train_step vs a bare loop (same model shape, batch, loss, AdamW), bf16 on the GPU."""
    import torch
    import yaml

    from lancer_dist.config import load_config
    from lancer_dist.data.stream import TrainBatch
    from lancer_dist.losses import lancer_loss
    from lancer_dist.model import BiEncoder
    from lancer_dist.train.trainer import Trainer, build_optimizer

    dev = torch.device("cpu" if cpu else "cuda")
    seq = 32 if cpu else 256
    qn = 4 if cpu else 32  # queries per step; passages = 2 x, erasure passages = 4 languages x 8
    shape = (
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=vocab,
        )
        if cpu
        else dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=250002,
        )
    )
    cfg_path = write_config(
        work / "tput" / "config.yaml", data, vocab, cpu, steps=10**6, lr=1e-4, max_grad_norm=0.0
    )
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["backbone_config"] = {
        "model_type": "xlm-roberta",
        "max_position_embeddings": seq + 2,
        **shape,
    }
    raw["model"]["max_query_length"] = raw["model"]["max_passage_length"] = seq
    raw["data"]["retrieval"]["queries_per_step"] = qn
    raw["data"]["erasure"]["passages_per_language"] = 2 if cpu else 8
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(cfg_path))
    g = cfg.data.retrieval.group_size
    m = len(LANGS) * cfg.data.erasure.passages_per_language
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(5, shape["vocab_size"], (n, seq), generator=gen)

    ones = lambda n: torch.ones(n, seq, dtype=torch.long)  # noqa: E731
    batch = TrainBatch(
        0, ids(qn), ones(qn), ids(qn * g), ones(qn * g), ids(m), ones(m),
        torch.arange(m) % len(LANGS),
        passage_docids=[f"d{i}" for i in range(qn * g)],  # unique ids: the false-negative mask is built, masks 0
        query_positive_docids=[[f"d{i * g}"] for i in range(qn)],
    )  # fmt: skip
    tokens = seq * (qn + qn * g + m)
    os.environ.setdefault("WORLD_SIZE", "1")
    tr = Trainer(cfg)
    n_params = sum(p.numel() for p in tr.accelerator.unwrap_model(tr.model).parameters())
    emb = shape["vocab_size"] * shape["hidden_size"]

    def time_it(step: Any) -> float:
        for _ in range(2):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    on_dev = batch.to(dev)  # both loops get the batch already on the device
    t_lancer = time_it(lambda: tr.train_step(on_dev))

    # the bare loop: same architecture, batch, loss, optimizer; bf16 autocast; nothing else
    torch.manual_seed(0)
    model = BiEncoder.from_config(cfg.model).to(dev).train()
    opt = build_optimizer(model, cfg)
    b = on_dev
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def bare() -> None:
        with amp:
            q, p, x = model(b.query_input_ids, b.query_attention_mask, b.passage_input_ids,
                            b.passage_attention_mask, b.erasure_input_ids, b.erasure_attention_mask)  # fmt: skip
        out = lancer_loss(
            q.float(), p.float(), g, x.float(), b.erasure_languages, len(LANGS), temperature=0.05
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_bare = time_it(bare)
    # model FLOPs: 6 per non-embedding parameter per token, plus attention scores (fwd 4*T*H per token per layer, x3)
    L, H = shape["num_hidden_layers"], shape["hidden_size"]
    flops = 6 * (n_params - emb) * tokens + 12 * L * H * seq * tokens
    fig: dict[str, Any] = {
        "tokens_per_step": tokens,
        "lancer_tok_s": tokens / t_lancer,
        "bare_tok_s": tokens / t_bare,
        "lancer_over_bare": t_bare / t_lancer,
    }
    ok = math.isfinite(t_lancer) and math.isfinite(t_bare)
    note = "CPU mode: no target (a loaded 2-core machine measures noise)" if cpu else ""
    if not cpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        fig["gpu"] = name.replace(" ", "_")
        if peak:
            fig["mfu_lancer"] = flops / t_lancer / peak
            fig["mfu_bare"] = flops / t_bare / peak
            ok = ok and fig["mfu_lancer"] >= 0.45
        else:
            note = "unknown GPU peak: MFU not judged"
        ok = ok and fig["lancer_over_bare"] >= 0.95
    return Result(
        "3 throughput (XLM-R-base size, seq 256, bf16: Trainer.train_step vs bare loop)", ok, fig, note
    )


def check_encode_search(work: Path, data: Path, vocab: int, cpu: bool) -> Result:
    import numpy as np
    import torch

    from lancer_dist.config import load_config
    from lancer_dist.model import BiEncoder
    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
    from lancer_dist.retrieval.search import brute_force_topk, exact_topk_torch

    dev = "cpu" if cpu else "cuda"
    cfg = load_config(
        str(write_config(work / "enc" / "config.yaml", data, vocab, cpu, kind="tiny" if cpu else "e5small"))
    )
    from transformers import AutoTokenizer

    model = BiEncoder.from_config(cfg.model)
    model_dir = model.save_pretrained(
        work / "enc" / "model", tokenizer=AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    )
    enc = load_encoder(EncoderSpec.from_model_config(str(model_dir), cfg.model), dev)
    rng = random.Random(1)
    words = [f"{lang}{i}" for lang in LANGS for i in range(50)]
    n = 512 if cpu else 20000
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]
    enc.encode(texts[:64], is_query=False)  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    p_emb = enc.encode(texts, is_query=False, batch_size=256)
    if dev == "cuda":
        torch.cuda.synchronize()
    fig: dict[str, Any] = {"device": dev, "passages_per_s": n / (time.perf_counter() - t0)}
    q_emb = enc.encode(texts[:200], is_query=True)
    k = 20
    s_gpu, i_gpu = exact_topk_torch(q_emb, p_emb, k, device=dev)
    # integer-valued vectors: exact inner products, real ties straddling the k-th place
    gen = np.random.default_rng(2)
    qt = gen.integers(-1, 2, (64, 8)).astype(np.float32)
    pt = gen.integers(-1, 2, (5000, 8)).astype(np.float32)
    st_gpu, it_gpu = exact_topk_torch(qt, pt, k, device=dev)
    if have("faiss"):
        from lancer_dist.retrieval.search import build_index, search_index_exact

        ref_name = "faiss_flat_cpu"
        s_cpu, i_cpu = search_index_exact(build_index(p_emb, "Flat", use_gpu=False), q_emb, k)
        st_cpu, it_cpu = search_index_exact(build_index(pt, "Flat", use_gpu=False), qt, k)
    else:
        ref_name = "numpy"
        s_cpu, i_cpu = brute_force_topk(q_emb, p_emb, k)
        st_cpu, it_cpu = brute_force_topk(qt, pt, k)
    fig["cpu_reference"] = ref_name
    # Real embeddings: float32 sums in another order can swap near-tied documents, so judge the device's list by
    # float64 scores: each of its k documents scores what the CPU's k-th best at that rank scores (1e-5).
    exact = q_emb.astype(np.float64) @ p_emb.astype(np.float64).T
    gpu_scores = np.take_along_axis(exact, i_gpu, axis=1)
    cpu_scores = np.take_along_axis(exact, i_cpu, axis=1)
    fig["ids_identical_frac"] = float((i_gpu == i_cpu).mean())
    fig["max_rank_score_diff"] = float(np.abs(gpu_scores - cpu_scores).max())
    fig["max_score_diff"] = float(np.abs(s_gpu - s_cpu).max())
    fig["tied_ids_equal"] = bool((it_gpu == it_cpu).all() and (st_gpu == st_cpu).all())
    ok = fig["tied_ids_equal"] and fig["max_rank_score_diff"] <= 1e-5 and fig["max_score_diff"] <= 1e-4
    return Result("4 encode + search (passages/s on the device; device search == CPU search, ties)", ok, fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cpu", "--dry-run", dest="cpu", action="store_true", help="small sizes on the CPU (gloo)"
    )
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--only", default="1234", help="which checks to run, e.g. 34")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device (use --cpu for the CPU dry run)")
        return 1
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    t_all = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="lancer-gpu-check-"))
    # Only on the GPU machine: the CPU dry run must never install into the environment it tests.
    wheels = "not installed (--cpu)" if args.cpu else install_wheels()
    print(f"[check] wheels: {wheels}; work dir {work}", flush=True)
    print(
        f"[check] torch {torch.__version__}, device: {'cpu' if args.cpu else torch.cuda.get_device_name()}",
        flush=True,
    )
    data = write_data(work / "data", n_groups=400, per_lang=64, words=200)
    vocab = 5 + len(LANGS) * 200
    results: list[Result] = []
    checks = {
        "1": lambda: check_train(work / "c1", data, vocab, args.cpu),
        "2": lambda: check_ranks(work / "c2", data, vocab, args.cpu),
        "3": lambda: check_throughput(work / "c3", data, vocab, args.cpu, steps=3 if args.cpu else 10),
        "4": lambda: check_encode_search(work / "c4", data, vocab, args.cpu),
    }
    for key in args.only:
        t0 = time.perf_counter()
        try:
            res = checks[key]()
        except Exception as e:  # a crashed check is a FAIL line, and the other checks still run
            res = Result(f"{key} (crashed)", False, note=f"{type(e).__name__}: {e}"[:500])
        res.figures["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(res.line(), flush=True)
    passed = sum(r.ok for r in results)
    print(f"SUMMARY {passed}/{len(results)} checks passed in {time.perf_counter() - t_all:.0f} s", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

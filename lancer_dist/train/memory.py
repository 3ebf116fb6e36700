"""Back-of-the-envelope GPU memory for LANCER training: which ``train.strategy`` (ZeRO stage) for which backbone and
world size. Pure arithmetic, no torch: the planning side of :mod:`lancer_dist.train.parallel`.

``python -m lancer_dist.train.memory`` prints the scaling-guide table of docs/cluster.md. Estimates, not measurements:

* model states (Rajbhandari et al. 2020, ZeRO): mixed-precision AdamW holds 2 B (bf16 weights) + 2 B (bf16 grads)
  + 12 B (fp32 master weights, m, v) per parameter. ZeRO-1 shards the 12 B over the N data-parallel ranks, ZeRO-2
  the grads too, ZeRO-3 everything; CPU offload moves the sharded optimizer states (and, for ZeRO-3, the
  parameters) to host memory.
* activations of an encoder layer (Korthikanti et al. 2022, bf16, no recomputation): s*h*(34 + 5*a*s/h) bytes per
  sequence of length s; with gradient checkpointing only each layer's input (2*s*h bytes) is kept, plus one layer's
  full activations during the recomputation.
* 10% (at least 1 GiB) on top for the CUDA context, allocator fragmentation and communication buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKBONES", "Backbone", "Plan", "activation_bytes", "model_state_bytes", "plans", "table"]

GiB = 1024**3


@dataclass(frozen=True)
class Backbone:
    name: str
    params: float  # total parameters
    layers: int
    hidden: int
    heads: int


BACKBONES = {
    # bert-base-multilingual-cased: 119,547-piece vocabulary, 12 x 768.
    "mbert": Backbone("mBERT (178M)", 178e6, 12, 768, 12),
    # xlm-roberta-large: 250,002-piece vocabulary, 24 x 1024.
    "xlmr-large": Backbone("XLM-R large (560M)", 560e6, 24, 1024, 16),
    # A Mistral-7B-based embedder (e5-mistral-7b-instruct style): 32 x 4096.
    "7b": Backbone("7B embedder (7.1B)", 7.1e9, 32, 4096, 32),
}


def model_state_bytes(params: float, world: int, stage: int, offload: bool = False) -> float:
    """Bytes per GPU for weights + grads + AdamW states under ZeRO ``stage`` over ``world`` ranks (bf16 mixed)."""
    w, g, opt = 2 * params, 2 * params, 12 * params
    if stage >= 1:
        opt /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    if offload:
        opt = 0.0  # sharded optimizer states live in host memory
        if stage >= 3:
            w = 0.0  # parameters too (fetched layer by layer)
    return w + g + opt


def activation_bytes(bb: Backbone, seqs: int, seq_len: int, checkpointing: bool) -> float:
    """Activation bytes for ``seqs`` sequences of ``seq_len`` tokens through the encoder (bf16)."""
    per_layer = seq_len * bb.hidden * (34 + 5 * bb.heads * seq_len / bb.hidden)
    if checkpointing:
        return seqs * (bb.layers * 2 * seq_len * bb.hidden + per_layer)
    return seqs * bb.layers * per_layer


@dataclass
class Plan:
    backbone: str
    gpus: int
    stage: int
    offload: bool
    checkpointing: bool
    queries: int  # global queries per step
    group: int  # passages per query (1 positive + hard negatives)
    corr_per_lang: int  # erasure passages per language per step (16 languages)
    q_len: int = 64
    p_len: int = 192

    @property
    def negatives_per_query(self) -> int:
        # Every passage of the global batch except the query's positive (cross-device negatives gathered).
        return self.queries * self.group - 1

    @property
    def correlation_batch(self) -> int:
        return 16 * self.corr_per_lang

    def gib_per_gpu(self) -> float:
        bb = BACKBONES[self.backbone]
        states = model_state_bytes(bb.params, self.gpus, self.stage, self.offload)
        q = self.queries / self.gpus
        p = q * self.group + self.correlation_batch / self.gpus
        act = activation_bytes(bb, round(q), self.q_len, self.checkpointing)
        act += activation_bytes(bb, round(p), self.p_len, self.checkpointing)
        total = states + act
        return max(total * 1.1, total + GiB) / GiB


def plans() -> list[Plan]:
    """The recommended settings: global batch grows with the GPUs (more in-batch negatives), per-GPU work fixed."""
    return [
        # mBERT: model states ~2.8 GB, DDP everywhere; the paper's batch (64 queries, 16 x 16 erasure) on 1 GPU.
        # The paper's setting: triplets (group 2), 64 queries, 16 languages x 16 erasure passages.
        Plan("mbert", 1, 0, False, False, 64, 2, 16),
        Plan("mbert", 8, 0, False, False, 512, 2, 64),
        Plan("mbert", 32, 0, False, False, 2048, 2, 128),
        # XLM-R large: ~9 GB of states; ZeRO-1 from 8 GPUs on frees the optimizer states.
        Plan("xlmr-large", 1, 0, False, True, 64, 8, 16),
        Plan("xlmr-large", 8, 1, False, True, 512, 8, 64),
        Plan("xlmr-large", 32, 2, False, True, 2048, 8, 128),
        # 7B: ~114 GB of states does not fit one GPU without offload; ZeRO-3 across GPUs.
        Plan("7b", 1, 3, True, True, 16, 4, 4),
        Plan("7b", 8, 3, False, True, 128, 4, 16),
        Plan("7b", 32, 3, False, True, 512, 4, 32),
    ]


def table() -> str:
    rows = [
        "| backbone | GPUs | ZeRO | offload | grad ckpt | precision | global queries x group | negatives/query "
        "| correlation batch | est. GiB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans():
        rows.append(
            f"| {BACKBONES[p.backbone].name} | {p.gpus} | {p.stage} | {'cpu' if p.offload else '-'} "
            f"| {'yes' if p.checkpointing else 'no'} | bf16 | {p.queries} x {p.group} | {p.negatives_per_query} "
            f"| {p.correlation_batch} (16 x {p.corr_per_lang}) | {p.gib_per_gpu():.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

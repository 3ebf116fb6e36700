"""Typed run configuration: one dataclass per component, nested under :class:`RunConfig`.

Loaded from YAML, with dotted ``key=value`` overrides, and validated at load time. Every bad value raises
:class:`ConfigError` naming the dotted field, the value given and what was expected, before any process group,
model or data is touched.

Conventions
-----------
* Types are checked from the annotations (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``Optional``,
  ``list[...]``, ``dict[...]`` and nested dataclasses). An ``int`` is accepted where a ``float`` is expected.
* Range and cross-field checks live in each section's ``validate`` method (called after type checks).
* Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lancer_dist.paths import expand
from lancer_dist.redact import redact, redact_uri

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ErasureDataConfig",
    "EvalConfig",
    "IndexConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "ProbeConfig",
    "RayTrainConfig",
    "RetrievalDataConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. ``field`` is the dotted path."""

    def __init__(self, field: str, value: Any, expected: str, source: str | None = None):
        self.field = field
        self.value = value
        self.expected = expected
        where = f" (in {source})" if source else ""
        # A value can hold a secret (a tracking URI's password): the message is redacted like every log line.
        super().__init__(redact(f"config field '{field}'{where}: got {value!r}, expected {expected}"))


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(name, value, expected)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters through PEFT (lancer_dist/model/lora.py): only the adapters train; the saved final model has
    them merged into the weights (a plain transformers / sentence-transformers directory)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Module names to adapt (e.g. [q_proj, k_proj, v_proj, o_proj] for Qwen / Llama, [query, key, value] for BERT);
    # null = PEFT's default for the architecture.
    target_modules: list[str] | None = None

    def validate(self, p: str) -> None:
        _check(self.r > 0, f"{p}.r", self.r, "an integer > 0")
        _check(self.alpha > 0, f"{p}.alpha", self.alpha, "an integer > 0")
        _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", self.dropout, "a probability in [0, 1)")
        if self.target_modules is not None:
            _check(
                len(self.target_modules) > 0 and all(self.target_modules),
                f"{p}.target_modules",
                self.target_modules,
                "a non-empty list of module names, or null for PEFT's default",
            )


@dataclass
class ModelConfig:
    """The bi-encoder: a transformers backbone, pooling, normalisation and score scale.

    The paper scores by plain dot product (``normalize: false, temperature: 1.0``); the authors' released code
    L2-normalises and multiplies by 10 (``normalize: true, temperature: 0.1``).
    """

    # A local transformers model directory or a hub id. Ignored for the weights when ``backbone_config`` is set.
    name_or_path: str = ""
    # Hub options for name_or_path (and the tokenizer): a branch / tag / commit, the download cache directory
    # (default: the hub's, HF_HOME), and whether code shipped with the model may run (off unless set).
    revision: str | None = None
    cache_dir: str | None = None
    trust_remote_code: bool = False
    # A transformers config dict (with ``model_type``) to build a randomly initialised backbone (tests, tiny runs).
    backbone_config: dict[str, Any] | None = None
    # Tokenizer directory or hub id; defaults to ``name_or_path``.
    tokenizer: str | None = None
    # cls: first token (BERT, XLM-R, bge-m3); mean: masked mean (E5, Contriever); pooler: the backbone's pooler
    # (dense + tanh over the first token: LaBSE); last_token: the last real token (decoder embedders: Qwen3-Embedding,
    # e5-mistral). last_token also left-pads, appends the tokenizer's EOS to every text and pads with EOS when the
    # tokenizer has no pad token (lancer_dist.model.encoder.prepare_tokenizer).
    pooling: Literal["cls", "mean", "pooler", "last_token"] = "cls"
    normalize: bool = False
    # Scores are ``q @ p.T / temperature``.
    temperature: float = 1.0
    # Siamese (one backbone for queries and passages) or two towers.
    shared_towers: bool = True
    # Literal prefixes, e.g. E5's "query: " / "passage: ".
    query_prefix: str = ""
    passage_prefix: str = ""
    # An instruction for queries (decoder embedders), rendered with ``query_instruction_template`` in front of
    # ``query_prefix`` + the query; passages get none. Empty = no instruction.
    query_instruction: str = ""
    query_instruction_template: str = "Instruct: {instruction}\nQuery: "
    max_query_length: int = 64
    max_passage_length: int = 128
    # Activation (gradient) checkpointing on the backbone(s), non-reentrant (use_reentrant=False): layer
    # activations are recomputed in the backward pass instead of kept; same gradients, less memory, ~1/3 more compute.
    gradient_checkpointing: bool = False
    # The attention kernel: sdpa (torch scaled_dot_product_attention; an architecture without it falls back to its
    # own), eager (the architecture's plain matmul-softmax), or flash_attention_2 (needs the flash_attn package;
    # loading the backbone without it is a ConfigError naming this field).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # The dtype the backbone's weights are loaded / built in. Not mixed precision (that is train.precision): with
    # bfloat16 / float16 the parameters, their gradients and the optimizer state are in that dtype (under DeepSpeed
    # with train.precision bf16 / fp16 it keeps fp32 master weights itself). train.precision fp64 needs float32.
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Overrides the backbone's hidden and attention dropout (0.0 for exactness tests); None keeps the backbone's.
    dropout: float | None = None
    freeze_embeddings: bool = False
    # Train only the top k transformer layers (and what follows them: a final norm, a pooler); the embeddings and
    # the layers below are frozen and cost no backward pass (lancer_dist/model/freeze.py). null = every layer.
    # Composes with freeze_embeddings (the embeddings are frozen either way) and with LoRA (only the adapters of
    # the top k layers train). A k above the backbone's layer count is refused when the backbone is built.
    train_layers: int | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, p: str) -> None:
        _check(
            bool(self.name_or_path) or self.backbone_config is not None,
            f"{p}.name_or_path",
            self.name_or_path,
            "a model directory / hub id, or model.backbone_config for a randomly initialised backbone",
        )
        if self.backbone_config is not None:
            _check(
                "model_type" in self.backbone_config,
                f"{p}.backbone_config",
                self.backbone_config,
                "a transformers config dict with a 'model_type' key",
            )
            _check(
                self.tokenizer is not None or bool(self.name_or_path),
                f"{p}.tokenizer",
                self.tokenizer,
                "a tokenizer directory when model.backbone_config builds a random backbone",
            )
        _check(self.temperature > 0, f"{p}.temperature", self.temperature, "a number > 0")
        _check(
            _template_fields(self.query_instruction_template) == ["instruction"],
            f"{p}.query_instruction_template",
            self.query_instruction_template,
            "a string with exactly one '{instruction}' field (literal braces doubled: '{{' / '}}')",
        )
        _check(self.max_query_length > 0, f"{p}.max_query_length", self.max_query_length, "an integer > 0")
        _check(
            self.max_passage_length > 0, f"{p}.max_passage_length", self.max_passage_length, "an integer > 0"
        )
        if self.dropout is not None:
            _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", self.dropout, "a probability in [0, 1) or null")
        if self.train_layers is not None:
            n = (self.backbone_config or {}).get("num_hidden_layers")
            _check(
                isinstance(self.train_layers, int)
                and not isinstance(self.train_layers, bool)
                and self.train_layers >= 1
                and (n is None or self.train_layers <= n),
                f"{p}.train_layers",
                self.train_layers,
                "an integer >= 1 (the number of top layers to train)"
                + (f" and <= {n} (model.backbone_config.num_hidden_layers)" if n is not None else "")
                + ", or null for all",
            )

    @property
    def query_text_prefix(self) -> str:
        """What every query text is prefixed with (training, encoding, and the saved sentence-transformers
        ``query`` prompt): the rendered instruction, if any, then ``query_prefix``."""
        if not self.query_instruction:
            return self.query_prefix
        return self.query_instruction_template.format(instruction=self.query_instruction) + self.query_prefix


def _template_fields(template: str) -> list[str] | None:
    import string

    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None


@dataclass
class LossConfig:
    """The multi-task objective L = L_R + erasure_weight * L_C (paper §3.4; the paper uses weight 1)."""

    erasure_weight: float = 1.0
    # Added to sigma_X * sigma_Z in the correlation's denominator (keeps absent languages and constant dims finite).
    erasure_eps: float = 1e-8
    # "abs": the paper's mean |rho|; "squared": mean rho^2; "debiased": mean adjusted rho^2, 0 with no signal
    # (lancer_dist/losses/erasure.py, docs/science.md).
    erasure_form: Literal["abs", "squared", "debiased"] = "abs"
    # > 0: the erasure passages are encoded this many at a time and L_C's statistics accumulated over the
    # micro-batches, exactly (lancer_dist/train/erasure_chunks.py); 0 = in the step's one forward.
    erasure_chunk: int = 0
    # Gather passages from every rank as negatives for every query (cross-device negatives).
    gather_negatives: bool = True
    # Mask false negatives: a passage whose docid is one of a query's positives (a duplicate in the batch, from any
    # rank) is removed from that query's softmax. Not in the paper (false = the paper's loss); docs/training.md.
    mask_false_negatives: bool = True

    def validate(self, p: str) -> None:
        _check(self.erasure_weight >= 0, f"{p}.erasure_weight", self.erasure_weight, "a number >= 0")
        _check(self.erasure_eps > 0, f"{p}.erasure_eps", self.erasure_eps, "a number > 0")
        _check(self.erasure_chunk >= 0, f"{p}.erasure_chunk", self.erasure_chunk, "an integer >= 0 (0 = off)")


@dataclass
class RetrievalDataConfig:
    """English retrieval groups: (query, 1 positive, group_size - 1 hard negatives)."""

    # A shard directory written by ``lancer data groups`` (with manifest.json), or a manifest path.
    path: str = ""
    group_size: int = 4
    # Global (all ranks together) number of queries per optimizer step.
    queries_per_step: int = 64

    def validate(self, p: str) -> None:
        _check(
            self.group_size >= 1,
            f"{p}.group_size",
            self.group_size,
            "an integer >= 1 (1 positive + negatives)",
        )
        _check(self.queries_per_step >= 1, f"{p}.queries_per_step", self.queries_per_step, "an integer >= 1")


@dataclass
class ErasureDataConfig:
    """Multilingual passages with language labels: every step holds exactly m passages of each of n languages."""

    path: str = ""
    # Languages used for the erasure task (ISO codes); empty = every language in the manifest.
    languages: list[str] = field(default_factory=list)
    passages_per_language: int = 16

    def validate(self, p: str) -> None:
        _check(
            self.passages_per_language >= 1,
            f"{p}.passages_per_language",
            self.passages_per_language,
            "an integer >= 1",
        )
        _check(
            len(set(self.languages)) == len(self.languages),
            f"{p}.languages",
            self.languages,
            "a list of distinct language codes",
        )


@dataclass
class DataConfig:
    retrieval: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    erasure: ErasureDataConfig = field(default_factory=ErasureDataConfig)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    # Skip (and count) malformed records instead of failing on the first one.
    skip_bad_records: bool = False

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, "an integer >= 0")
        _check(self.shuffle_buffer >= 0, f"{p}.shuffle_buffer", self.shuffle_buffer, "an integer >= 0")


@dataclass
class CheckpointConfig:
    dir: str = ""
    every: int = 0  # 0 = only at the end (and on preemption)
    keep_last: int = 2
    # "auto": resume from the latest checkpoint in ``dir`` if any; "never"; or a checkpoint path.
    resume: str = "auto"

    def validate(self, p: str) -> None:
        _check(self.every >= 0, f"{p}.every", self.every, "an integer >= 0")
        _check(self.keep_last >= 1, f"{p}.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class RayTrainConfig:
    """Training on a Ray cluster (``lancer submit ray``): a Ray Train ``TorchTrainer`` of ``num_workers`` workers,
    each one rank of the same trainer. Ignored by torchrun / SLURM runs."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Ray placement-group strategy of the workers: PACK fills a node first (fast intra-node collectives),
    # SPREAD prefers different nodes, STRICT_SPREAD requires one worker per node.
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Worker-group restarts Ray Train allows after a worker (or its node) dies; each restart resumes from the
    # latest complete checkpoint (train.checkpoint.dir, which every node must see). -1 = unlimited.
    max_failures: int = 3
    # Where Ray Train keeps its run state (a path every node sees, or a URI pyarrow.fs accepts, s3://...);
    # "" = <output_dir>/ray_train.
    storage_path: str = ""

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", self.num_workers, "an integer >= 1")
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.gpus_per_worker >= 0, f"{p}.gpus_per_worker", self.gpus_per_worker, "a number >= 0")
        _check(
            self.max_failures >= -1,
            f"{p}.max_failures",
            self.max_failures,
            "an integer >= -1 (-1 = unlimited)",
        )


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    # fp64 is for numerical verification (exactness tests, debugging); not for real training runs.
    precision: Literal["fp32", "bf16", "fp16", "fp64"] = "fp32"
    seed: int = 42
    # "ddp": Accelerate's DistributedDataParallel (or one process); "deepspeed": DeepSpeed ZeRO via Accelerate;
    # "fsdp": PyTorch FSDP2 (``fully_shard`` per transformer block + the root; parameters, gradients and optimizer
    # state sharded; lancer_dist/dist.py), sharded safetensors checkpoints.
    strategy: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    zero_stage: int = 2
    # A DeepSpeed JSON config (see cluster/deepspeed/); batch sizes and precision are filled in from this config.
    deepspeed_config: str | None = None
    # Gradient caching: chunk size for the chunked forward/re-forward; 0 = plain step.
    grad_cache_chunk_size: int = 0
    # Process-group timeout: a collective that waits longer fails the job (with NCCL asynchronous error handling)
    # instead of hanging it.
    dist_timeout_s: float = 1800.0
    log_every: int = 10
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)

    def validate(self, p: str) -> None:
        _check(self.steps >= 1, f"{p}.steps", self.steps, "an integer >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a learning rate > 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        _check(
            0 <= self.warmup_steps <= self.steps,
            f"{p}.warmup_steps",
            self.warmup_steps,
            f"an integer in [0, train.steps={self.steps}]",
        )
        _check(
            self.max_grad_norm >= 0,
            f"{p}.max_grad_norm",
            self.max_grad_norm,
            "a number >= 0 (0 = no clipping)",
        )
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _check(
            self.grad_cache_chunk_size >= 0, f"{p}.grad_cache_chunk_size", self.grad_cache_chunk_size, ">= 0"
        )
        _check(self.dist_timeout_s > 0, f"{p}.dist_timeout_s", self.dist_timeout_s, "a number of seconds > 0")
        _check(self.log_every >= 1, f"{p}.log_every", self.log_every, "an integer >= 1")


@dataclass
class ProbeConfig:
    """Linear language-ID probe during training (paper §5.3, Fig. 4)."""

    enabled: bool = True
    every: int = 50
    # Held-out multilingual passages: a shard directory or URL that the training stream never reads (e.g. the
    # `probe/` of `lancer data bible`, or `lancer data passages OUT -i c4:DIR --split validation`). Empty: no probe
    # (the erasure data would test the probe on passages the model trains on).
    path: str = ""
    train_per_language: int = 32
    test_per_language: int = 16
    # Folds of the cross-validation that picks the probe's regularisation on its train split (capped by
    # train_per_language; lancer_dist/language_probe.py).
    cv_folds: int = 5

    def validate(self, p: str) -> None:
        _check(self.every >= 1, f"{p}.every", self.every, "an integer >= 1")
        _check(self.cv_folds >= 2, f"{p}.cv_folds", self.cv_folds, "an integer >= 2")
        _check(self.train_per_language >= 2, f"{p}.train_per_language", self.train_per_language, ">= 2")
        _check(self.test_per_language >= 1, f"{p}.test_per_language", self.test_per_language, ">= 1")


@dataclass
class TrackingConfig:
    """MLflow tracking. The default URI is an embedded sqlite store next to the run outputs."""

    enabled: bool = True
    tracking_uri: str = (
        ""  # "" = sqlite:///<output_dir>/mlflow.db (training; eval: <eval.output_dir>/../mlflow.db)
    )
    experiment: str = "lancer"
    run_name: str = ""
    # Seconds between retries of a tracking server that went away; records are buffered meanwhile.
    retry_seconds: float = 5.0
    # How long a run waits for the store at its start (for the run id; the run is created later if the store is down)
    # and at its end (for undelivered records; what is left stays in the spool for `lancer tracking upload`).
    start_timeout_s: float = 30.0
    finish_timeout_s: float = 120.0

    def validate(self, p: str) -> None:
        _check(self.retry_seconds > 0, f"{p}.retry_seconds", self.retry_seconds, "a number > 0")
        for name in ("start_timeout_s", "finish_timeout_s"):
            _check(getattr(self, name) >= 0, f"{p}.{name}", getattr(self, name), "a number of seconds >= 0")
        _check(
            tracking_uri_ok(self.tracking_uri),
            f"{p}.tracking_uri",
            redact_uri(self.tracking_uri),
            "empty (sqlite next to the run), a local path, or a URI with a scheme MLflow stores: "
            + ", ".join(f"{s}:" for s in TRACKING_SCHEMES),
        )


# Schemes MLflow 3 has a tracking store for (``mlflow.tracking._tracking_service.utils``); databases also as
# ``<db>+<driver>``. Anything else (``bogus://x``) would have every record rejected at delivery, so it is refused here.
TRACKING_SCHEMES = (
    "http",
    "https",
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)


def tracking_uri_ok(uri: str) -> bool:
    """Empty, a local path (no scheme, or a one-letter Windows drive), or a URI with a scheme in TRACKING_SCHEMES."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if not uri or m is None or len(m.group(1)) == 1:
        return True
    return m.group(1).lower().split("+", 1)[0] in TRACKING_SCHEMES


@dataclass
class IndexConfig:
    """The FAISS index of each embedding shard (``eval.index``): exact ``flat`` (default) or an approximate index
    trained on a sample of the shard. ``lancer eval`` reports recall@top_k of an approximate index against exact
    search on ``recall_queries`` sampled queries, so the trade is visible next to the metrics."""

    # flat: exact inner product (memory-mapped, searched in blocks); ivf_flat / ivf_pq / hnsw: approximate.
    kind: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] = "flat"
    nlist: int = 1024  # IVF: coarse cells (each shard needs >= nlist training vectors; ~sqrt(rows) to 4*sqrt)
    nprobe: int = 16  # IVF: cells visited per query
    pq_m: int = 48  # IVF-PQ: sub-quantizers (must divide the embedding dimension)
    pq_nbits: int = 8  # IVF-PQ: bits per sub-quantizer code
    hnsw_m: int = 32  # HNSW: neighbours per node
    ef_construction: int = 80  # HNSW: candidate list while building
    ef_search: int = 128  # HNSW: candidate list while searching (FAISS uses max(ef_search, k))
    train_sample: int = 100000  # vectors per shard the quantizers are trained on (random sample, eval.seed)
    recall_queries: int = 200  # queries sampled to measure recall@k against exact search; 0 = not measured
    # Exact re-ranking of approximate candidates: 0 = off; R >= 1 = each shard's index returns top_k * R
    # candidates, re-scored by exact inner products against the shard's memory-mapped vectors, best top_k kept
    # (recovers the ranking PQ codes cannot resolve; costs reading the candidates' rows).
    refine_factor: int = 0

    def validate(self, p: str) -> None:
        for name in ("nlist", "nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search", "train_sample"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"{p}.{name}", v, "an integer >= 1")
        _check(self.pq_nbits in range(1, 17), f"{p}.pq_nbits", self.pq_nbits, "an integer in 1..16")
        _check(self.nprobe <= self.nlist, f"{p}.nprobe", self.nprobe, f"an integer <= nlist ({self.nlist})")
        _check(self.recall_queries >= 0, f"{p}.recall_queries", self.recall_queries, "an integer >= 0")
        _check(self.refine_factor >= 0, f"{p}.refine_factor", self.refine_factor, "an integer >= 0 (0 = off)")
        if self.kind == "ivf_pq":
            _check(
                (self.pq_nbits * self.pq_m) <= 8 * 1024,
                f"{p}.pq_m",
                self.pq_m,
                "at most 8192 / pq_nbits sub-quantizers",
            )

    def factory(self, dim: int) -> str:
        """The ``faiss.index_factory`` string of this index for ``dim``-dimensional embeddings."""
        if self.kind == "ivf_pq" and dim % self.pq_m:
            raise ValueError(f"eval.index.pq_m: {self.pq_m} does not divide the embedding dimension {dim}")
        return {
            "flat": "Flat",
            "ivf_flat": f"IVF{self.nlist},Flat",
            "ivf_pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}",
            "hnsw": f"HNSW{self.hnsw_m}",
        }[self.kind]


@dataclass
class EvalConfig:
    """Evaluation (``lancer eval``): encode + search + metrics + post-hoc baselines + language-bias analyses."""

    # Encoder directory evaluated as the baseline; "" = model.name_or_path (or, for a random model.backbone_config,
    # that random model seeded with train.seed). Prefixes and lengths come from the model section.
    # A hub id is resolved to its local snapshot (at eval.model_revision; model.cache_dir) before encoding.
    model: str = ""
    model_revision: str | None = None
    # A LANCER-trained encoder directory shown next to the baseline (Table 2); "" = none.
    lancer_model: str = ""
    # BEIR-layout collection directories (corpus.jsonl, queries.jsonl, qrels/test.tsv), each evaluated.
    collections: list[str] = field(default_factory=list)
    # Where embeddings, runs, tables and plots go; "" = <output_dir>/eval.
    output_dir: str = ""
    # Any FAISS index_factory string; anything but "Flat" overrides eval.index (kept for compatibility).
    index_factory: str = "Flat"
    index: IndexConfig = field(default_factory=IndexConfig)
    # Shard search: "threads" (a thread pool in this process; FAISS releases the GIL), "ray" (one task per Ray
    # node, each searching its group of shards with threads), or "none" (sequential, the reference).
    search_parallel: Literal["threads", "ray", "none"] = "threads"
    search_threads: int = 0  # 0 = the CPUs this process may use
    search_block: int = (
        65536  # rows of a memory-mapped shard searched at once by the exact index (flat memory)
    )
    # How exact search scores a block: "torch" (matmul + top-k on the mapped rows; measured fastest, see
    # docs/evaluation.md), "faiss_knn" (faiss.knn on the mapped rows) or "faiss_index" (an IndexFlatIP per block).
    search_kernel: Literal["torch", "faiss_knn", "faiss_index"] = "torch"
    # Passages per embedding shard (= per FAISS index shard, searched in parallel).
    shard_size: int = 20000
    top_k: int = 100
    batch_size: int = 64
    # Ray encoding actors: 0 = one per GPU, or (no GPU) one per cpus_per_worker CPUs. cpus_per_worker = torch
    # threads (and Ray CPUs) per actor; 0 = the cluster's CPUs / num_workers (1 when num_workers is also 0).
    num_workers: int = 0
    cpus_per_worker: int = 1
    # Seconds to wait for Ray to place and start the encoding actors (loading the model is not counted); then
    # evaluation goes on with those that started (a warning says why the others did not), or fails naming the
    # resources asked and free.
    worker_start_timeout_s: float = 600.0
    # "" = $RAY_ADDRESS or a new local Ray instance; "auto" or host:port joins a cluster.
    ray_address: str = ""
    dtype: Literal["float32", "float16"] = "float32"
    measures: list[str] = field(default_factory=lambda: ["nDCG@10", "AP@100", "R@100", "RR@10"])
    # XOR-Retrieve Recall@kt thresholds (tokens), computed for collections whose queries carry "answers".
    recall_kt: list[int] = field(default_factory=lambda: [5000, 2000])
    baselines: list[Literal["lsar", "leace"]] = field(default_factory=lambda: ["lsar", "leace"])
    lsar_rank: int = 0  # 0 = number of languages
    # Multilingual passages (a BEIR dir) the post-hoc baselines are fitted on; "" = the probe collection.
    posthoc_collection: str = ""
    posthoc_max_passages: int = 20000
    # Multilingual passages for the language-ID probe and t-SNE; "" = the collection with the most languages.
    probe_collection: str = ""
    probe_per_language: int = 200
    # Processes fitting the probe's cross-validation folds at once (scikit-learn n_jobs); 0 = the CPUs this process
    # may use. The folds are independent fits, so the chosen C and the accuracy do not depend on it.
    probe_jobs: int = 0
    # Passages per language in the t-SNE plot (the paper: 300); 0 = no plot.
    tsne_samples: int = 300
    # Collection for nDCG@10 as languages are added to the pool (Fig. 1/3); "" = the one with the most query
    # languages; "none" = skip. language_order: the order languages are added (empty = en first, then sorted).
    pool_growth_collection: str = ""
    language_order: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self, p: str) -> None:
        _check(self.shard_size >= 1, f"{p}.shard_size", self.shard_size, "an integer >= 1")
        _check(self.top_k >= 1, f"{p}.top_k", self.top_k, "an integer >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, "an integer >= 0 (0 = auto)")
        _check(
            self.cpus_per_worker >= 0,
            f"{p}.cpus_per_worker",
            self.cpus_per_worker,
            "an integer >= 0 (0 = the CPUs split evenly over num_workers)",
        )
        _check(
            self.worker_start_timeout_s > 0,
            f"{p}.worker_start_timeout_s",
            self.worker_start_timeout_s,
            "a number of seconds > 0",
        )
        _check(self.lsar_rank >= 0, f"{p}.lsar_rank", self.lsar_rank, "an integer >= 0")
        _check(all(k > 0 for k in self.recall_kt), f"{p}.recall_kt", self.recall_kt, "a list of integers > 0")
        _check(self.posthoc_max_passages >= 2, f"{p}.posthoc_max_passages", self.posthoc_max_passages, ">= 2")
        _check(self.probe_per_language >= 2, f"{p}.probe_per_language", self.probe_per_language, ">= 2")
        _check(
            self.probe_jobs >= 0,
            f"{p}.probe_jobs",
            self.probe_jobs,
            "an integer >= 0 (0 = this process's CPUs)",
        )
        _check(self.tsne_samples >= 0, f"{p}.tsne_samples", self.tsne_samples, "an integer >= 0")
        _check(
            self.search_threads >= 0, f"{p}.search_threads", self.search_threads, "an integer >= 0 (0 = auto)"
        )
        _check(self.search_block >= 1, f"{p}.search_block", self.search_block, "an integer >= 1")
        _check(
            bool(self.index_factory), f"{p}.index_factory", self.index_factory, "a FAISS index_factory string"
        )
        _check(
            self.index_factory == "Flat" or self.index.kind == "flat",
            f"{p}.index_factory",
            self.index_factory,
            f"'Flat' when {p}.index.kind is set ({self.index.kind!r}): choose one of the two",
        )

    def index_spec(self) -> IndexConfig | str:
        """What each shard's index is: ``eval.index`` or, when set to anything but "Flat", ``eval.index_factory``."""
        return self.index if self.index_factory == "Flat" else self.index_factory

    def search_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lancer_dist.retrieval.search.search_store` that this section sets (how
        the shards are searched, not what): the one mapping that ``lancer eval``, its index-recall check and
        ``lancer search`` share."""
        return {
            "parallel": self.search_parallel,
            "threads": self.search_threads,
            "cpus_per_task": max(1, self.cpus_per_worker),
            "block": self.search_block,
            "kernel": self.search_kernel,
        }


@dataclass
class RunConfig:
    name: str = "lancer"
    output_dir: str = "runs/lancer"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, p: str) -> None:
        _check(bool(self.name), f"{p}name", self.name, "a non-empty run name")
        _check(bool(self.output_dir), f"{p}output_dir", self.output_dir, "a non-empty output directory")
        if self.train.precision == "fp64":
            _check(
                self.model.torch_dtype == "float32",
                f"{p}model.torch_dtype",
                self.model.torch_dtype,
                "float32 with train.precision fp64 (the weights are cast to float64 from float32)",
            )
        if self.probe.enabled and self.probe.path and self.data.erasure.path:
            _check(
                _same_location(self.probe.path, self.data.erasure.path) is False,
                f"{p}probe.path",
                self.probe.path,
                "held-out passages other than data.erasure.path (the probe would be tested on training passages)",
            )
        if self.loss.erasure_chunk:
            _check(
                self.train.grad_cache_chunk_size == 0,
                f"{p}loss.erasure_chunk",
                self.loss.erasure_chunk,
                "0 when train.grad_cache_chunk_size is set (gradient caching already encodes the erasure "
                "passages chunk by chunk)",
            )
            _check(
                self.train.strategy == "ddp",
                f"{p}loss.erasure_chunk",
                self.loss.erasure_chunk,
                f"0 with train.strategy {self.train.strategy} (micro-batched erasure is implemented and tested for "
                "ddp only)",
            )
        if self.train.strategy == "fsdp":
            _check(
                self.train.grad_cache_chunk_size == 0,
                f"{p}train.grad_cache_chunk_size",
                self.train.grad_cache_chunk_size,
                "0 with train.strategy fsdp (gradient caching is implemented and tested for ddp and DeepSpeed "
                "ZeRO 0-2; use model.gradient_checkpointing under fsdp)",
            )
            _check(
                self.train.precision != "fp16",
                f"{p}train.precision",
                self.train.precision,
                "fp32, bf16 or fp64 with train.strategy fsdp (fp16 would need a sharded loss scaler)",
            )


def _same_location(a: str, b: str) -> bool:
    """Whether two data locations name the same shard set (local paths resolved; URLs compared as strings)."""

    def norm(x: str) -> str:
        x = x.strip().removesuffix("/manifest.json").rstrip("/")
        if "://" in x or x.startswith("pipe:"):
            return x.removeprefix("file://") if x.startswith("file://") else x
        return x

    na, nb = norm(a), norm(b)
    if "://" in na or "://" in nb or na.startswith("pipe:") or nb.startswith("pipe:"):
        return na == nb
    return Path(na).expanduser().resolve() == Path(nb).expanduser().resolve()


# --------------------------------------------------------------------------------------------------------------
# Generic typed construction from plain dicts
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner,) = get_args(tp)[:1] or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(name, value, _type_name(tp))
        return _build(tp, value, name)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(name, value, _type_name(tp))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(name, value, _type_name(tp))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(name, value, _type_name(tp))
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(name, value, _type_name(tp))
        return [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, value, _type_name(tp))
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(name, value, "a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "a string")
        try:
            return expand(value)
        except KeyError as e:
            raise ConfigError(
                name, value, f"a string whose ${{{e.args[0]}}} is set in the environment"
            ) from None
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(full, data[key], f"a known field of {cls.__name__}: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], full)
    obj = cls(**kwargs)
    obj.validate(prefix if prefix else "")
    return obj


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain, YAML/JSON-serialisable data."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (used for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(kk, str) for kk in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "an override of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(key, raw, "a dotted key such as train.lr")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, raw, f"a YAML value ({e})") from e
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(key, raw, f"'{part}' to be a section, but it is {nxt!r}")
            node = nxt
        node[parts[-1]] = value
    return data


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        self.key, self.first, self.again = key, first, again
        super().__init__(f"key {key!r} at line {again} was already given at line {first}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a section
    written twice would lose the first one's settings). Keys brought in by a ``<<`` merge may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply dotted overrides, and validate. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", source, "an existing YAML file")
        try:
            loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        except _DuplicateKey as e:
            raise ConfigError(
                str(e.key),
                f"given at line {e.first} and again at line {e.again}",
                "each key once per section (YAML would keep only the last one)",
                source,
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError("--config", source, f"valid YAML ({e})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", loaded, "a mapping at the top of the YAML file", source)
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return _build(RunConfig, data, "")
    except ConfigError as e:
        if source and e.field and "(in " not in str(e):
            raise ConfigError(e.field, e.value, e.expected, source) from None
        raise

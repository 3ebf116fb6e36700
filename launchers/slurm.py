"""SLURM submission: render an sbatch script for multi-node training (and chained encode / eval steps) and submit it.

The training script starts one ``torchrun`` per node through ``srun``; the ranks rendezvous (c10d) on the first
node of the allocation, addressed by its ``NodeAddr`` (node names often do not resolve: emulated nodes, some
clouds) and a port derived from the job id so that concurrent jobs on one node never clash. Preemption:
``--signal=B:USR1@N`` makes SLURM signal the batch shell N seconds before the time limit; the shell creates the
file ``$LANCER_PREEMPT_FILE`` that every rank polls (no signal reaches the step's processes, so DataLoader workers
and torchrun's 30 s SIGTERM-to-SIGKILL do not matter), the trainer checkpoints at the next step boundary and exits with
``PREEMPTED_EXIT_CODE`` (75), and the shell requeues the job (``scontrol requeue``), which resumes from the
checkpoint (``train.checkpoint.resume: auto``). Secrets never enter the script: credentials reach the job through the
environment that ``sbatch`` exports (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ...).
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lancer_dist.config import ConfigError
from lancer_dist.redact import redact
from lancer_dist.train import PREEMPTED_EXIT_CODE  # the trainer's "requeue me" code

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "SlurmJob",
    "SlurmSubmission",
    "SubmitError",
    "check_no_secrets",
    "render_step_script",
    "render_train_script",
    "submit",
    "trained_model_overrides",
]

STEP_VERBS = ("encode", "eval")
_TIME = re.compile(r"^(\d+|\d+:\d{2}(:\d{2})?|\d+-\d+(:\d{2}(:\d{2})?)?)$")


class SubmitError(ConfigError):
    """A submission argument is invalid (names the argument, the value and what was expected); a ConfigError so
    that ``lancer`` reports it in one line with exit code 2."""

    def __init__(self, arg: str, value: object, expected: str):
        super().__init__(arg, redact(str(value)), expected)
        self.arg = arg
        self.args = (f"{arg}: got {redact(str(value))!r}, expected {expected}",)


@dataclass
class SlurmJob:
    """Everything ``lancer submit slurm`` needs; ``render_train_script`` turns it into an sbatch script."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    # 0 = CPU training over gloo (one or ``procs_per_node`` processes per node).
    gpus_per_node: int = 0
    # Processes per node; default: one per GPU, or 1 on CPU.
    procs_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "lancer"
    requeue: bool = True
    # Seconds before the time limit at which SLURM sends USR1 (time to write a checkpoint).
    signal_seconds: int = 300
    # Directory the job runs in (the repository / project checkout on the shared file system).
    workdir: str = field(default_factory=os.getcwd)
    # Where the sbatch scripts and SLURM logs go (relative paths are under ``workdir``).
    log_dir: str = "runs/slurm"
    # The Python interpreter on the nodes (default: this one; the cluster shares the file system).
    python: str = field(default_factory=lambda: sys.executable)
    # Chained steps run after training succeeds (``--dependency=afterok``): any of "encode", "eval".
    then: list[str] = field(default_factory=list)
    # Extra ``#SBATCH`` options, e.g. ["--mem=64G", "--exclusive"].
    sbatch_args: list[str] = field(default_factory=list)
    # Non-secret environment for the job (secrets must come from the submitting environment).
    env: dict[str, str] = field(default_factory=dict)
    # The per-rank program after ``python -m``; default: the trainer (lancer_dist.cli train --config ...).
    module_args: list[str] | None = None

    @property
    def nprocs(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self) -> None:
        if self.nodes < 1:
            raise SubmitError("--nodes", self.nodes, "an integer >= 1")
        if self.gpus_per_node < 0:
            raise SubmitError("--gpus-per-node", self.gpus_per_node, "an integer >= 0 (0 = CPU, gloo)")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise SubmitError("--procs-per-node", self.procs_per_node, "an integer >= 1")
        if self.gpus_per_node > 0 and self.procs_per_node not in (None, self.gpus_per_node):
            raise SubmitError("--procs-per-node", self.procs_per_node, f"one per GPU ({self.gpus_per_node})")
        if self.time is not None and not _TIME.match(self.time):
            raise SubmitError("--time", self.time, "a SLURM time: MINUTES, HH:MM:SS, D-HH[:MM[:SS]]")
        if self.signal_seconds < 10:
            raise SubmitError("--signal-seconds", self.signal_seconds, "an integer >= 10")
        for step in self.then:
            if step not in STEP_VERBS:
                raise SubmitError("--then", step, f"a comma list of {', '.join(STEP_VERBS)}")
        if not re.match(r"^[A-Za-z0-9_.\-]+$", self.job_name):
            raise SubmitError("--job-name", self.job_name, "letters, digits, '_', '.', '-'")
        for k in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise SubmitError("--env", k, "an environment variable name")
        check_no_secrets(self)


def check_no_secrets(job: SlurmJob) -> None:
    """Refuse credentials in anything that would be written into the script (overrides, env, sbatch args)."""
    for where, items in (
        ("overrides", job.overrides),
        ("--sbatch-arg", job.sbatch_args),
        ("--env", [f"{k}={v}" for k, v in job.env.items()]),
    ):
        for item in items:
            if redact(item, env={}) != item:
                raise SubmitError(
                    where,
                    item,
                    "no credentials: they would be written into the sbatch script. Put them in the environment "
                    "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN); sbatch passes it "
                    "to the job",
                )


def _q(s: str | Path) -> str:
    return shlex.quote(str(s))


def _abs(job: SlurmJob, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else Path(job.workdir) / path


TEMPLATES = Path(__file__).resolve().parent / "templates"
CLUSTER_SCRIPTS = Path(__file__).resolve().parents[1] / "cluster" / "slurm"


def render_template(name: str, **values: object) -> str:
    """Render ``launchers/templates/<name>`` (Jinja2; every value must be given, and arrives shell-quoted)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name).render(**values)


def _sbatch_options(job: SlurmJob, name: str, nodes: int, log_dir: Path, extra: list[str]) -> list[str]:
    opts = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--output={log_dir}/%x-%j.out",
        # Requeued runs append to the same log instead of truncating the first attempt's output.
        "--open-mode=append",
    ]
    if job.cpus_per_task:
        opts.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.partition:
        opts.append(f"--partition={job.partition}")
    if job.account:
        opts.append(f"--account={job.account}")
    if job.time:
        opts.append(f"--time={job.time}")
    return opts + extra + job.sbatch_args


def _setup_lines(job: SlurmJob) -> list[str]:
    return [
        f"cd {_q(job.workdir)}",
        f"export PATH={_q(str(Path(job.python).parent))}:$PATH",
        "export PYTHONUNBUFFERED=1",
    ]


def _env_exports(job: SlurmJob) -> list[str]:
    return [f"export {k}={_q(v)}" for k, v in sorted(job.env.items())]


def trained_model_overrides(job: SlurmJob, verb: str) -> list[str]:
    """Overrides that point a chained step at the model the training step writes (``<output_dir>/final_model``):
    ``lancer encode`` encodes it (``eval.model``); ``lancer eval`` evaluates it as the LANCER model next to the
    config's baseline backbone (``eval.lancer_model``). Nothing is added when the overrides already set the key."""
    key = {"encode": "eval.model", "eval": "eval.lancer_model"}[verb]
    if any(o.startswith(key + "=") for o in job.overrides):
        return []
    from lancer_dist.config import load_config

    cfg = load_config(_abs(job, job.config), job.overrides)
    return [f"{key}={_abs(job, cfg.output_dir) / 'final_model'}"]


def _program(job: SlurmJob, verb: str) -> list[str]:
    if verb == "train" and job.module_args is not None:
        return list(job.module_args)
    extra = trained_model_overrides(job, verb) if verb != "train" else []
    return ["lancer_dist.cli", verb, "--config", str(_abs(job, job.config)), *job.overrides, *extra]


def render_train_script(job: SlurmJob, run_name: str | None = None) -> str:
    """The sbatch script for the training step (see the module docstring for what it does)."""
    job.validate()
    if job.module_args is None:
        # the global batch must split into equal slices over nodes x processes: refuse before sbatch, naming the field
        from lancer_dist.config import load_config
        from lancer_dist.data.stream import check_world_size

        check_world_size(load_config(_abs(job, job.config), job.overrides).data, job.nodes * job.nprocs)
    gpu = job.gpus_per_node > 0
    log_dir = _abs(job, job.log_dir)
    extra = []
    if gpu:
        extra.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.requeue:
        extra += [f"--signal=B:USR1@{job.signal_seconds}", "--requeue"]
    else:
        extra.append("--no-requeue")
    prog = _program(job, "train")
    if (
        run_name
        and job.module_args is None
        and not any(o.startswith("tracking.run_name=") for o in job.overrides)
    ):
        # The run name carries the job id, which is the same across requeues: the resumed run logs to the same name.
        prog.append(f"tracking.run_name={run_name}-$SLURM_JOB_ID")
    prog_str = " ".join(_q(a) if "$SLURM_JOB_ID" not in a else f'"{a}"' for a in prog)
    # One node: the rendezvous and the workers' store stay on 127.0.0.1 (launchers.local_torchrun binds them there).
    runner, rdzv_host = (
        ("launchers.local_torchrun", "127.0.0.1")
        if job.nodes == 1
        else ("torch.distributed.run", "$HEAD_ADDR")
    )
    return render_template(
        "train.sbatch.j2",
        sbatch=_sbatch_options(job, job.job_name, job.nodes, log_dir, extra),
        comments=[
            f"Generated by `lancer submit slurm` on {datetime.datetime.now().isoformat(timespec='seconds')}.",
            f"{job.nodes} node(s) x {job.nprocs} process(es), backend {'nccl' if gpu else 'gloo'}.",
        ],
        setup=_setup_lines(job),
        backend="nccl" if gpu else "gloo",
        env=_env_exports(job),
        requeue=job.requeue,
        preempted_exit_code=PREEMPTED_EXIT_CODE,
        preempt_dir=_q(str(log_dir)),
        word_split=False,
        nodes=job.nodes,
        nproc=job.nprocs,
        python=_q(job.python),
        runner=runner,
        rdzv_host=rdzv_host,
        program=prog_str,
    )


def render_cluster_train_script() -> str:
    """``cluster/slurm/train_multinode.sbatch``: the training template rendered with shell variables for the run
    (``CONFIG``, ``OVERRIDES``, ``PYTHON``, ``NPROC``) and the GPU count read from SLURM at run time, for sites
    that call ``sbatch`` themselves. Written by ``python -m launchers.slurm --write-cluster-scripts``."""
    return render_template(
        "train.sbatch.j2",
        sbatch=[
            "--job-name=lancer",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--gpus-per-node=8",
            "--cpus-per-task=32",
            "--time=24:00:00",
            "--output=runs/slurm/%x-%j.out",
            "--open-mode=append",
            "--signal=B:USR1@300",
            "--requeue",
        ],
        comments=[
            "Generated from launchers/templates/train.sbatch.j2 (python -m launchers.slurm --write-cluster-scripts):",
            "what `lancer submit slurm` renders, with the run given by variables. Edit the template, not this file.",
            '  sbatch --nodes=4 --gpus-per-node=8 --export=ALL,CONFIG=configs/xlmr-large.yaml,OVERRIDES="train.lr=1e-5" \\',
            "         cluster/slurm/train_multinode.sbatch",
            "Preemption: USR1 300 s before the time limit -> the trap creates $LANCER_PREEMPT_FILE (shared filesystem),",
            f"which every rank polls -> checkpoint, exit {PREEMPTED_EXIT_CODE} -> requeue -> resume.",
        ],
        setup=[
            ': "${CONFIG:?set CONFIG=path/to/run.yaml (sbatch --export=ALL,CONFIG=...)}"',
            "OVERRIDES=${OVERRIDES:-}",
            "PYTHON=${PYTHON:-python}",
            "export PYTHONUNBUFFERED=1",
            "GPUS=${SLURM_GPUS_PER_NODE:-0}",
            'GPUS=${GPUS##*:}  # "a100:8" -> 8',
        ],
        backend="detect",
        env=[],
        requeue=True,
        preempted_exit_code=PREEMPTED_EXIT_CODE,
        preempt_dir="${SLURM_SUBMIT_DIR:-$PWD}/runs/slurm",
        word_split=True,
        nodes='"$SLURM_JOB_NUM_NODES"',
        nproc='"$NPROC"',
        python='"$PYTHON"',
        runner="torch.distributed.run",
        rdzv_host="$HEAD_ADDR",
        program='lancer_dist.cli train --config "$CONFIG" $OVERRIDES "tracking.run_name=${SLURM_JOB_NAME}-${SLURM_JOB_ID}"',
    )


def render_step_script(job: SlurmJob, verb: str) -> str:
    """An sbatch script for one chained single-node step (``lancer encode`` / ``lancer eval`` with the same config)."""
    job.validate()
    if verb not in STEP_VERBS:
        raise SubmitError("--then", verb, f"one of {', '.join(STEP_VERBS)}")
    gpu = job.gpus_per_node > 0
    extra = [f"--gpus-per-node={job.gpus_per_node}"] if gpu else []
    return render_template(
        "step.sbatch.j2",
        sbatch=_sbatch_options(job, f"{job.job_name}-{verb}", 1, _abs(job, job.log_dir), extra),
        comments=[
            f"Generated by `lancer submit slurm`: the {verb} step, run after training succeeded (afterok)."
        ],
        setup=_setup_lines(job),
        backend="nccl" if gpu else "gloo",
        env=_env_exports(job),
        word_split=False,
        python=_q(job.python),
        program=" ".join(_q(a) for a in _program(job, verb)),
    )


def render_cluster_eval_script() -> str:
    """``cluster/slurm/eval.sbatch``: the step template rendered for ``lancer eval`` with shell variables, chained by
    hand after ``train_multinode.sbatch``."""
    return render_template(
        "step.sbatch.j2",
        sbatch=[
            "--job-name=lancer-eval",
            "--nodes=1",
            "--ntasks=1",
            "--gpus-per-node=1",
            "--cpus-per-task=16",
            "--time=04:00:00",
            "--output=runs/slurm/%x-%j.out",
        ],
        comments=[
            "Generated from launchers/templates/step.sbatch.j2 (python -m launchers.slurm --write-cluster-scripts).",
            "Evaluation (encode + FAISS search + metrics) on one node, chained after training:",
            "  TRAIN=$(sbatch --parsable ... cluster/slurm/train_multinode.sbatch)",
            "  sbatch --dependency=afterok:$TRAIN --kill-on-invalid-dep=yes --export=ALL,CONFIG=configs/run.yaml \\",
            "         cluster/slurm/eval.sbatch",
        ],
        setup=[
            ': "${CONFIG:?set CONFIG=path/to/run.yaml}"',
            "OVERRIDES=${OVERRIDES:-}",
            "export PYTHONUNBUFFERED=1",
        ],
        backend="as-allocated",
        env=[],
        word_split=True,
        python='"${PYTHON:-python}"',
        program='lancer_dist.cli eval --config "$CONFIG" $OVERRIDES',
    )


CLUSTER_RENDERERS = {
    "train_multinode.sbatch": render_cluster_train_script,
    "eval.sbatch": render_cluster_eval_script,
}


def write_cluster_scripts(out_dir: Path = CLUSTER_SCRIPTS) -> list[Path]:
    """(Re)write the hand-editable scripts of ``cluster/slurm/`` from the templates."""
    written = []
    for name, render in CLUSTER_RENDERERS.items():
        path = out_dir / name
        path.write_text(render())
        written.append(path)
    return written


@dataclass
class SlurmSubmission:
    job_ids: dict[str, int]  # step -> job id ("train", "encode", "eval")
    scripts: dict[str, Path]


def _sbatch(script: Path, args: list[str], env: dict[str, str] | None) -> int:
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch", "not found", "SLURM's sbatch on PATH (scripts/install_schedulers.sh)")
    r = subprocess.run([exe, "--parsable", *args, str(script)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SubmitError(
            "sbatch",
            f"exit {r.returncode}: {r.stderr.strip()}",
            f"{script} submitted (is the controller reachable?)",
        )
    return int(r.stdout.strip().split(";")[0])


def submit(job: SlurmJob, run_name: str | None = None, env: dict[str, str] | None = None) -> SlurmSubmission:
    """Write the scripts under ``job.log_dir`` and submit them (chained steps with ``--dependency=afterok``)."""
    job.validate()
    log_dir = _abs(job, job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    scripts: dict[str, Path] = {}
    ids: dict[str, int] = {}
    path = log_dir / f"{job.job_name}-train-{stamp}.sbatch"
    path.write_text(render_train_script(job, run_name))
    scripts["train"] = path
    ids["train"] = _sbatch(path, [], env)
    prev = ids["train"]
    for verb in job.then:
        path = log_dir / f"{job.job_name}-{verb}-{stamp}.sbatch"
        path.write_text(render_step_script(job, verb))
        scripts[verb] = path
        # kill-on-invalid-dep: if training fails, the chained steps are cancelled rather than pending forever.
        ids[verb] = _sbatch(path, [f"--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"], env)
        prev = ids[verb]
    return SlurmSubmission(job_ids=ids, scripts=scripts)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-cluster-scripts"]:
        sys.exit("usage: python -m launchers.slurm --write-cluster-scripts")
    for written in write_cluster_scripts():
        print(written)

"""``lancer submit slurm|ray ...``: submit training (and encode / eval) to a SLURM or Ray cluster.

lancer submit slurm --config FILE --nodes N --gpus-per-node G [--partition P] [--time T] [--then eval]
                    [--dry-run] [--no-requeue] [key=value ...]
lancer submit ray --address http://HEAD:8265 --config FILE [--verb train|encode|eval] [--workers N]
                  [--cpus-per-worker C] [--gpus-per-worker G] [--wait] [key=value ...]
lancer submit ray status|logs|stop JOB_ID --address http://HEAD:8265

:func:`main` is the installed ``lancer`` program: the library's verbs (:mod:`lancer_dist.cli`) plus ``submit``. It
lives here because the launchers depend on the library and the library never imports the launchers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from lancer_dist import cli as library_cli
from lancer_dist.redact import redact, redact_uri

RAY_ACTIONS = ("status", "logs", "stop")


def _env_pairs(items: list[str]) -> dict[str, str]:
    from launchers.slurm import SubmitError

    out = {}
    for item in items:
        if "=" not in item:
            raise SubmitError("--env", item, "KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _tracking_line(config: str, overrides: list[str], workdir: str) -> tuple[str, str, str]:
    """(experiment, tracking URI (redacted), run name) the job will log to, from the validated config."""
    from lancer_dist.config import load_config

    cfg = load_config(config, overrides)
    uri = cfg.tracking.tracking_uri
    if not uri:
        from lancer_dist.tracking import resolve_tracking_uri

        out = Path(cfg.output_dir)
        uri = resolve_tracking_uri("", out if out.is_absolute() else Path(workdir) / out)
    # A run name safe inside the sbatch script (it gets the job id appended there).
    run_name = re.sub(r"[^A-Za-z0-9_.\-]", "-", cfg.tracking.run_name or cfg.name)
    return cfg.tracking.experiment, redact_uri(uri), run_name


def _slurm(args: argparse.Namespace) -> int:
    from launchers.slurm import SlurmJob, render_step_script, render_train_script, submit

    experiment, uri, run_name = _tracking_line(args.config, args.overrides, args.workdir)
    job = SlurmJob(
        config=str(Path(args.config).resolve()),
        overrides=list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time=args.time,
        account=args.account,
        job_name=args.job_name,
        requeue=args.requeue,
        signal_seconds=args.signal_seconds,
        workdir=str(Path(args.workdir).resolve()),
        log_dir=args.log_dir,
        python=args.python,
        then=[s for s in (args.then or "").split(",") if s],
        sbatch_args=list(args.sbatch_arg or []),
        env=_env_pairs(args.env or []),
    )
    explicit_name = any(o.startswith("tracking.run_name=") for o in job.overrides)
    if args.dry_run:
        print(redact(render_train_script(job, run_name)), end="")
        for verb in job.then:
            print(f"\n# ---- chained step '{verb}' (sbatch --dependency=afterok:<previous job id>) ----")
            print(redact(render_step_script(job, verb)), end="")
        return 0
    sub = submit(job, run_name)
    for step, jid in sub.job_ids.items():
        print(f"submitted {step}: job {jid} (script {sub.scripts[step]})")
    shown = run_name if explicit_name else f"{run_name}-{sub.job_ids['train']}"
    print(f"MLflow: experiment '{experiment}', run '{shown}', tracking URI {uri}")
    print(f"logs: {Path(job.workdir) / job.log_dir}/{job.job_name}-<job id>.out")
    return 0


def _ray(args: argparse.Namespace) -> int:
    from launchers import ray_jobs
    from launchers.slurm import SubmitError

    pos = list(args.overrides)
    if pos and pos[0] in RAY_ACTIONS:
        action, rest = pos[0], pos[1:]
        if len(rest) != 1:
            raise SubmitError(f"submit ray {action}", " ".join(rest), "exactly one JOB_ID")
        jid = rest[0]
        if action == "status":
            print(ray_jobs.job_status(args.address, jid))
        elif action == "logs":
            print(ray_jobs.job_logs(args.address, jid), end="")
        else:
            print("stopped" if ray_jobs.stop_job(args.address, jid) else "not running")
        return 0
    if not args.config:
        raise SubmitError("--config", None, "a YAML run config (or one of: status|logs|stop JOB_ID)")
    experiment, uri, run_name = _tracking_line(args.config, pos, args.working_dir)
    job = ray_jobs.RayJob(
        config=args.config,
        verb=args.verb,
        overrides=pos,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        working_dir=args.working_dir,
        env=_env_pairs(args.env or []),
        python=args.python,
        submission_id=args.submission_id,
    )
    if args.dry_run:
        print(redact(ray_jobs.entrypoint(job)))
        return 0
    jid = ray_jobs.submit(args.address, job)
    print(f"submitted {args.verb}: Ray job {jid}")
    print(f"MLflow: experiment '{experiment}', run '{run_name}', tracking URI {uri}")
    print(f"follow: lancer submit ray logs {jid} --address {args.address}")
    if args.wait:
        status = ray_jobs.wait(args.address, jid)
        print(f"Ray job {jid}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit training / encode / eval to SLURM or Ray")
    ssub = p.add_subparsers(dest="submit_verb", metavar="<scheduler>")

    s = ssub.add_parser("slurm", help="write an sbatch script for (multi-node) training and submit it")
    s.add_argument("--config", required=True, help="YAML run config")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU training over gloo")
    s.add_argument(
        "--procs-per-node", type=int, default=None, help="processes per node (default: GPUs, or 1)"
    )
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--partition", default=None)
    s.add_argument(
        "--time", default=None, help="time limit (HH:MM:SS); USR1 comes --signal-seconds before it"
    )
    s.add_argument("--account", default=None)
    s.add_argument("--job-name", default="lancer")
    s.add_argument(
        "--requeue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="checkpoint on USR1 before the time limit and requeue (default: on)",
    )
    s.add_argument("--signal-seconds", type=int, default=300)
    s.add_argument("--then", default="", help="chained steps after training: encode,eval (afterok)")
    s.add_argument("--sbatch-arg", action="append", help="extra #SBATCH option, e.g. --mem=64G (repeatable)")
    s.add_argument("--env", action="append", help="KEY=VALUE exported in the job (no secrets; repeatable)")
    s.add_argument("--workdir", default=os.getcwd(), help="directory the job runs in (default: here)")
    s.add_argument("--log-dir", default="runs/slurm", help="scripts and SLURM logs (relative to --workdir)")
    s.add_argument("--python", default=sys.executable, help="Python interpreter on the nodes")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and submit nothing")
    s.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    s.set_defaults(func=_slurm)

    r = ssub.add_parser(
        "ray",
        help="submit to a Ray cluster through the Jobs API; or: status|logs|stop JOB_ID",
        description="Submit: --address URL --config FILE [key=value ...]. Manage: status|logs|stop JOB_ID --address URL.",
    )
    r.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    r.add_argument("--config", default=None)
    r.add_argument("--verb", choices=["train", "encode", "eval"], default="train")
    r.add_argument(
        "--workers",
        "--nproc",
        dest="workers",
        type=int,
        default=None,
        help="Ray Train workers (training ranks) = train.ray.num_workers",
    )
    r.add_argument("--cpus-per-worker", type=float, default=None, help="= train.ray.cpus_per_worker")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="= train.ray.gpus_per_worker")
    r.add_argument("--num-cpus", type=float, default=0, help="CPUs the entrypoint (job driver) reserves")
    r.add_argument("--num-gpus", type=float, default=0, help="GPUs the entrypoint (job driver) reserves")
    r.add_argument("--working-dir", default=os.getcwd(), help="packaged and shipped to the cluster")
    r.add_argument("--env", action="append", help="KEY=VALUE for the job (no secrets; repeatable)")
    r.add_argument("--python", default="python", help="Python interpreter on the Ray nodes")
    r.add_argument("--submission-id", default=None)
    r.add_argument(
        "--wait", action="store_true", help="wait for the job and exit non-zero unless it succeeded"
    )
    r.add_argument("--dry-run", action="store_true", help="print the entrypoint and submit nothing")
    r.add_argument("overrides", nargs="*", help="key=value overrides, or: status|logs|stop JOB_ID")
    r.set_defaults(func=_ray)


def main(argv: list[str] | None = None) -> int:
    """``lancer <verb>``: every library verb and ``submit`` (``python -m launchers.cli`` runs the same)."""
    return library_cli.main(argv, (*library_cli.VERB_MODULES, "launchers.cli"))


if __name__ == "__main__":
    sys.exit(main())

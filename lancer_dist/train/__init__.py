"""Training: the trainer, checkpoints, the language probe and MLflow tracking."""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the SLURM launcher turns it into `scontrol requeue`

__all__ = ["PREEMPTED_EXIT_CODE"]

"""Training: the trainer, checkpoints, parallel set-up and the language probe (tracking: lancer_dist.tracking)."""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the SLURM launcher turns it into `scontrol requeue`

__all__ = ["PREEMPTED_EXIT_CODE"]

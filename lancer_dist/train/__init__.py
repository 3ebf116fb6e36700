"""Training: the trainer, checkpoints, the language probe and MLflow tracking."""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL; also lancer_dist.train.trainer.PREEMPTED_EXIT_CODE

__all__ = ["PREEMPTED_EXIT_CODE"]

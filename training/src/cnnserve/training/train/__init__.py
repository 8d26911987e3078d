"""Training: spec language, networks, data, the loop, checkpoints, evaluation, reports."""

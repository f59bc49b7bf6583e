"""Training: the loop, optimizer, checkpoints, metrics and the report."""
